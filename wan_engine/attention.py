"""Which attention kernel the transformers run, and the Hopper kernel the engine supplies itself.

Attention is over half of a Wan2.2 forward's FLOPs at production sizes (27k-33k tokens), and
PyTorch's SDPA kernels are FlashAttention-2-class: on an H100/H200 they reach well under the tensor
cores' rate, while the linear layers run near it. FlashAttention's CuTe-DSL kernels
(``flash_attn.cute``, "FA4", written for Hopper's warpgroup MMA and TMA and for Blackwell) close
most of that gap. diffusers runs them as its ``flash_4_hub`` backend, whose kernel it normally
fetches from the Hugging Face Hub; a GPU fleet without the Hub (air-gapped, or every worker
fetching at start) installs ``flash_attn.cute`` locally instead, and :func:`supply_local_flash_attention`
hands that to diffusers so no fetch happens.

``"auto"`` (the engine's default) picks that kernel when it is installed and the GPU is a Hopper or
Blackwell, else PyTorch's SDPA. The kernel computes the same softmax attention as SDPA, only in a
different order of bf16/fp32 accumulation: exact mode's equivalence to stock diffusers holds.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

log = logging.getLogger(__name__)

AUTO = "auto"
FLASH_ATTENTION_BACKEND = "flash_4_hub"  # diffusers' name for FlashAttention's CuTe-DSL kernels
# Compute capabilities (major) that flash_attn.cute's forward kernels are written for: Hopper, Blackwell.
FLASH_ATTENTION_CAPABILITIES = (9, 10)


def resolve_attention_backend(
    requested: str | None, device: torch.device, context_parallel: bool = False
) -> str | None:
    """The diffusers attention backend to set on the transformers, or None for PyTorch's SDPA.

    ``"auto"`` is the fastest one that runs here; any other name is taken as asked, and
    ``flash_4_hub`` is supplied from the local installation when there is one. Under context
    parallelism ``"auto"`` keeps SDPA: diffusers' ``flash_4_hub`` cannot split attention across GPUs.
    """
    if requested == AUTO:
        if not context_parallel and local_flash_attention_runs_on(device):
            supply_local_flash_attention()
            return FLASH_ATTENTION_BACKEND
        return None
    if requested == FLASH_ATTENTION_BACKEND and local_flash_attention_installed():
        supply_local_flash_attention()
    return requested


def local_flash_attention_installed() -> bool:
    """Whether ``flash_attn.cute`` and the ``kernels`` package diffusers checks for are importable."""
    return all(_importable(name) for name in ("flash_attn.cute", "kernels"))


def local_flash_attention_runs_on(device: torch.device) -> bool:
    if device.type != "cuda" or not local_flash_attention_installed():
        return False
    return torch.cuda.get_device_capability(device)[0] in FLASH_ATTENTION_CAPABILITIES


def supply_local_flash_attention() -> None:
    """Give diffusers' ``flash_4_hub`` backend the locally installed kernel instead of a Hub download."""
    from diffusers.models.attention_dispatch import _HUB_KERNELS_REGISTRY, AttentionBackendName

    config = _HUB_KERNELS_REGISTRY[AttentionBackendName.FLASH_4_HUB]
    if config.kernel_fn is not flash_attention:
        config.kernel_fn = flash_attention
        log.info("attention: flash_attn.cute supplied to diffusers' %s backend", FLASH_ATTENTION_BACKEND)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Softmax attention over ``(batch, tokens, heads, head_dim)`` tensors, called the way diffusers'
    ``flash_4_hub`` backend calls its kernel."""
    if causal:
        raise ValueError(
            "Wan2.2's attention is not causal; the local flash attention kernel runs non-causal only"
        )
    return _flash_attention_forward(q, k, v, softmax_scale)


# A custom op, so that torch.compile keeps the kernel (which it cannot trace: it is compiled by the
# CuTe DSL at its first call) as one opaque node inside the compiled transformer blocks.
@torch.library.custom_op("wan_engine::flash_attention_forward", mutates_args=())
def _flash_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None
) -> torch.Tensor:
    from flash_attn.cute.interface import _flash_attn_fwd

    out, _ = _flash_attn_fwd(q, k, v, softmax_scale=softmax_scale)
    return out


@_flash_attention_forward.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False
