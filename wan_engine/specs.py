"""What each Wan2.2 model is and how it is run by default: configs as data.

The defaults are the official ones from Wan-Video/Wan2.2 ``wan/configs``. Each model
also has a ``tiny`` variant: the same pipeline classes and the same denoising recipe
(steps, guidance, flow shift, expert boundary) over components a few thousand
parameters big, so that the whole path runs on a CPU. Tiny variants only differ in
architecture sizes and in the clip sizes and frame counts they allow.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

# Wan2.2's own default negative prompt (wan/configs/shared_config.py).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

Task = Literal["t2v", "i2v", "ti2v"]
Variant = Literal["full", "tiny"]
MODEL_FAMILIES = ("t2v-a14b", "i2v-a14b", "ti2v-5b")


@dataclass(frozen=True)
class Architecture:
    """Constructor arguments of each component; used to build random-weight pipelines."""

    transformer: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]


@dataclass(frozen=True)
class ModelSpec:
    """One Wan2.2 model (a family at a variant) and its official generation defaults."""

    family: str
    variant: Variant
    folder: str  # the diffusers folder name under the model root
    task: Task
    pipeline_class: str
    boundary_ratio: float | None  # None for a dense model; else the high/low-noise expert switch
    expand_timesteps: bool  # TI2V-5B's per-token timesteps
    steps: int
    guidance_scale: float  # the high-noise expert's (or the dense model's) guidance
    guidance_scale_2: float | None  # the low-noise expert's guidance
    flow_shift: float
    fps: int
    num_frames: int
    sizes: tuple[tuple[int, int], ...]  # allowed (width, height); the first is the default
    architecture: Architecture
    # GPU memory of the VAE's decode per output pixel of one frame, weights included: it decodes a latent
    # frame per call, so the peak grows with the frame's size, not the clip's length. Measured peaks at
    # 720p (bench.engine --decode-study, H100, 2026-12-06): 11.3 GiB for the 2.1 VAE at 1280x720 and
    # 12.9 GiB for the 2.2 VAE at 1280x704, rounded up. The memory plan tiles the decode past it.
    vae_decode_bytes_per_pixel: int
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    max_frames: int = 121
    max_sequence_length: int = 512

    @property
    def name(self) -> str:
        return self.family if self.variant == "full" else f"{self.family}-{self.variant}"

    @property
    def is_moe(self) -> bool:
        return self.boundary_ratio is not None

    @property
    def requires_image(self) -> bool:
        return self.task == "i2v"

    @property
    def accepts_image(self) -> bool:
        return self.task in ("i2v", "ti2v")

    @property
    def default_size(self) -> tuple[int, int]:
        return self.sizes[0]


def _a14b_transformer(in_channels: int) -> dict[str, Any]:
    return {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 40,
        "attention_head_dim": 128,
        "in_channels": in_channels,
        "out_channels": 16,
        "text_dim": 4096,
        "freq_dim": 256,
        "ffn_dim": 13824,
        "num_layers": 40,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "rope_max_seq_len": 1024,
    }


# umT5-XXL encoder, as shipped with every Wan2.2 model.
_UMT5_XXL = {
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_gated_act": True,
}
_WAN21_VAE = {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2}
# 11.3 GiB / (1280 x 720) and 12.9 GiB / (1280 x 704), rounded up (ModelSpec.vae_decode_bytes_per_pixel).
_WAN21_VAE_DECODE_BYTES_PER_PIXEL = 13_500
_WAN22_VAE_DECODE_BYTES_PER_PIXEL = 15_500
_WAN22_VAE = {
    "base_dim": 160,
    "decoder_base_dim": 256,
    "z_dim": 48,
    "in_channels": 12,
    "out_channels": 12,
    "is_residual": True,
    "patch_size": 2,
    "scale_factor_spatial": 16,
    "scale_factor_temporal": 4,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    # Real weights carry their own statistics; random weights only need the right shapes.
    "latents_mean": [0.0] * 48,
    "latents_std": [1.0] * 48,
}

_A14B_SIZES = ((1280, 720), (720, 1280), (832, 480), (480, 832))

T2V_A14B = ModelSpec(
    family="t2v-a14b",
    variant="full",
    folder="Wan2.2-T2V-A14B-Diffusers",
    task="t2v",
    pipeline_class="WanPipeline",
    boundary_ratio=0.875,
    expand_timesteps=False,
    steps=40,
    guidance_scale=4.0,
    guidance_scale_2=3.0,
    flow_shift=12.0,
    fps=16,
    num_frames=81,
    sizes=_A14B_SIZES,
    architecture=Architecture(_a14b_transformer(16), _WAN21_VAE, _UMT5_XXL),
    vae_decode_bytes_per_pixel=_WAN21_VAE_DECODE_BYTES_PER_PIXEL,
    max_frames=81,
)

I2V_A14B = ModelSpec(
    family="i2v-a14b",
    variant="full",
    folder="Wan2.2-I2V-A14B-Diffusers",
    task="i2v",
    pipeline_class="WanImageToVideoPipeline",
    boundary_ratio=0.9,
    expand_timesteps=False,
    steps=40,
    guidance_scale=3.5,
    guidance_scale_2=3.5,
    flow_shift=5.0,
    fps=16,
    num_frames=81,
    sizes=_A14B_SIZES,
    # 16 noise channels + 4 mask channels + 16 channels of the encoded first frame.
    architecture=Architecture(_a14b_transformer(36), _WAN21_VAE, _UMT5_XXL),
    vae_decode_bytes_per_pixel=_WAN21_VAE_DECODE_BYTES_PER_PIXEL,
    max_frames=81,
)

TI2V_5B = ModelSpec(
    family="ti2v-5b",
    variant="full",
    folder="Wan2.2-TI2V-5B-Diffusers",
    task="ti2v",
    pipeline_class="WanPipeline",
    boundary_ratio=None,
    expand_timesteps=True,
    steps=50,
    guidance_scale=5.0,
    guidance_scale_2=None,
    flow_shift=5.0,
    fps=24,
    num_frames=121,
    sizes=((1280, 704), (704, 1280)),
    architecture=Architecture(
        {
            "patch_size": (1, 2, 2),
            "num_attention_heads": 24,
            "attention_head_dim": 128,
            "in_channels": 48,
            "out_channels": 48,
            "text_dim": 4096,
            "freq_dim": 256,
            "ffn_dim": 14336,
            "num_layers": 30,
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "eps": 1e-6,
            "rope_max_seq_len": 1024,
        },
        _WAN22_VAE,
        _UMT5_XXL,
    ),
    vae_decode_bytes_per_pixel=_WAN22_VAE_DECODE_BYTES_PER_PIXEL,
)

# Tiny components follow diffusers' own Wan2.2 fast tests (2 layers, 2 heads of 12, VAE base_dim 3).
_TINY_TEXT_ENCODER = {
    "vocab_size": 256,
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_gated_act": True,
}
_TINY_TRANSFORMER = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "text_dim": 32,
    "freq_dim": 256,
    "ffn_dim": 32,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 32,
}
_TINY_WAN21_VAE = {
    "base_dim": 3,
    "z_dim": 16,
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
}
_TINY_WAN22_VAE = {
    **_WAN22_VAE,
    "base_dim": 3,
    "decoder_base_dim": None,
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
}
_TINY_A14B_SIZES = ((96, 64), (64, 96), (64, 64))


def _tiny(spec: ModelSpec, architecture: Architecture, sizes: tuple[tuple[int, int], ...]) -> ModelSpec:
    return replace(
        spec,
        variant="tiny",
        architecture=architecture,
        sizes=sizes,
        num_frames=17,
        max_frames=33,
        max_sequence_length=64,
    )


MODEL_SPECS: dict[tuple[str, Variant], ModelSpec] = {
    (spec.family, spec.variant): spec
    for spec in (
        T2V_A14B,
        I2V_A14B,
        TI2V_5B,
        _tiny(
            T2V_A14B,
            Architecture(
                {**_TINY_TRANSFORMER, "in_channels": 16, "out_channels": 16},
                _TINY_WAN21_VAE,
                _TINY_TEXT_ENCODER,
            ),
            _TINY_A14B_SIZES,
        ),
        _tiny(
            I2V_A14B,
            Architecture(
                {**_TINY_TRANSFORMER, "in_channels": 36, "out_channels": 16},
                _TINY_WAN21_VAE,
                _TINY_TEXT_ENCODER,
            ),
            _TINY_A14B_SIZES,
        ),
        _tiny(
            TI2V_5B,
            Architecture(
                {**_TINY_TRANSFORMER, "in_channels": 48, "out_channels": 48},
                _TINY_WAN22_VAE,
                _TINY_TEXT_ENCODER,
            ),
            ((96, 64), (64, 96)),
        ),
    )
}


class UnknownModelError(KeyError):
    """The model family or variant is not one wanfactory knows."""

    def __str__(self) -> str:
        return str(self.args[0])


def get_model_spec(family: str, variant: Variant = "full") -> ModelSpec:
    """The spec of a model family ('t2v-a14b', 'i2v-a14b', 'ti2v-5b') at a variant."""
    try:
        return MODEL_SPECS[(family, variant)]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {family!r} (variant {variant!r}); known: {', '.join(MODEL_FAMILIES)}"
        ) from None
