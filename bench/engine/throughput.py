"""Does putting several clips in one forward raise clips per hour? (``--throughput``)

A step of one clip is one forward of batch 2 (conditional and unconditional); of two clips,
batch 4. The compiled transformer is timed on real-size inputs, median of three, per-clip step
time by batch.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from bench.common import DEVICE, device_name, sync_time, write_result
from bench.real_size import build_components, config_and_spec, random_transformer_inputs


def run(config_name: str, out_dir: Path, clips_per_forward: tuple[int, ...] = (1, 2)) -> dict:
    config, spec = config_and_spec(config_name)
    model = build_components(spec, DEVICE)["transformer"]
    model.compile_repeated_blocks(fullgraph=True)
    per_clip_step = {}
    with torch.inference_mode():
        for clips in clips_per_forward:
            inputs = random_transformer_inputs(spec, config, 2 * clips, DEVICE)
            times = []
            for _ in range(4):
                start = sync_time()
                model(**inputs, return_dict=False)
                times.append(sync_time() - start)
            per_clip_step[clips] = statistics.median(times[1:]) / clips
    result = {
        "config": config_name,
        "device": device_name(),
        "per_clip_step_s": {str(k): round(v, 3) for k, v in per_clip_step.items()},
        "denoise_clips_per_hour": {
            str(k): round(3600 / (v * spec.steps), 2) for k, v in per_clip_step.items()
        },
    }
    write_result(result, out_dir / f"engine-throughput-{config_name}.json")
    return result
