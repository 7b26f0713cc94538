"""Ours alone, in its default memory policy (``--memory-check``): peak memory through denoising and
decode, step times on both sides of the expert switch, and what the text encoder's round trip to the
host costs.

With ``gpu_memory_gib`` this process may use only that much of the GPU, as on a smaller card, and
the weights start in host memory, as from_pretrained leaves them: the policy picks what fits. When
it streams the experts, the same clip is run again with every switch a whole copy instead, for
the cost that streaming hides and to check that both give the same latents.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from bench.common import (
    DEVICE,
    device_name,
    peak_memory_gib,
    relative_error,
    reset_peak_memory,
    sync_time,
    write_result,
)
from bench.real_size import (
    build_components,
    clip_request,
    config_and_spec,
    pipeline_for,
    time_encode_and_denoise,
)
from wan_engine import EngineOptions, WanGenerator
from wan_engine.memory import weight_bytes


def run(config_name: str, steps: int, out_dir: Path, gpu_memory_gib: float | None = None) -> dict:
    config, spec = config_and_spec(config_name)
    components = build_components(spec, DEVICE)
    if gpu_memory_gib:
        for name in ("transformer", "transformer_2", "text_encoder"):
            if components[name] is not None:
                components[name].to("cpu")
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(DEVICE).total_memory
        torch.cuda.set_per_process_memory_fraction(gpu_memory_gib * 2**30 / total)
        print(f"memory check: weights in host memory, {gpu_memory_gib} GiB of the GPU allowed", flush=True)
    load_start = sync_time()
    generator = WanGenerator(pipeline_for(spec, components), spec, DEVICE, EngineOptions())
    load_s = sync_time() - load_start
    print(f"memory check: {generator.memory_plan} in {load_s:.1f} s", flush=True)
    request = clip_request(config, steps)
    generator.generate(replace(request, steps=generator.warmup_steps()))  # compile at this size
    print("memory check: warmed up", flush=True)
    calls: list[tuple[str, float]] = []
    for name, module in generator.experts.items():
        module.register_forward_pre_hook(lambda *_, name=name: calls.append((name, sync_time())))

    def clip() -> tuple[torch.Tensor, dict]:
        calls.clear()
        reset_peak_memory()
        with torch.inference_mode():
            latents, encode_s, _ = time_encode_and_denoise(generator, generator.validate(request))
            denoise_end = sync_time()
            denoise_peak = peak_memory_gib()
            frames = generator.decode(latents)
            decode_s = sync_time() - denoise_end
        step_starts = [t for _, t in calls] + [denoise_end]
        steps_s = [round(b - a, 3) for a, b in zip(step_starts, step_starts[1:], strict=False)]
        experts = [name for name, _ in calls]
        switch = next((i for i, name in enumerate(experts) if name != experts[0]), None)
        steady = statistics.median(steps_s[1:]) if len(steps_s) > 2 else steps_s[0]
        # Where the switch's wait lands (the step before or the one after it) depends on the streams.
        switch_extra = steps_s[switch - 1] + steps_s[switch] - 2 * steady if switch else None
        return latents, {
            "encode_s_with_text_encoder_round_trip": round(encode_s, 2),
            "step_s": steps_s,
            "experts_by_step": experts,
            "switch_extra_s": None if switch_extra is None else round(switch_extra, 3),
            "decode_s": round(decode_s, 2),
            "peak_gib_denoise": round(denoise_peak, 1),
            "peak_gib_with_decode": round(peak_memory_gib(), 1),
            "frames_shape": list(frames.shape),
        }

    latents, measured = clip()
    result = {
        "config": config_name,
        "device": device_name(),
        "gpu_total_gib": round(torch.cuda.get_device_properties(DEVICE).total_memory / 2**30, 1),
        "gpu_memory_gib_allowed": gpu_memory_gib,
        "load_s": round(load_s, 1),
        "steps_run": steps,
        "experts_streamed": generator.memory_plan.stream_experts,
        "text_encoder_offloaded": generator.memory_plan.offload_text_encoder,
        **measured,
    }
    suffix = f"-{gpu_memory_gib:g}gib" if gpu_memory_gib else ""
    result_path = out_dir / f"engine-memory-{config_name}{suffix}.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=1))  # kept should the rest not finish
    slot = generator.expert_slot
    if slot is not None:
        # For scale: one whole expert copied from pinned host memory, nothing to overlap with.
        start = sync_time()
        slot.copy_whole("low_noise")
        result["whole_expert_copy_s"] = round(sync_time() - start, 3)
        result["expert_gib"] = round(weight_bytes([generator.experts["low_noise"]]) / 2**30, 1)
        # The same clip with every switch a whole copy before the expert runs (nothing streamed).
        slot.streaming = False
        reference, unstreamed = clip()
        result["switch_extra_s_whole_copy"] = unstreamed["switch_extra_s"]
        result["streamed_latents_equal_whole_copy"] = bool(torch.equal(latents, reference))
        result["streamed_vs_whole_copy_rel_error"] = relative_error(latents, reference)
    write_result(result, result_path)
    return result
