"""Decoding final latents with the Wan VAEs (2.1 for A14B, 2.2 for TI2V-5B), faster than stock.

diffusers' ``AutoencoderKLWan._decode`` runs its causal decoder one latent frame per call, with a
cache of each causal convolution's last two input frames; the decoder is 3x3x3 convolutions over
full-resolution video (a TI2V-5B 720p clip is ~1.7 PFLOP of them) and the norms between them. What
this module changes, each a field of :class:`VaeDecodeOptions`, none of them the math:

- ``latent_frames_per_call``: the decoder takes several latent frames per call. Causal
  convolutions over a chunk with the previous chunk's last frames in front give what frame-by-frame
  calls give; only the first latent frame must go alone (the decoder treats it apart:
  no temporal upsampling, ``first_chunk``). Larger calls fill the GPU better and take more memory.
- ``autotune``: cuDNN's benchmark mode for the decode only (it times the convolution algorithms at
  each new shape, the warm-up clip's decode included), not a process-wide switch.
- ``channels_last``: the convolution weights and the latents in channels-last layout, the one
  cuDNN's tensor-core kernels read; PyTorch carries it through the decoder.
- ``fused_norm``: the decoder's RMS norms (``F.normalize`` in float32, then three more passes)
  compiled into one kernel (GPU only): the same formula, without the float32 round trips.

Frames from chunked or channels-last decoding match frame-by-frame decoding to float rounding; the
benchmark (``bench.engine --decode-study``) measures each option's time and its distance from a
float32 decode beside stock bf16's own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm, unpatchify
from torch import nn


@dataclass(frozen=True)
class VaeDecodeOptions:
    """How the VAE decodes; the defaults are diffusers' own frame-at-a-time decode."""

    latent_frames_per_call: int = 1
    autotune: bool = False
    channels_last: bool = False
    fused_norm: bool = False

    def __post_init__(self) -> None:
        if self.latent_frames_per_call < 1:
            raise ValueError(f"latent_frames_per_call must be at least 1, got {self.latent_frames_per_call}")

    @property
    def label(self) -> str:
        """``stock``, or the options in use, e.g. ``frames-4+autotune+channels-last`` (benchmarks, logs)."""
        parts = [f"frames-{self.latent_frames_per_call}"] if self.latent_frames_per_call > 1 else []
        parts += [name for name, on in self._flags() if on]
        return "+".join(parts) or "stock"

    def _flags(self) -> tuple[tuple[str, bool], ...]:
        return (
            ("autotune", self.autotune),
            ("channels-last", self.channels_last),
            ("fused-norm", self.fused_norm),
        )


def prepare_vae(vae: AutoencoderKLWan, options: VaeDecodeOptions) -> None:
    """Lay out ``vae``'s weights (and norms) for ``options``, once at load."""
    if options.channels_last:
        for module in vae.modules():
            if isinstance(module, nn.Conv3d):
                module.weight.data = module.weight.data.to(memory_format=torch.channels_last_3d)
            elif isinstance(module, nn.Conv2d):
                module.weight.data = module.weight.data.to(memory_format=torch.channels_last)
    if options.fused_norm:
        for parent in list(vae.decoder.modules()):
            for name, child in parent.named_children():
                if isinstance(child, WanRMS_norm):
                    setattr(parent, name, FusedRMSNorm(child))


def decode_latents(
    vae: AutoencoderKLWan, latents: torch.Tensor, options: VaeDecodeOptions = VaeDecodeOptions()
) -> torch.Tensor:
    """``vae``'s video, ``(1, 3, frames, height, width)`` in [-1, 1], from final latents: cast to the
    VAE's dtype and scaled back by its ``latents_mean`` / ``latents_std`` first, as the pipelines do."""
    latents = latents.to(vae.dtype)
    mean = torch.tensor(vae.config.latents_mean, device=latents.device, dtype=latents.dtype)
    std = torch.tensor(vae.config.latents_std, device=latents.device, dtype=latents.dtype)
    latents = latents * std.view(1, -1, 1, 1, 1) + mean.view(1, -1, 1, 1, 1)
    if options == VaeDecodeOptions() or vae.use_tiling:
        # diffusers' own decode (its tiled one where tiling was asked for: memory over speed).
        return vae.decode(latents, return_dict=False)[0]
    if options.channels_last:
        latents = latents.contiguous(memory_format=torch.channels_last_3d)
    with torch.backends.cudnn.flags(
        enabled=torch.backends.cudnn.enabled,
        benchmark=options.autotune,
        deterministic=torch.backends.cudnn.deterministic,
        allow_tf32=torch.backends.cudnn.allow_tf32,
    ):
        return _decode_in_chunks(vae, latents, options.latent_frames_per_call)


def _decode_in_chunks(vae: AutoencoderKLWan, z: torch.Tensor, frames_per_call: int) -> torch.Tensor:
    """``AutoencoderKLWan._decode`` (diffusers 0.42.1) with ``frames_per_call`` latent frames per
    decoder call after the first frame, which goes alone as there."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    starts = [0, *range(1, x.shape[2], frames_per_call)]
    pieces = []
    for start in starts:
        end = 1 if start == 0 else min(start + frames_per_call, x.shape[2])
        vae._conv_idx = [0]
        pieces.append(
            vae.decoder(
                x[:, :, start:end], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=start == 0
            )
        )
    out = torch.cat(pieces, 2)
    vae.clear_cache()
    if vae.config.patch_size is not None:
        out = unpatchify(out, patch_size=vae.config.patch_size)
    return torch.clamp(out, min=-1.0, max=1.0)


def _channel_rms_norm(
    x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | float, scale: float
) -> torch.Tensor:
    # WanRMS_norm's formula: x / max(||x||_channels, eps) * sqrt(channels) * gamma + bias, in float32.
    normalized = torch.nn.functional.normalize(x.float(), dim=1)
    return (normalized * scale * gamma.float() + bias).to(x.dtype)


@functools.cache
def _compiled_channel_rms_norm() -> Callable[..., torch.Tensor]:
    # One compiled function for every norm of the decoder, made at first use (importing the compiler
    # is not free); shapes marked dynamic, so chunk sizes and resolutions do not each compile anew.
    return torch.compile(_channel_rms_norm, dynamic=True)


class FusedRMSNorm(nn.Module):
    """A decoder ``WanRMS_norm`` (channel-first, per position) computed as one fused kernel on a GPU."""

    def __init__(self, norm: WanRMS_norm) -> None:
        super().__init__()
        if not norm.channel_first:
            raise ValueError("FusedRMSNorm replaces the VAE's channel-first norms only")
        self.gamma = norm.gamma
        self.bias = norm.bias
        self.scale = norm.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = _compiled_channel_rms_norm() if x.is_cuda else _channel_rms_norm
        return norm(x, self.gamma, self.bias, self.scale)
