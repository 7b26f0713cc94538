"""One loaded Wan2.2 model that turns generation requests into frames.

A :class:`WanGenerator` holds the whole pipeline (both experts of an A14B model),
checks each request against its :class:`ModelSpec` before spending any compute, and
generates deterministically: the latents come from a CPU ``torch.Generator`` seeded
by the request, so the same request gives the same frames on any device.

It runs diffusers' own components (text encoder, transformers, scheduler, VAE) in a
denoising loop of its own, the same arithmetic as ``WanPipeline`` and
``WanImageToVideoPipeline`` with what makes it fast and changes no result beyond bf16
rounding (:class:`EngineOptions`): the conditional and unconditional passes in one
batch, the negative prompt encoded once per generator, the TI2V per-token timesteps
collapsed to one when every token shares it, no host synchronisation inside the loop,
and on a GPU the repeated transformer blocks compiled and warmed up at load.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from diffusers import (
    AutoencoderKLWan,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    TaylorSeerCacheConfig,
    WanImageToVideoPipeline,
)

from wan_engine.adapters import AdapterWeights, adapter_cache, local_adapter
from wan_engine.attention import AUTO, resolve_attention_backend
from wan_engine.lora import AdapterSlot, fuse_adapters
from wan_engine.memory import BlockRing, ExpertSlot, HostResidentModule, gpu_memory_budget, plan_memory
from wan_engine.quantize import (
    Weights8Bit,
    check_fp8_device,
    quantize_fp8_matmuls,
    quantize_weights_8bit,
)
from wan_engine.recipes import STANDARD, Recipe, get_recipe, recipe_names
from wan_engine.requests import (
    GenerationRequest,
    InvalidRequestError,
    RequestProblem,
    request_problems,
    request_recipe,
    resolve_request,
)
from wan_engine.specs import ModelSpec
from wan_engine.vae import VaeDecodeOptions, decode_latents, prepare_vae
from wan_engine.weights import materialize

if TYPE_CHECKING:
    from minio import Minio

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    """How a generator runs. The defaults are the fast exact mode: the same outputs as stock diffusers."""

    batch_guidance: bool = True  # conditional and unconditional passes as one batch of two
    compile_blocks: bool = True  # torch.compile the repeated transformer blocks (GPU only)
    # A diffusers attention backend; None keeps PyTorch's SDPA; "auto" takes FlashAttention's Hopper/
    # Blackwell kernels when they are installed and run on this GPU (wan_engine.attention), else SDPA.
    attention_backend: str | None = AUTO
    # None: bfloat16 on a GPU, where its frames stay within bf16 tolerance of a float32 decode at
    # two thirds of the time (bench/results), and float32 on a CPU, where bfloat16 is slow.
    vae_dtype: torch.dtype | None = None
    # None: GPU_VAE_DECODE on a GPU (wan_engine.vae: the same math, faster), diffusers' own decode on a CPU.
    vae_decode: VaeDecodeOptions | None = None
    warmup: bool = True  # one short generation at load (GPU only), so the first clip is not the slow one
    # (width, height, frames) of the warm-up clip: the shape the generator will serve, so compiling and
    # autotuning happen at load and not again at the first clip; None: the model's default size and length.
    warmup_shape: tuple[int, int, int] | None = None
    # None: decided at load from the weights' sizes and the GPU's memory (wan_engine.memory.plan_memory).
    # The text encoder in host memory between clips (A14B on 80 GB); A14B's two experts sharing one
    # expert's worth of GPU memory, the next one streamed in from host memory (A14B on 48 GB); every
    # expert's blocks streamed through a ring of two blocks (A14B on 24 GB, TI2V-5B at 720p on 24 GB);
    # the VAE decoding in tiles when its whole-frame decode would not fit beside the weights.
    text_encoder_offload: bool | None = None
    expert_streaming: bool | None = None
    block_streaming: bool | None = None
    vae_tiling: bool | None = None
    # Opt-in approximate modes: faster, but the frames are no longer stock diffusers' frames. Never defaults.
    # N > 1: diffusers' TaylorSeer cache hook (lite) runs the experts' blocks fully once every N steps and
    # extrapolates their output in between; each expert warms up on its own first steps.
    step_cache_interval: int = 1
    fp8_matmuls: bool = False  # the experts' block linears in FP8 e4m3 with per-row scales (torchao)
    # The experts' block linear weights stored in 8 bits, fp8 (Ada, Hopper) or int8 (any GPU), one scale
    # per output channel, computed in bf16: half the memory and PCIe bytes (wan_engine.quantize).
    weights_8bit: Weights8Bit | None = None
    # One clip across every GPU of the torch.distributed process group (diffusers' context
    # parallelism, wan_engine.parallel): for latency-bound clips. Exact: it splits the work, not the math.
    context_parallel: bool = False
    # Per-clip adapters (brand styles): a LoRA slot of this rank in every expert, made at load before the
    # blocks are compiled, into which each clip's adapters are hot-swapped (wan_engine.lora); 0: none.
    adapter_slot_rank: int = 0

    @property
    def mode(self) -> str:
        """``exact``, or the approximations in use, e.g. ``approximate:step-cache-3+fp8`` (for manifests)."""
        parts = [f"step-cache-{self.step_cache_interval}"] if self.step_cache_interval > 1 else []
        parts += ["fp8"] if self.fp8_matmuls else []
        parts += [f"{self.weights_8bit}-weights"] if self.weights_8bit else []
        return "approximate:" + "+".join(parts) if parts else "exact"


# How a GPU decodes by default, from the decode study (bench.engine --decode-study, one H100): 1.16x
# stock for TI2V-5B 720p (6.23 -> 5.39 s), 1.26x for the A14B VAE at 720p (4.73 -> 3.76 s), within the
# bf16 yardstick and at stock's peak memory. Several latent frames a call bought little more (A14B) or
# less (TI2V) for 5-16 GiB more: off.
GPU_VAE_DECODE = VaeDecodeOptions(autotune=True, channels_last=True, fused_norm=True)

# Full forwards before TaylorSeer starts extrapolating: its first-order factors need two points.
STEP_CACHE_WARMUP_STEPS = 3


@dataclass(frozen=True)
class GeneratedVideo:
    """The frames of one clip and how they were made."""

    frames: np.ndarray  # uint8, (frames, height, width, 3)
    fps: int
    request: GenerationRequest  # resolved: every default filled in
    expert_calls: dict[str, int]  # transformer forward passes per expert (a batched pair counts as two)
    seconds: float
    # The prompt's umT5 tokens, and how many of them the text encoder read (its max_sequence_length):
    # fewer kept than given means the end of the prompt had no effect.
    prompt_tokens: int
    prompt_tokens_kept: int
    # Seconds spent swapping per-clip adapters in before this clip; None when the loaded ones served.
    adapter_swap_seconds: float | None = None
    # Seconds of each stage (:data:`STAGES`): the prompts' encoding, the denoising loop, the VAE decode and
    # the hand-back of uint8 frames to the host. On a GPU, timed by CUDA events read once the hand-back
    # has synchronised, so timing them adds no synchronisation to the clip.
    stage_seconds: dict[str, float] = field(default_factory=dict)


# The stages of :attr:`GeneratedVideo.stage_seconds`, in order.
STAGES = ("encode", "denoise", "decode", "handback")


@dataclass(frozen=True)
class PreparedClip:
    """A checked request with its prompt embeddings, ready for the denoising loop."""

    request: GenerationRequest  # resolved: every default filled in
    positive: torch.Tensor
    negative: torch.Tensor | None  # None when no step of the recipe runs classifier-free guidance
    prompt_tokens: int  # the prompt's tokens before the text encoder's limit
    encode_seconds: float = 0.0  # the prompts' encoding (the prepare stream synchronised at its end)


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` is the GPU when there is one (Ray pins one per actor), else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


class WanGenerator:
    """A loaded Wan2.2 pipeline and the rules of its model."""

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        spec: ModelSpec,
        device: torch.device,
        options: EngineOptions | None = None,
        fused_adapters: Sequence[AdapterWeights] = (),
    ) -> None:
        """``fused_adapters`` (local files) are fused into the weights here, before anything is compiled
        or quantized: a recipe that needs them (a distilled one) then costs nothing extra per step."""
        _check_pipeline_matches(pipeline, spec)
        self.spec = spec
        self.device = device
        self.options = options or EngineOptions()
        self.fused_adapters = tuple(fused_adapters)
        self.experts = {"high_noise": pipeline.transformer, "low_noise": pipeline.transformer_2}
        if not spec.is_moe:
            self.experts = {"dense": pipeline.transformer}
        if self.options.fp8_matmuls and self.options.weights_8bit:
            raise ValueError("fp8_matmuls and weights_8bit both quantize the weights: choose one")
        if self.options.weights_8bit == "fp8" and device.type == "cuda":
            check_fp8_device(device, "weights_8bit='fp8'")
        fused_on_host = bool(self.options.weights_8bit)
        self.fuse_seconds = 0.0
        if self.options.weights_8bit:
            # Adapters fuse into bf16 weights, so before quantizing; both where the weights are (the host),
            # so that the plan below counts 8-bit bytes.
            self.fuse_seconds = fuse_adapters(pipeline, self.fused_adapters)
            for module in self.experts.values():
                quantize_weights_8bit(module, self.options.weights_8bit)
        largest_clip = max(width * height for width, height in spec.sizes)
        self.memory_plan = plan_memory(
            list(self.experts.values()),
            pipeline.text_encoder,
            gpu_memory_budget(device),
            stream_experts=self.options.expert_streaming,
            offload_text_encoder=self.options.text_encoder_offload,
            stream_blocks=self.options.block_streaming,
            decode_bytes=spec.vae_decode_bytes_per_pixel * largest_clip,
            tile_decode=self.options.vae_tiling,
        )
        streamed = self.memory_plan.stream_experts or self.memory_plan.stream_blocks
        if streamed and self.options.fp8_matmuls:
            raise ValueError(
                "fp8_matmuls quantizes the weights on the GPU, which this memory plan "
                f"({self.memory_plan.tier}) keeps in host memory; weights_8bit='fp8' streams"
            )
        if self.options.fp8_matmuls:
            check_fp8_device(device, "fp8_matmuls")
        if streamed and self.options.adapter_slot_rank:
            raise ValueError(
                "per-clip adapters need the experts resident; this GPU streams them "
                f"({self.memory_plan.tier})"
            )
        self._expert_slot: ExpertSlot | None = None
        self._block_ring: BlockRing | None = None
        if streamed and not fused_on_host:
            # On the host: the experts never sit on the GPU whole.
            self.fuse_seconds = fuse_adapters(pipeline, self.fused_adapters)
            fused_on_host = True
        # Before the pipeline moves to the GPU, where the experts would not fit.
        if self.memory_plan.stream_experts:
            self.stream_experts()
        elif self.memory_plan.stream_blocks:
            self._block_ring = BlockRing(self.experts, device)
            log.info(
                "expert blocks stream through a ring model=%s pinned_gib=%.1f ring_gib=%.2f",
                spec.name,
                self._block_ring.host_bytes / 2**30,
                self._block_ring.gpu_bytes / 2**30,
            )
        self.pipeline = pipeline.to(device)
        if not fused_on_host:
            self.fuse_seconds = fuse_adapters(pipeline, self.fused_adapters)  # on the GPU: seconds
        if self.memory_plan.tile_decode:
            self.pipeline.vae.enable_tiling()
        self.adapter_slot: AdapterSlot | None = None
        if self.options.adapter_slot_rank:
            self.adapter_slot = AdapterSlot(pipeline, self.experts, self.options.adapter_slot_rank)
        self._schedulers: dict[str, object] = {}
        # TI2V-5B takes text or an image: its image path needs WanImageToVideoPipeline's latent preparation.
        self._image_pipeline = pipeline
        if spec.task == "ti2v":
            self._image_pipeline = WanImageToVideoPipeline(
                **self.pipeline.components,
                image_encoder=None,
                image_processor=None,
                boundary_ratio=None,
                expand_timesteps=True,
            )
        self._expert_calls: Counter[str] = Counter()
        self.attention_backend = resolve_attention_backend(
            self.options.attention_backend, device, self.options.context_parallel
        )
        for name, module in self.experts.items():
            module.register_forward_pre_hook(self._counter(name), with_kwargs=True)
            if self.attention_backend:
                module.set_attention_backend(self.attention_backend)
            if self.options.fp8_matmuls:
                quantize_fp8_matmuls(module)
            if self.options.context_parallel:
                from wan_engine.parallel import enable_context_parallel

                enable_context_parallel(module)
            if self.step_cached:
                module.enable_cache(
                    TaylorSeerCacheConfig(
                        cache_interval=self.options.step_cache_interval,
                        disable_cache_before_step=STEP_CACHE_WARMUP_STEPS,
                        use_lite_mode=True,
                        taylor_factors_dtype=torch.float32,
                    )
                )
            if self.options.compile_blocks and device.type == "cuda":
                # The cache hook decides on the host whether a block runs: a graph break, not a full graph.
                module.compile_repeated_blocks(fullgraph=not self.step_cached)
        vae_dtype = self.options.vae_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        if self.pipeline.vae.dtype != vae_dtype:
            self.pipeline.vae.to(vae_dtype)
        self.vae_decode = self.options.vae_decode or (
            GPU_VAE_DECODE if device.type == "cuda" else VaeDecodeOptions()
        )
        prepare_vae(self.pipeline.vae, self.vae_decode)
        self._negative_cache: dict[str, torch.Tensor] = {}
        self._prepare_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._text_encoder_host: HostResidentModule | None = None
        if self.memory_plan.offload_text_encoder:
            self._text_encoder_host = HostResidentModule(self.pipeline.text_encoder, device)
            log.info("text encoder kept in pinned host memory between clips model=%s", spec.name)

    @property
    def step_cached(self) -> bool:
        return self.options.step_cache_interval > 1

    @property
    def expert_slot(self) -> ExpertSlot | None:
        """The one expert's worth of GPU memory both experts share when they are streamed, else None."""
        return self._expert_slot

    @property
    def block_ring(self) -> BlockRing | None:
        """The ring the experts' blocks stream through when the memory plan chose it, else None."""
        return self._block_ring

    @property
    def text_encoder_host(self) -> HostResidentModule | None:
        """The text encoder's pinned host copies when it lives in host memory between clips, else None."""
        return self._text_encoder_host

    def stream_experts(self) -> ExpertSlot:
        """From now on the experts share one slot, the next one streamed in at each switch
        (wan_engine.memory.ExpertSlot), as when the memory plan chooses it at load; returns the slot.

        On a generator loaded with both experts resident, it compares the two ways on the same weights.
        """
        if self._expert_slot is None:
            if self.options.fp8_matmuls:
                raise ValueError(
                    "fp8_matmuls cannot be combined with expert streaming: it rewrites the weights"
                )
            if self._block_ring is not None:
                raise ValueError("the experts' blocks stream through a ring already")
            if len(self.experts) < 2:
                raise ValueError("expert streaming needs a model of two experts (A14B); this one has one")
            self._expert_slot = ExpertSlot(self.experts, self.device)
            self.memory_plan = replace(self.memory_plan, stream_experts=True)
            log.info("experts share one expert's worth of GPU memory model=%s", self.spec.name)
        return self._expert_slot

    def _counter(self, name: str):
        def count(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            self._expert_calls[name] += kwargs["hidden_states"].shape[0]

        return count

    @classmethod
    def from_pretrained(
        cls,
        location: str | Path,
        spec: ModelSpec,
        device: str = "auto",
        cache_dir: Path | None = None,
        client: Minio | None = None,
        options: EngineOptions | None = None,
        fused_adapters: Sequence[AdapterWeights] = (),
    ) -> WanGenerator:
        """Load ``spec``'s diffusers folder from a path or ``s3://`` prefix (cached in ``cache_dir``), with
        ``fused_adapters`` (their files are paths or ``s3://`` URIs, cached alike) fused into its weights."""
        started = time.perf_counter()
        target = pick_device(device)
        cache_dir = cache_dir or Path.home() / ".cache" / "wanfactory"
        folder = materialize(str(location), cache_dir, client)
        fused_adapters = [local_adapter(a, adapter_cache(cache_dir), client) for a in fused_adapters]
        dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
        options = options or EngineOptions()
        vae_dtype = options.vae_dtype or dtype
        vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", dtype=vae_dtype)
        pipeline = DiffusionPipeline.from_pretrained(folder, vae=vae, dtype=dtype)
        # The official flow shift differs per model; a folder's scheduler config may carry another one.
        pipeline.scheduler = type(pipeline.scheduler).from_config(
            pipeline.scheduler.config, flow_shift=spec.flow_shift
        )
        generator = cls(pipeline, spec, target, options, fused_adapters)
        if options.warmup and target.type == "cuda":
            generator.warm_up()
        log.info(
            "model loaded model=%s device=%s seconds=%.1f", spec.name, target, time.perf_counter() - started
        )
        return generator

    @property
    def recipes(self) -> list[Recipe]:
        """The recipes this generator serves: those whose fused adapters are the ones it holds."""
        held = sorted((adapter.name, adapter.scale) for adapter in self.fused_adapters)
        recipes = [get_recipe(self.spec, name) for name in recipe_names(self.spec)]
        return [recipe for recipe in recipes if sorted(recipe.fused_adapters) == held]

    def warm_up(self) -> None:
        """Compile and autotune at ``options.warmup_shape`` (else the default size) before the first real
        clip, every expert included."""
        width, height, frames = self.options.warmup_shape or (*self.spec.default_size, self.spec.num_frames)
        image = None
        if self.spec.requires_image:
            from PIL import Image

            image = Image.new("RGB", (width, height), (128, 128, 128))
        recipe = next(iter(self.recipes), None)
        if recipe is None:
            return  # nothing to serve: every request is refused by validate()
        self.generate(
            GenerationRequest(
                prompt="warm-up",
                seed=0,
                width=width,
                height=height,
                num_frames=frames,
                steps=self.warmup_steps(recipe),
                image=image,
                recipe=recipe.name,
            )
        )

    def warmup_steps(self, recipe: Recipe | None = None) -> int:
        """The fewest steps whose schedule crosses the expert boundary (2 for a dense model); all of a
        recipe's steps when they are fixed."""
        recipe = recipe or get_recipe(self.spec, STANDARD)
        if recipe.fixed_steps:
            return recipe.steps
        if not self.spec.is_moe:
            return 2
        scheduler = self._scheduler(recipe)
        boundary = self.spec.boundary_ratio * scheduler.config.num_train_timesteps
        for steps in range(2, recipe.steps + 1):
            scheduler.set_timesteps(steps)
            if (scheduler.timesteps < boundary).any():
                return steps
        return recipe.steps

    def _scheduler(self, recipe: Recipe):
        """The recipe's scheduler, one per recipe: a scheduler keeps the state of the clip it runs."""
        scheduler = self._schedulers.get(recipe.name)
        if scheduler is None:
            config = self.pipeline.scheduler.config
            if recipe.scheduler == "unipc":
                scheduler = type(self.pipeline.scheduler).from_config(config, flow_shift=recipe.flow_shift)
            else:
                scheduler = FlowMatchEulerDiscreteScheduler(
                    num_train_timesteps=config.num_train_timesteps, shift=recipe.flow_shift
                )
            self._schedulers[recipe.name] = scheduler
        return scheduler

    def validate(self, request: GenerationRequest) -> GenerationRequest:
        """The request with defaults filled in; raises :class:`InvalidRequestError` naming every bad field."""
        resolved = resolve_request(self.spec, request)
        problems = request_problems(self.spec, resolved, has_image=request.image is not None)
        recipe = request_recipe(self.spec, resolved)
        if recipe.name == resolved.recipe and recipe not in self.recipes:
            held = ", ".join(f"{a.name}:{a.scale:g}" for a in self.fused_adapters) or "none"
            wanted = ", ".join(f"{name}:{scale:g}" for name, scale in recipe.fused_adapters) or "none"
            problems.append(
                RequestProblem(
                    "recipe",
                    f"{recipe.name} needs the adapters fused at load to be {wanted}; this generator "
                    f"holds {held}",
                )
            )
        if resolved.adapters and self.adapter_slot is None:
            problems.append(
                RequestProblem("adapters", "this generator was loaded without a slot for per-clip adapters")
            )
        if problems:
            raise InvalidRequestError(self.spec.name, problems)
        return resolved

    @torch.inference_mode()
    def generate(self, request: GenerationRequest) -> GeneratedVideo:
        """Generate one clip; the same request always gives the same frames."""
        return self.render(self.prepare(request))

    @property
    def prepares_concurrently(self) -> bool:
        """Whether :meth:`prepare` may run while another clip renders. Not when the text encoder lives
        in host memory: it is offloaded because the GPU has no room for it beside a running clip."""
        return self._text_encoder_host is None

    @torch.inference_mode()
    def prepare(self, request: GenerationRequest) -> PreparedClip:
        """Check a request and encode its prompts: the work a clip needs before its denoising loop.

        On a GPU it runs on a stream of its own, so a server can prepare the next clip while the
        current one denoises (see :attr:`prepares_concurrently`) without waiting for its kernels.
        """
        resolved = self.validate(request)
        if self.adapter_slot is not None:
            self.adapter_slot.check(resolved.adapters)
        stream = self._prepare_stream
        started = time.perf_counter()
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            positive, negative = self.encode_prompts(resolved)
        if stream is not None:
            stream.synchronize()
        encode_seconds = time.perf_counter() - started
        return PreparedClip(resolved, positive, negative, self.prompt_tokens(resolved.prompt), encode_seconds)

    def prompt_tokens(self, prompt: str) -> int:
        """How many umT5 tokens ``prompt`` is (end of text included), as the pipeline tokenizes it."""
        return len(self.pipeline.tokenizer(prompt, add_special_tokens=True).input_ids)

    @torch.inference_mode()
    def render(self, prepared: PreparedClip) -> GeneratedVideo:
        """Swap in the clip's adapters, then denoise and decode a prepared clip into frames on the host."""
        started = time.perf_counter()
        swap_seconds = None
        if self.adapter_slot is not None:
            swap_seconds = self.adapter_slot.use(prepared.request.adapters)
        self._expert_calls.clear()
        embeddings = prepared.positive, prepared.negative
        if self._prepare_stream is not None:
            # Made on the prepare stream, used on this one: the allocator must not reuse them early.
            for tensor in embeddings:
                if tensor is not None:
                    tensor.record_stream(torch.cuda.current_stream(self.device))
        clock = _StageClock(self.device)
        latents = self.denoise(prepared.request, embeddings)
        clock.mark("denoise")
        video = self.decode_video(latents)
        clock.mark("decode")
        frames = self.to_frames(video)  # copies to the host: the stream has finished every stage
        clock.mark("handback")
        return GeneratedVideo(
            frames=frames,
            fps=self.spec.fps,
            request=prepared.request,
            expert_calls=dict(self._expert_calls),
            seconds=time.perf_counter() - started,
            prompt_tokens=prepared.prompt_tokens,
            prompt_tokens_kept=min(prepared.prompt_tokens, self.spec.max_sequence_length),
            adapter_swap_seconds=swap_seconds,
            stage_seconds={"encode": prepared.encode_seconds, **clock.seconds()},
        )

    # The stages of one clip; public so that benchmarks can time each of them. Each runs in inference
    # mode itself: a caller outside it would otherwise record autograd graphs (and keep one in the
    # cached negative embedding).

    @torch.inference_mode()
    def encode_prompts(self, request: GenerationRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompt's and negative prompt's umT5 embeddings; the negative one is computed once, and not
        at all when no step runs classifier-free guidance (None)."""
        pipeline, length = self.pipeline, self.spec.max_sequence_length
        dtype = self.experts[next(iter(self.experts))].dtype
        if self._text_encoder_host is not None:
            self._text_encoder_host.load()
        positive = pipeline._get_t5_prompt_embeds(
            request.prompt, max_sequence_length=length, device=self.device
        )
        negative = self._negative_cache.get(request.negative_prompt)
        if not _guided(request):
            negative = None
        elif negative is None:
            negative = pipeline._get_t5_prompt_embeds(
                request.negative_prompt, max_sequence_length=length, device=self.device
            )
            self._negative_cache = {request.negative_prompt: negative}
        if self._text_encoder_host is not None:
            self._text_encoder_host.offload()
        return positive.to(dtype), negative.to(dtype) if negative is not None else None

    @torch.inference_mode()
    def denoise(
        self, request: GenerationRequest, embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The final latents of a resolved request (float32, before the VAE), from its prompt
        embeddings (positive, negative) when :meth:`prepare` made them already."""
        positive, negative = embeddings or self.encode_prompts(request)
        recipe = request_recipe(self.spec, request)
        pipeline, scheduler = self.pipeline, self._scheduler(recipe)
        dtype = positive.dtype
        generator = torch.Generator("cpu").manual_seed(request.seed)
        if recipe.timesteps is not None:
            # The distilled timesteps, shifted by the scheduler as the distillation's sampler shifts them.
            sigmas = [t / scheduler.config.num_train_timesteps for t in recipe.timesteps]
            scheduler.set_timesteps(sigmas=sigmas, device=self.device)
        else:
            scheduler.set_timesteps(request.steps, device=self.device)
        timesteps = scheduler.timesteps
        scheduler.set_begin_index(0)  # no device-to-host sync to find the step index

        condition = first_frame_mask = None
        shape_and_rng = (
            1,
            pipeline.vae.config.z_dim,
            request.height,
            request.width,
            request.num_frames,
            torch.float32,
            self.device,
            generator,
        )
        if request.image is not None:
            image = self._image_pipeline.video_processor.preprocess(
                request.image.convert("RGB"), height=request.height, width=request.width
            ).to(self.device, dtype=torch.float32)
            prepared = self._image_pipeline.prepare_latents(image, *shape_and_rng)
            if self.spec.expand_timesteps:
                latents, condition, first_frame_mask = prepared
            else:
                latents, condition = prepared
        else:
            latents = pipeline.prepare_latents(*shape_and_rng)

        guided_batch = 2 if self.options.batch_guidance else 1
        embeddings = torch.cat([positive, negative]) if negative is not None and guided_batch == 2 else None
        # The switch between experts happens on the host: decide it once from the schedule, not per step.
        if not self.spec.is_moe:
            high_noise_steps = len(timesteps)
        elif recipe.switch_step is not None:
            high_noise_steps = recipe.switch_step
        else:
            boundary = self.spec.boundary_ratio * scheduler.config.num_train_timesteps
            high_noise_steps = int((timesteps >= boundary).sum().item())
        token_timesteps = None
        if first_frame_mask is not None:
            # TI2V with an image: first-frame tokens are clean (t = 0), the rest follow the schedule.
            token_timesteps = first_frame_mask[0][0][:, ::2, ::2].flatten()

        names = list(self.experts)
        expert_by_step = [
            names[0] if index < high_noise_steps else names[-1] for index in range(len(timesteps))
        ]
        for index, t in enumerate(timesteps):
            name = expert_by_step[index]
            model = self.experts[name]
            guidance = request.guidance_scale if name == names[0] else request.guidance_scale_2
            # The expert after this step's last forward: the next step's, or the next clip's first.
            following = expert_by_step[index + 1] if index + 1 < len(timesteps) else expert_by_step[0]
            if first_frame_mask is not None:
                model_input = (1 - first_frame_mask) * condition + first_frame_mask * latents
                timestep = (token_timesteps * t).unsqueeze(0)
            elif condition is not None:
                model_input = torch.cat([latents, condition], dim=1)
                timestep = t.expand(1)
            else:
                # Text-only TI2V passes one timestep per token, all equal: one value is the same result.
                model_input, timestep = latents, t.expand(1)
            model_input = model_input.to(dtype)
            if guidance == 1.0:
                # No classifier-free guidance: one forward, no unconditional pass.
                self._before_last_forward_of(name, following)
                noise = self._forward_in_context(model, "cond", model_input, timestep, positive)
            elif guided_batch == 2:
                self._before_last_forward_of(name, following)
                with self._cache_context(model, "guided"):
                    noise_both = model(
                        hidden_states=model_input.expand(2, -1, -1, -1, -1),
                        timestep=timestep.expand(2, *timestep.shape[1:]),
                        encoder_hidden_states=embeddings,
                        return_dict=False,
                    )[0]
                noise_cond, noise_uncond = noise_both.chunk(2)
                noise = noise_uncond + guidance * (noise_cond - noise_uncond)
            else:
                noise_cond = self._forward_in_context(model, "cond", model_input, timestep, positive)
                self._before_last_forward_of(name, following)
                noise_uncond = self._forward_in_context(model, "uncond", model_input, timestep, negative)
                noise = noise_uncond + guidance * (noise_cond - noise_uncond)
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]

        if self.step_cached:
            for module in self.experts.values():
                module._reset_stateful_cache()  # the next clip starts its own schedule
        if first_frame_mask is not None:
            latents = (1 - first_frame_mask) * condition + first_frame_mask * latents
        return latents

    def _before_last_forward_of(self, running: str, following: str) -> None:
        """With streamed experts, the next forward is ``running``'s last before ``following`` runs:
        ``following``'s weights (or first blocks) are copied in while it runs (wan_engine.memory)."""
        if self._expert_slot is not None and following != running:
            self._expert_slot.stream_during_next_forward(following)
        if self._block_ring is not None:
            self._block_ring.next_forward_is(following)

    def _cache_context(self, model: torch.nn.Module, name: str) -> AbstractContextManager:
        """The cache hooks keep one state per named call; without them there is nothing to name."""
        return model.cache_context(name) if self.step_cached else nullcontext()

    def _forward_in_context(
        self,
        model: torch.nn.Module,
        name: str,
        model_input: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
    ) -> torch.Tensor:
        with self._cache_context(model, name):
            return model(
                hidden_states=model_input, timestep=timestep, encoder_hidden_states=text, return_dict=False
            )[0]

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Frames as uint8 ``(frames, height, width, 3)`` from final latents."""
        return self.to_frames(self.decode_video(latents))

    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's video, ``(1, 3, frames, height, width)`` in [-1, 1], from final latents.

        A whole-frame decode that runs out of GPU memory (the memory plan's estimate was short: another
        process on the GPU, a larger clip than planned) is retried in tiles, and the VAE tiles from then
        on: the clip is not lost, and the plan records it."""
        try:
            return decode_latents(self.pipeline.vae, latents, self.vae_decode)
        except torch.OutOfMemoryError:
            if self.memory_plan.tile_decode:
                raise
        log.warning("VAE decode out of GPU memory: decoding in tiles from now on model=%s", self.spec.name)
        torch.cuda.empty_cache()
        self.pipeline.vae.enable_tiling()
        self.memory_plan = replace(self.memory_plan, tile_decode=True)
        return decode_latents(self.pipeline.vae, latents, self.vae_decode)

    @staticmethod
    def to_frames(video: torch.Tensor) -> np.ndarray:
        """The hand-back: uint8 frames on the host, rounded as diffusers' postprocessing plus our cast."""
        video = ((video[0].float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return video.permute(1, 2, 3, 0).contiguous().cpu().numpy()


class _StageClock:
    """Seconds between marks on the device's timeline: CUDA events on a GPU (read in :meth:`seconds`, once
    the stream has run past the last mark), the host's clock on a CPU, where the work is synchronous."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, torch.cuda.Event | float]] = [("", self._now())]

    def _now(self) -> torch.cuda.Event | float:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))  # the stream the clip's stages run on
        return event

    def mark(self, stage: str) -> None:
        """The end of ``stage``, which began at the previous mark."""
        self.marks.append((stage, self._now()))

    def seconds(self) -> dict[str, float]:
        if self.cuda:
            self.marks[-1][1].synchronize()  # recorded after the hand-back's copy: already complete
        return {
            stage: start.elapsed_time(end) / 1000 if self.cuda else end - start
            for (_, start), (stage, end) in zip(self.marks, self.marks[1:], strict=False)
        }


def _guided(request: GenerationRequest) -> bool:
    """Whether any expert runs classifier-free guidance (an unconditional pass) for a resolved request."""
    scales = [request.guidance_scale, request.guidance_scale_2]
    return any(scale is not None and scale != 1.0 for scale in scales)


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
