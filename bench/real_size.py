"""Real-size Wan2.2 pipelines with random weights (the compute of real weights), and the clips the
engine benchmarks run on them: the config table, the request, stock diffusers' call of the same clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel
from PIL import Image
from transformers import UMT5Config, UMT5EncoderModel

from bench.common import sync_time
from wan_engine import GenerationRequest, get_model_spec
from wan_engine.random_weights import build_tokenizer

if TYPE_CHECKING:
    from wan_engine import WanGenerator
    from wan_engine.specs import ModelSpec


@dataclass(frozen=True)
class Config:
    family: str
    width: int
    height: int
    frames: int


CONFIGS = {
    "ti2v5b_720p": Config("ti2v-5b", 1280, 704, 121),
    "a14b_t2v_480p": Config("t2v-a14b", 832, 480, 81),
    "a14b_t2v_720p": Config("t2v-a14b", 1280, 720, 81),
    "a14b_i2v_480p": Config("i2v-a14b", 832, 480, 81),
    "a14b_i2v_720p": Config("i2v-a14b", 1280, 720, 81),
}
PROMPT = "A red knit sneaker turns slowly on a turntable, soft studio light, white backdrop."


def config_and_spec(config_name: str, variant: str = "full") -> tuple[Config, ModelSpec]:
    """A config and its model; the tiny variant (a CPU smoke test) at the tiny model's own size."""
    config = CONFIGS[config_name]
    spec = get_model_spec(config.family, variant)
    if variant == "tiny":
        config = Config(config.family, *spec.default_size, spec.num_frames)
    return config, spec


def conditioning_image(config: Config) -> Image.Image:
    """A fixed product-like image for image-to-video configs (smooth gradients, not noise)."""
    y, x = np.mgrid[0 : config.height, 0 : config.width]
    pixels = np.stack([x * 255 // config.width, y * 255 // config.height, (x + y) * 127 // config.width], -1)
    return Image.fromarray(pixels.astype(np.uint8))


def clip_request(config: Config, steps: int, prompt: str = PROMPT, seed: int = 42) -> GenerationRequest:
    image = conditioning_image(config) if get_model_spec(config.family).requires_image else None
    return GenerationRequest(
        prompt=prompt,
        seed=seed,
        width=config.width,
        height=config.height,
        num_frames=config.frames,
        steps=steps,
        image=image,
    )


def stock_call(spec: ModelSpec, config: Config, steps: int, image: Image.Image | None) -> dict:
    """The keyword arguments of stock diffusers' call for the clip of :func:`clip_request`."""
    call = {
        "prompt": PROMPT,
        "negative_prompt": spec.negative_prompt,
        "height": config.height,
        "width": config.width,
        "num_frames": config.frames,
        "num_inference_steps": steps,
        "guidance_scale": spec.guidance_scale,
        "max_sequence_length": spec.max_sequence_length,
    }
    if spec.is_moe:
        call["guidance_scale_2"] = spec.guidance_scale_2
    if image is not None:
        call["image"] = image
    return call


def pipeline_for(spec: ModelSpec, components: dict) -> WanPipeline | WanImageToVideoPipeline:
    """The stock diffusers pipeline of ``spec`` over ``components``."""
    if spec.pipeline_class == "WanImageToVideoPipeline":
        return WanImageToVideoPipeline(**components, image_encoder=None, image_processor=None)
    return WanPipeline(**components)


def build_components(spec: ModelSpec, device: torch.device) -> dict:
    """Real-size components with random weights, made directly on ``device`` in their serving dtypes."""
    arch = spec.architecture
    torch.manual_seed(0)
    with device:
        vae = AutoencoderKLWan(**arch.vae)
        # Made in bf16 directly: two 14B experts made in float32 first would not fit on 80 GB.
        torch.set_default_dtype(torch.bfloat16)
        try:
            text_encoder = UMT5EncoderModel(UMT5Config(**arch.text_encoder))
            experts = [WanTransformer3DModel(**arch.transformer) for _ in range(2 if spec.is_moe else 1)]
        finally:
            torch.set_default_dtype(torch.float32)
        for model in (vae, text_encoder, *experts):
            # Inference, as from_pretrained leaves a model: no autograd, and no dropout (umT5's is 0.1).
            model.requires_grad_(False).eval()
        for model in experts:
            # As from_pretrained(torch_dtype=bf16) does: these stay float32.
            for name, module in model.named_modules():
                if any(part in model._keep_in_fp32_modules for part in name.split(".")):
                    module.float()
    from diffusers import UniPCMultistepScheduler

    return {
        "tokenizer": build_tokenizer(arch.text_encoder["vocab_size"]),
        "text_encoder": text_encoder,
        "vae": vae,
        "scheduler": UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=spec.flow_shift
        ),
        "transformer": experts[0],
        "transformer_2": experts[1] if spec.is_moe else None,
        "boundary_ratio": spec.boundary_ratio,
        "expand_timesteps": spec.expand_timesteps,
    }


def latent_grid(spec: ModelSpec, config: Config) -> tuple[int, int, int]:
    """(frames, height, width) of a clip's latents: the 2.2 VAE compresses 16x in space, the 2.1 VAE 8x."""
    spatial = 16 if spec.expand_timesteps else 8
    return (config.frames - 1) // 4 + 1, config.height // spatial, config.width // spatial


def random_transformer_inputs(
    spec: ModelSpec, config: Config, batch: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """One transformer forward's inputs at the clip's size: random latents and text, timestep 500."""
    latent = torch.randn(
        batch,
        spec.architecture.transformer["in_channels"],
        *latent_grid(spec, config),
        device=device,
        dtype=torch.bfloat16,
    )
    text_dim = spec.architecture.transformer["text_dim"]
    return {
        "hidden_states": latent,
        "timestep": torch.full((batch,), 500.0, device=device),
        "encoder_hidden_states": torch.randn(batch, 512, text_dim, device=device, dtype=torch.bfloat16),
    }


def forward_flops(spec: ModelSpec, config: Config, text_tokens: int = 512) -> float:
    """Matmul FLOPs of one transformer forward for one sample (attention included)."""
    arch = spec.architecture.transformer
    dim = arch["num_attention_heads"] * arch["attention_head_dim"]
    frames, height, width = latent_grid(spec, config)
    tokens = frames * (height // 2) * (width // 2)
    linear = 12 * tokens * dim * dim + 4 * text_tokens * dim * dim  # q,k,v,o self; q,o cross; k,v of text
    ffn = 4 * tokens * dim * arch["ffn_dim"]
    attention = 4 * tokens * tokens * dim + 4 * tokens * text_tokens * dim
    return arch["num_layers"] * (linear + ffn + attention)


def time_encode_and_denoise(
    generator: WanGenerator, request: GenerationRequest
) -> tuple[torch.Tensor, float, float]:
    """(final latents, encode seconds, denoise seconds) of a resolved request.

    ``denoise`` encodes the prompt itself (the negative one from cache), so the loop's own time is
    its time less a separately timed encoding.
    """
    t0 = sync_time()
    generator.encode_prompts(request)
    encode_s = sync_time() - t0
    t0 = sync_time()
    latents = generator.denoise(request)
    return latents, encode_s, sync_time() - t0 - encode_s
