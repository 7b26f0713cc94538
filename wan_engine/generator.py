"""One loaded Wan2.2 model that turns generation requests into frames.

A :class:`WanGenerator` holds the whole pipeline (both experts of an A14B model),
checks each request against its :class:`ModelSpec` before spending any compute, and
generates deterministically: the latents come from a CPU ``torch.Generator`` seeded
by the request, so the same request gives the same frames on any device.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline, WanImageToVideoPipeline

from wan_engine.requests import GenerationRequest, InvalidRequestError, request_problems, resolve_request
from wan_engine.specs import ModelSpec
from wan_engine.weights import materialize

if TYPE_CHECKING:
    from minio import Minio

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneratedVideo:
    """The frames of one clip and how they were made."""

    frames: np.ndarray  # uint8, (frames, height, width, 3)
    fps: int
    request: GenerationRequest  # resolved: every default filled in
    expert_calls: dict[str, int]  # transformer forward passes per expert
    seconds: float


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` is the GPU when there is one (Ray pins one per actor), else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


class WanGenerator:
    """A loaded Wan2.2 pipeline and the rules of its model."""

    def __init__(self, pipeline: DiffusionPipeline, spec: ModelSpec, device: torch.device) -> None:
        _check_pipeline_matches(pipeline, spec)
        self.spec = spec
        self.device = device
        self.pipeline = pipeline.to(device)
        # TI2V-5B is one model for text and image input: an image-to-video view shares its components.
        self.image_pipeline = None
        if spec.task == "ti2v":
            self.image_pipeline = WanImageToVideoPipeline(
                **self.pipeline.components,
                image_encoder=None,
                image_processor=None,
                boundary_ratio=None,
                expand_timesteps=True,
            )
        for view in (self.pipeline, self.image_pipeline):
            if view is not None:
                view.set_progress_bar_config(disable=True)
        self._expert_calls: Counter[str] = Counter()
        experts = {"high_noise": pipeline.transformer, "low_noise": pipeline.transformer_2}
        if not spec.is_moe:
            experts = {"dense": pipeline.transformer}
        for name, module in experts.items():
            module.register_forward_pre_hook(self._counter(name))

    def _counter(self, name: str):
        def count(module: torch.nn.Module, args: tuple) -> None:
            self._expert_calls[name] += 1

        return count

    @classmethod
    def from_pretrained(
        cls,
        location: str | Path,
        spec: ModelSpec,
        device: str = "auto",
        cache_dir: Path | None = None,
        client: Minio | None = None,
    ) -> WanGenerator:
        """Load ``spec``'s diffusers folder from a path or ``s3://`` prefix (cached in ``cache_dir``)."""
        started = time.perf_counter()
        target = pick_device(device)
        folder = materialize(str(location), cache_dir or Path.home() / ".cache" / "wanfactory", client)
        dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
        # The VAE stays in float32, as diffusers recommends for Wan's decode quality.
        vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", dtype=torch.float32)
        pipeline = DiffusionPipeline.from_pretrained(folder, vae=vae, dtype=dtype)
        # The official flow shift differs per model; a folder's scheduler config may carry another one.
        pipeline.scheduler = type(pipeline.scheduler).from_config(
            pipeline.scheduler.config, flow_shift=spec.flow_shift
        )
        generator = cls(pipeline, spec, target)
        log.info(
            "model loaded model=%s device=%s seconds=%.1f", spec.name, target, time.perf_counter() - started
        )
        return generator

    def validate(self, request: GenerationRequest) -> GenerationRequest:
        """The request with defaults filled in; raises :class:`InvalidRequestError` naming every bad field."""
        resolved = resolve_request(self.spec, request)
        problems = request_problems(self.spec, resolved, has_image=request.image is not None)
        if problems:
            raise InvalidRequestError(self.spec.name, problems)
        return resolved

    @torch.inference_mode()
    def generate(self, request: GenerationRequest) -> GeneratedVideo:
        """Generate one clip; the same request always gives the same frames."""
        resolved = self.validate(request)
        started = time.perf_counter()
        self._expert_calls.clear()
        pipeline = self.pipeline
        kwargs = {}
        if resolved.image is not None:
            pipeline = self.image_pipeline or self.pipeline
            kwargs["image"] = resolved.image.convert("RGB")
        if self.spec.is_moe:
            kwargs["guidance_scale_2"] = resolved.guidance_scale_2
        output = pipeline(
            prompt=resolved.prompt,
            negative_prompt=resolved.negative_prompt,
            height=resolved.height,
            width=resolved.width,
            num_frames=resolved.num_frames,
            num_inference_steps=resolved.steps,
            guidance_scale=resolved.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(resolved.seed),
            max_sequence_length=self.spec.max_sequence_length,
            output_type="np",
            **kwargs,
        )
        frames = (np.clip(output.frames[0], 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return GeneratedVideo(
            frames=frames,
            fps=self.spec.fps,
            request=resolved,
            expert_calls=dict(self._expert_calls),
            seconds=time.perf_counter() - started,
        )


def _check_pipeline_matches(pipeline: DiffusionPipeline, spec: ModelSpec) -> None:
    """Refuse weights of another model: a wrong folder would otherwise fail deep inside a clip."""
    found = {
        "pipeline": type(pipeline).__name__,
        "boundary_ratio": pipeline.config.get("boundary_ratio"),
        "expand_timesteps": bool(pipeline.config.get("expand_timesteps", False)),
        "experts": 1 + (getattr(pipeline, "transformer_2", None) is not None),
    }
    expected = {
        "pipeline": spec.pipeline_class,
        "boundary_ratio": spec.boundary_ratio,
        "expand_timesteps": spec.expand_timesteps,
        "experts": 2 if spec.is_moe else 1,
    }
    wrong = {k: (found[k], v) for k, v in expected.items() if found[k] != v}
    if wrong:
        details = ", ".join(f"{k}={got!r} (expected {want!r})" for k, (got, want) in wrong.items())
        raise ValueError(f"the weights loaded for {spec.name} are not that model: {details}")
