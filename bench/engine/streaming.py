"""Are streamed experts bitwise the resident ones? (``--streaming-check``)

One generator runs the same clip twice with both experts resident (is a GPU run repeatable at
all?), then twice with the same weights moved into an ExpertSlot (``WanGenerator.stream_experts``),
streamed at each switch.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from bench.common import DEVICE, device_name, relative_error, write_result
from bench.real_size import build_components, clip_request, config_and_spec, pipeline_for
from wan_engine import EngineOptions, WanGenerator


def run(config_name: str, steps: int, out_dir: Path) -> dict:
    config, spec = config_and_spec(config_name)
    generator = WanGenerator(
        pipeline_for(spec, build_components(spec, DEVICE)), spec, DEVICE, EngineOptions()
    )
    request = clip_request(config, steps)
    generator.generate(replace(request, steps=generator.warmup_steps()))  # compile at this size

    def latents() -> torch.Tensor:
        with torch.inference_mode():
            return generator.denoise(generator.validate(request))

    resident = [latents(), latents()]
    result = {
        "config": config_name,
        "device": device_name(),
        "steps_run": steps,
        "resident_repeat_equal": bool(torch.equal(*resident)),
        "resident_repeat_rel_error": relative_error(resident[1], resident[0]),
    }
    print(json.dumps(result), flush=True)
    generator.stream_experts()
    streamed = [latents(), latents()]
    result |= {
        "streamed_repeat_equal": bool(torch.equal(*streamed)),
        "streamed_equal_resident": bool(torch.equal(streamed[0], resident[0])),
        "streamed_vs_resident_rel_error": relative_error(streamed[0], resident[0]),
    }
    write_result(result, out_dir / f"engine-streaming-{config_name}.json")
    return result
