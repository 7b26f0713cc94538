"""The opt-in approximate modes against exact mode (``--approximate``): whole clips, same weights,
seed and inputs.

Exact runs first: FP8 quantizes the shared experts in place, so the FP8 modes come last. Drift
is the relative L2 distance of final latents and decoded frames from exact mode's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench.common import DEVICE, device_name, frames_error, relative_error, sync_time, write_result
from bench.real_size import (
    build_components,
    clip_request,
    config_and_spec,
    pipeline_for,
    time_encode_and_denoise,
)
from wan_engine import EngineOptions, WanGenerator

MODES = {
    "exact": EngineOptions(),
    "step-cache-3": EngineOptions(step_cache_interval=3),
    "fp8": EngineOptions(fp8_matmuls=True),
    "step-cache-3+fp8": EngineOptions(step_cache_interval=3, fp8_matmuls=True),
}


def run(config_name: str, out_dir: Path, variant: str = "full", mode_names: list[str] | None = None) -> dict:
    config, spec = config_and_spec(config_name, variant)
    components = build_components(spec, DEVICE)
    request = clip_request(config, spec.steps)
    modes, exact = {}, None
    # Exact always runs first: it is what the other modes' speed and drift are measured against.
    chosen = {name: MODES[name] for name in ["exact", *(mode_names or MODES)]}
    for mode, options in chosen.items():
        if options.fp8_matmuls and DEVICE.type != "cuda":
            continue
        generator = WanGenerator(pipeline_for(spec, components), spec, DEVICE, options)
        generator.warm_up()
        with torch.inference_mode():
            resolved = generator.validate(request)
            start = sync_time()
            latents, encode_s, denoise_s = time_encode_and_denoise(generator, resolved)
            frames = generator.decode(latents)
            clip_s = sync_time() - start
        if exact is None:
            exact = (latents.float(), frames, clip_s)
        modes[mode] = {
            "mode_label": options.mode,
            "clip_s": round(clip_s, 2),
            "denoise_s": round(denoise_s, 2),
            "speedup_vs_exact": round(exact[2] / clip_s, 3),
            "latents_rel_drift_vs_exact": round(relative_error(latents.float(), exact[0]), 4),
            "frames_rel_drift_vs_exact": round(frames_error(frames, exact[1]), 4),
        }
        print(mode, json.dumps(modes[mode]), flush=True)
        for module in generator.experts.values():
            if generator.step_cached:
                module.disable_cache()
    result = {
        "config": config_name,
        "device": device_name(),
        "steps": spec.steps,
        "drift_note": "random weights: drift on real weights differs; measure on real weights before use",
        "modes": modes,
    }
    write_result(result, out_dir / f"engine-approximate-{config_name}.json")
    return result
