"""A model on a 24 GB card (``--small-card STEPS``): the process held to ``--gpu-memory-gib`` (22 GiB,
what a 24 GB L4, A10G or RTX 4090 leaves a process), the weights starting in host memory.

On one big GPU, for one model, in one process:

1. **resident**: the real-size pipeline (random weights: the compute of real ones) with everything the
   big GPU's memory plan keeps on it; one clip of the first config (``STEPS`` steps, guidance as
   the standard recipe: the expert switch included) for the reference latents and step times;
2. **small card**: the experts and text encoder moved to host memory, the process's share of the GPU
   set, and a generator made as from_pretrained's weights would be (``weights_8bit`` when given:
   quantized in host memory first). Its memory plan is whatever it picks for that budget (24 GB: the
   block ring). Then for every config of this model (480p, 720p), a warm-up at that shape and one
   whole clip, decode included: peak GPU memory (allocated and reserved) through denoising and
   through the decode, step times, the blocks the ring copied as they were needed; at the first
   config the latents against the resident ones (bit for bit in bf16; drift with 8-bit weights), and
   a clip of the 4-step distilled recipe's forwards (4 steps, guidance 1: one forward a step, the
   least compute to hide each copy behind);
3. **bytes moved per step** (one expert's blocks per forward) and what they take over a 24 GB card's
   link: an L4 is PCIe Gen4 x16, 32 GB/s a direction on paper; ``PCIE_GEN4_X16_GBPS`` is what a
   host-to-device copy from pinned memory reaches on such a link.
"""

from __future__ import annotations

import gc
import json
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from bench.common import (
    DEVICE,
    device_name,
    peak_memory_gib,
    peak_reserved_gib,
    relative_error,
    reset_peak_memory,
    sync_time,
    write_result,
)
from bench.real_size import (
    CONFIGS,
    build_components,
    clip_request,
    config_and_spec,
    pipeline_for,
)
from wan_engine import EngineOptions, GenerationRequest, WanGenerator
from wan_engine.memory import weight_bytes

# Pinned host-to-device copies over PCIe Gen4 x16 (32 GB/s raw a direction; ~25 GB/s is what
# cudaMemcpy from pinned memory typically reaches on Gen4 hosts): the figure the implied times use.
PCIE_GEN4_X16_GBPS = 25.0


def _step_times(generator: WanGenerator, request: GenerationRequest) -> dict:
    """One clip of ``request``: latents, step times, peaks, decode."""
    starts: list[float] = []
    handles = [
        module.register_forward_pre_hook(lambda *_: starts.append(sync_time()))
        for module in generator.experts.values()
    ]
    reset_peak_memory()
    with torch.inference_mode():
        resolved = generator.validate(request)
        start = sync_time()
        latents = generator.denoise(resolved)
        denoise_end = sync_time()
        denoise_peak = peak_memory_gib(), peak_reserved_gib()
        reset_peak_memory()
        frames = generator.decode(latents)
        decode_end = sync_time()
    for handle in handles:
        handle.remove()
    marks = [*starts, denoise_end]
    forwards = [round(b - a, 3) for a, b in zip(marks, marks[1:], strict=False)]
    return {
        "latents": latents.float().cpu(),
        "forward_s": forwards,
        "median_forward_s": round(statistics.median(forwards[1:] or forwards), 3),
        "denoise_s": round(denoise_end - start, 2),
        "decode_s": round(decode_end - denoise_end, 2),
        "peak_gib_denoise": round(denoise_peak[0], 2),
        "peak_gib_reserved_denoise": round(denoise_peak[1], 2),
        "peak_gib_decode": round(peak_memory_gib(), 2),
        "peak_gib_reserved_decode": round(peak_reserved_gib(), 2),
        "frames_shape": list(frames.shape),
    }


def _four_step(request: GenerationRequest) -> GenerationRequest:
    """The distilled recipe's forwards without its adapters: 4 steps, guidance 1 (no unconditional pass)."""
    return replace(request, steps=4, guidance_scale=1.0, guidance_scale_2=1.0)


def run(
    config_name: str,
    steps: int,
    out_dir: Path,
    gpu_memory_gib: float,
    weights_8bit: str | None,
    variant: str = "full",
) -> dict:
    """``variant`` tiny: a CPU smoke test of the script, the ring asked for (a CPU has no budget)."""
    config, spec = config_and_spec(config_name, variant)
    on_gpu = DEVICE.type == "cuda"
    sizes = [name for name, c in CONFIGS.items() if c.family == config.family]
    if not on_gpu:
        sizes = [config_name]
    sizes.sort(key=lambda name: name != config_name)  # the named config first
    label = f"{spec.family}-{gpu_memory_gib:g}gib" + (f"-{weights_8bit}-weights" if weights_8bit else "")
    result_path = out_dir / f"engine-small-card-{label}.json"
    result: dict = {
        "model": spec.family,
        "device": device_name(),
        "gpu_memory_gib_allowed": gpu_memory_gib,
        "weights_8bit": weights_8bit,
        "steps_run": steps,
        "pcie_gbps_assumed": PCIE_GEN4_X16_GBPS,
    }
    components = build_components(spec, DEVICE)
    request = clip_request(config, steps)

    # 1. Resident, on the whole GPU.
    resident = WanGenerator(pipeline_for(spec, components), spec, DEVICE, EngineOptions(warmup=False))
    resident.generate(replace(request, steps=resident.warmup_steps()))
    reference = _step_times(resident, request)
    reference_four = _step_times(resident, _four_step(request))
    result["resident"] = {
        "memory_plan": resident.memory_plan.tier,
        **{k: v for k, v in reference.items() if k != "latents"},
        "four_step_median_forward_s": reference_four["median_forward_s"],
        "four_step_denoise_s": reference_four["denoise_s"],
    }
    print("small card: resident", json.dumps(result["resident"]), flush=True)
    del resident
    gc.collect()

    # 2. The same weights in host memory, the process held to a small card's share.
    for name in ("transformer", "transformer_2", "text_encoder"):
        if components[name] is not None:
            components[name].to("cpu")
    if on_gpu:
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(DEVICE).total_memory
        torch.cuda.set_per_process_memory_fraction(gpu_memory_gib * 2**30 / total, DEVICE)
    load_start = sync_time()
    small = WanGenerator(
        pipeline_for(spec, components),
        spec,
        DEVICE,
        EngineOptions(warmup=False, weights_8bit=weights_8bit, block_streaming=None if on_gpu else True),
    )
    ring = small.block_ring
    experts = list(small.experts.values())
    result["small_card"] = {
        "load_s": round(sync_time() - load_start, 1),
        "memory_plan": str(small.memory_plan),
        "mode": small.options.mode,
        "expert_gib": round(weight_bytes(experts[:1]) / 2**30, 2),
        "pinned_host_gib_experts": round(ring.host_bytes / 2**30, 2) if ring else None,
        "pinned_host_gib_text_encoder": round(small.text_encoder_host.host.nbytes / 2**30, 2)
        if small.text_encoder_host
        else None,
        "ring_gpu_gib": round(ring.gpu_bytes / 2**30, 3) if ring else None,
        "sizes": {},
    }
    if ring:
        per_forward = ring.bytes_per_forward()
        result["small_card"] |= {
            "bytes_moved_per_forward_gb": round(per_forward / 1e9, 2),
            "pcie_gen4_s_per_forward": round(per_forward / 1e9 / PCIE_GEN4_X16_GBPS, 3),
        }
    print("small card:", json.dumps(result["small_card"]), flush=True)
    write_result(result, result_path)
    for size in sizes:
        size_request = clip_request(config if size == config_name else CONFIGS[size], steps)
        copied_before = ring.unprefetched_blocks if ring else 0
        small.generate(replace(size_request, steps=small.warmup_steps()))  # compile at this shape
        measured = _step_times(small, size_request)
        entry = {k: v for k, v in measured.items() if k != "latents"}
        if size == config_name:
            ratio = measured["median_forward_s"] / reference["median_forward_s"]
            entry |= {
                "forward_ratio_vs_resident": round(ratio, 3),
                "latents_equal_resident": bool(torch.equal(measured["latents"], reference["latents"])),
                "latents_rel_error_vs_resident": relative_error(measured["latents"], reference["latents"]),
            }
            if weights_8bit:
                entry["drift_note"] = "random weights: the drift on real weights differs; measure it there"
            four = _step_times(small, _four_step(size_request))
            entry |= {
                "four_step_median_forward_s": four["median_forward_s"],
                "four_step_denoise_s": four["denoise_s"],
                "four_step_forward_ratio_vs_resident": round(
                    four["median_forward_s"] / reference_four["median_forward_s"], 3
                ),
                "four_step_peak_gib_denoise": four["peak_gib_denoise"],
            }
        if ring:
            entry["blocks_copied_as_needed"] = ring.unprefetched_blocks - copied_before
        result["small_card"]["sizes"][size] = entry
        print(f"small card: {size}", json.dumps(entry), flush=True)
        write_result(result, result_path)  # kept should the next size not finish
    return result
