"""How far exact mode is from stock, measured against the yardstick of bf16 itself (``--error-study``).

Final latents after ``steps`` steps from: stock diffusers in bf16; ours with batching and
compilation off; ours in its default mode; and a reference, stock diffusers with the same
weights in float32 (TF32 matmuls). Exact mode is within bf16 tolerance when its distance to
the reference is of the order of stock bf16's own.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bench.common import DEVICE, device_name, relative_error, write_result
from bench.real_size import build_components, clip_request, config_and_spec, pipeline_for, stock_call
from wan_engine import EngineOptions, WanGenerator


def run(config_name: str, steps: int, out_dir: Path) -> dict:
    config, spec = config_and_spec(config_name)
    components = build_components(spec, DEVICE)
    request = clip_request(config, steps)

    def stock_latents() -> torch.Tensor:
        return pipeline_for(spec, components)(
            **stock_call(spec, config, steps, request.image),
            generator=torch.Generator("cpu").manual_seed(42),
            output_type="latent",
        ).frames.float()

    attention_backends = set()

    def ours_latents(options: EngineOptions) -> torch.Tensor:
        generator = WanGenerator(pipeline_for(spec, components), spec, DEVICE, options)
        attention_backends.add(generator.attention_backend or "native")
        if options.warmup:
            generator.warm_up()
        with torch.inference_mode():
            return generator.denoise(generator.validate(request)).float()

    stock = stock_latents()
    plain = ours_latents(EngineOptions(batch_guidance=False, compile_blocks=False, warmup=False))
    ours = ours_latents(EngineOptions())
    for name in ("transformer", "transformer_2"):
        if components[name] is not None:
            # The reference is stock diffusers in float32 with its own attention (ours set a bf16 kernel).
            components[name].set_attention_backend("native")
            components[name].float()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    reference = stock_latents()
    result = {
        "config": config_name,
        "steps": steps,
        "device": device_name(),
        "reference": "stock diffusers, same weights in float32, TF32 matmuls",
        "ours_attention_backend": sorted(attention_backends),
        "stock_bf16_vs_reference": relative_error(stock, reference),
        "ours_exact_vs_reference": relative_error(ours, reference),
        "ours_unbatched_uncompiled_vs_reference": relative_error(plain, reference),
        "ours_exact_vs_stock_bf16": relative_error(ours, stock),
        "ours_unbatched_uncompiled_vs_stock_bf16": relative_error(plain, stock),
    }
    write_result(result, out_dir / f"engine-error-{config_name}.json")
    return result
