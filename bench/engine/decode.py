"""The VAE decode alone (``--decode-study``): each of wan_engine.vae's options, its time and its distance.

One real-size VAE of the config's model with random weights, and final latents of the config's clip
(random: a decode costs the same whatever the values). A float32 decode by diffusers is the
reference; stock is diffusers' decode in bf16 (the engine's until this study), and its distance
from the reference is the yardstick: an option is within bf16 tolerance when its distance is of
that order. Each option decodes once untimed (cuDNN's autotuning and the fused norm's compilation
happen there, as in the engine's warm-up clip), then ``repeats`` times timed; the fastest counts.
Peak GPU memory is per option: several latent frames per call trade memory for speed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan

from bench.common import (
    DEVICE,
    device_name,
    peak_memory_gib,
    relative_error,
    reset_peak_memory,
    sync_time,
    write_result,
)
from bench.real_size import config_and_spec
from wan_engine.vae import VaeDecodeOptions, decode_latents, prepare_vae

# Cumulative: each adds one option to the one before, then more latent frames per call.
OPTIONS = (
    VaeDecodeOptions(),
    VaeDecodeOptions(autotune=True),
    VaeDecodeOptions(autotune=True, channels_last=True),
    VaeDecodeOptions(autotune=True, channels_last=True, fused_norm=True),
    VaeDecodeOptions(2, autotune=True, channels_last=True, fused_norm=True),
    VaeDecodeOptions(4, autotune=True, channels_last=True, fused_norm=True),
    VaeDecodeOptions(4, autotune=True),
)


def final_latents_shape(vae: AutoencoderKLWan, width: int, height: int, frames: int) -> tuple[int, ...]:
    return (
        1,
        vae.config.z_dim,
        (frames - 1) // vae.config.scale_factor_temporal + 1,
        height // vae.config.scale_factor_spatial,
        width // vae.config.scale_factor_spatial,
    )


def final_latents(vae: AutoencoderKLWan, width: int, height: int, frames: int) -> torch.Tensor:
    shape = final_latents_shape(vae, width, height, frames)
    return torch.randn(shape, generator=torch.Generator().manual_seed(42)).to(DEVICE)


def decode_pflop(config_name: str) -> float:
    """The floating-point work of the config's decode (diffusers' decode, counted by PyTorch's
    ``FlopCounterMode`` on meta tensors: no memory, no device), in PFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    config, spec = config_and_spec(config_name)
    with torch.device("meta"):
        vae = AutoencoderKLWan(**spec.architecture.vae).requires_grad_(False).eval()
        shape = final_latents_shape(vae, config.width, config.height, config.frames)
        latents = torch.empty(shape)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        vae.decode(latents)
    return counter.get_total_flops() / 1e15


def timed_decode(
    vae: AutoencoderKLWan, latents: torch.Tensor, options: VaeDecodeOptions
) -> tuple[float, torch.Tensor]:
    start = sync_time()
    with torch.inference_mode():
        video = decode_latents(vae, latents, options)
    return sync_time() - start, video


def run(config_name: str, out_dir: Path, variant: str = "full", repeats: int = 2) -> dict:
    config, spec = config_and_spec(config_name, variant)
    torch.manual_seed(0)
    with DEVICE:
        vae_fp32 = AutoencoderKLWan(**spec.architecture.vae).requires_grad_(False).eval()
    latents = final_latents(vae_fp32, config.width, config.height, config.frames)
    reference_s, reference = timed_decode(vae_fp32, latents, VaeDecodeOptions())
    reference = reference.float().cpu()
    vae_bf16 = copy.deepcopy(vae_fp32).to(torch.bfloat16)
    del vae_fp32
    result = {
        "config": config_name,
        "device": device_name(),
        "torch": torch.__version__,
        "latents_shape": list(latents.shape),
        "reference": "diffusers' decode in float32 (the stock loop, one latent frame per call)",
        "reference_decode_s": round(reference_s, 3),
        "repeats": repeats,
        "options": [],
    }
    path = out_dir / f"engine-decode-{config_name}.json"
    stock_s = None
    for options in OPTIONS:
        vae = copy.deepcopy(vae_bf16)
        entry: dict = {"label": options.label, "options": vars(options).copy()}
        try:
            prepare_vae(vae, options)
            reset_peak_memory()
            warm_s, _ = timed_decode(vae, latents, options)
            times = []
            for _ in range(repeats):
                seconds, video = timed_decode(vae, latents, options)
                times.append(seconds)
            entry |= {
                "first_decode_s": round(warm_s, 3),
                "decode_s": round(min(times), 3),
                "decode_times_s": [round(t, 3) for t in times],
                "peak_gib": round(peak_memory_gib(), 2),
                "video_rel_error_vs_reference": relative_error(video.float().cpu(), reference),
            }
            stock_s = stock_s or entry["decode_s"]
            entry["speedup_vs_stock"] = round(stock_s / entry["decode_s"], 3)
        except Exception as error:  # one option failing (an OOM, a compile) must not stop the rest
            entry["error"] = f"{type(error).__name__}: {error}"[:500]
        print(entry, flush=True)
        result["options"].append(entry)
        del vae
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
        path.parent.mkdir(parents=True, exist_ok=True)
        # Kept as it grows: a later option may crash the process.
        path.write_text(json.dumps(result, indent=1))
    write_result(result, path)
    return result
