"""Stock diffusers against ``WanGenerator`` on one clip, side by side (``python -m bench.engine``'s default).

For one config it builds the real-size pipeline once (random weights: the compute of real weights), then:

1. measures the bf16 matmul rate of this GPU (8192^3, median of timed products);
2. times each attention backend on one transformer forward and keeps the fastest for ours;
3. runs one clip through stock diffusers (``WanPipeline.__call__``) and one through
   ``WanGenerator`` (exact mode), same seed and inputs, timing text encoding, denoising,
   VAE decode and the hand-back of frames, and peak GPU memory;
4. compares final latents and decoded frames (relative L2 error of ours against stock);
5. reports the denoising loop's achieved TFLOP/s against the measured matmul rate.

With ``steps`` below the config's step count the denoising time is measured over that many steps
and scaled to the full count (every step costs the same); the output says so.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import WanTransformer3DModel

from bench.common import (
    DEVICE,
    device_name,
    frames_error,
    matmul_tflops,
    peak_memory_gib,
    relative_error,
    reset_peak_memory,
    sync_time,
    write_result,
)
from bench.real_size import (
    PROMPT,
    Config,
    build_components,
    clip_request,
    config_and_spec,
    forward_flops,
    pipeline_for,
    random_transformer_inputs,
    stock_call,
    time_encode_and_denoise,
)
from wan_engine import EngineOptions, WanGenerator
from wan_engine.attention import FLASH_ATTENTION_BACKEND, resolve_attention_backend
from wan_engine.memory import gpu_memory_budget, plan_memory
from wan_engine.specs import ModelSpec
from wan_engine.vae import decode_latents

# flash_4_hub: FlashAttention's CuTe-DSL kernel, when flash_attn.cute is installed (wan_engine.attention).
ATTENTION_BACKENDS = (
    "native",
    "_native_cudnn",
    "_native_flash",
    "_native_efficient",
    FLASH_ATTENTION_BACKEND,
)


def time_attention_backends(
    model: WanTransformer3DModel, spec: ModelSpec, config: Config
) -> dict[str, float]:
    """Seconds of one forward of ``model`` at the clip's size per attention backend this machine has."""
    inputs = random_transformer_inputs(spec, config, 1, DEVICE)
    seconds = {}
    for backend in ATTENTION_BACKENDS:
        try:
            model.set_attention_backend(resolve_attention_backend(backend, DEVICE))
            with torch.inference_mode():
                model(**inputs, return_dict=False)
                start = sync_time()
                model(**inputs, return_dict=False)
                seconds[backend] = sync_time() - start
        except Exception as err:
            print(f"attention backend {backend}: unavailable ({type(err).__name__}: {str(err)[:120]})")
    model.set_attention_backend("native")
    return seconds


def run(config_name: str, steps: int | None, out_dir: Path, variant: str = "full") -> dict:
    config, spec = config_and_spec(config_name, variant)
    run_steps = steps or spec.steps
    scale = spec.steps / run_steps
    started = time.perf_counter()
    components = build_components(spec, DEVICE)
    print(f"built {spec.name} in {time.perf_counter() - started:.0f} s", flush=True)
    result: dict = {
        "config": config_name,
        "model": spec.name,
        "size": f"{config.width}x{config.height}",
        "frames": config.frames,
        "steps": spec.steps,
        "steps_run": run_steps,
        "device": device_name(),
        "torch": torch.__version__,
    }
    matmul = matmul_tflops(8192 if DEVICE.type == "cuda" else 512)
    result["matmul_tflops"] = round(matmul, 1)
    attention = time_attention_backends(components["transformer"], spec, config)
    result["attention_forward_s"] = {k: round(v, 3) for k, v in attention.items()}
    best_backend = min(attention, key=attention.get)
    print(
        f"matmul {result['matmul_tflops']} TFLOP/s; attention forward s {result['attention_forward_s']}",
        flush=True,
    )

    request = clip_request(config, run_steps)
    stock_pipeline = pipeline_for(spec, components)

    # Stock diffusers: its own call, with the stages timed through its output types.
    reset_peak_memory()
    call = stock_call(spec, config, run_steps, request.image)
    t0 = sync_time()
    stock_pipeline.encode_prompt(
        PROMPT, spec.negative_prompt, max_sequence_length=spec.max_sequence_length, device=DEVICE
    )
    stock_encode = sync_time() - t0
    experts = [components["transformer"], components["transformer_2"]]
    plan = plan_memory(
        experts if spec.is_moe else experts[:1], components["text_encoder"], gpu_memory_budget(DEVICE)
    )
    if spec.is_moe and plan.offload_text_encoder:
        # Both experts and the text encoder do not fit with room to spare: as a stock user on this GPU
        # would, encode first and move the text encoder off the GPU before denoising.
        with torch.inference_mode():  # no autograd graph holding the text encoder's GPU weights
            positive, negative = stock_pipeline.encode_prompt(
                PROMPT, spec.negative_prompt, max_sequence_length=spec.max_sequence_length, device=DEVICE
            )
        components["text_encoder"].to("cpu")
        call = {k: v for k, v in call.items() if k not in ("prompt", "negative_prompt")}
        call |= {"prompt_embeds": positive, "negative_prompt_embeds": negative}
        result["stock_text_encoder"] = "encoded first, then moved to the host"
    t0 = sync_time()
    stock_latents = stock_pipeline(
        **call, generator=torch.Generator("cpu").manual_seed(42), output_type="latent"
    ).frames
    stock_encode_denoise = sync_time() - t0
    stock_denoise = stock_encode_denoise - (0 if "prompt_embeds" in call else stock_encode)
    vae = components["vae"]
    t0 = sync_time()
    with torch.inference_mode():
        stock_video = decode_latents(vae, stock_latents.float())
    stock_decode = sync_time() - t0
    t0 = sync_time()
    stock_frames = stock_pipeline.video_processor.postprocess_video(stock_video, output_type="np")[0]
    stock_frames = (np.clip(stock_frames, 0, 1) * 255).round().astype(np.uint8)
    stock_handback = sync_time() - t0
    stock_peak = peak_memory_gib()
    del stock_video
    stock = {
        "encode_s": stock_encode,
        "denoise_s": stock_denoise * scale,
        "decode_s": stock_decode,
        "handback_s": stock_handback,
    }
    stock["clip_s"] = sum(stock.values())
    print(f"stock: { {k: round(v, 2) for k, v in stock.items()} }", flush=True)

    # Ours: the generator in its default (exact) mode with the fastest attention backend measured above,
    # over the same transformers and text encoder (its VAE is a copy: ours decodes in bf16, stock in fp32).
    options = EngineOptions(attention_backend=best_backend)
    ours_pipeline = pipeline_for(spec, {**components, "vae": copy.deepcopy(vae)})
    t0 = sync_time()
    generator = WanGenerator(ours_pipeline, spec, DEVICE, options)
    warm = clip_request(config, generator.warmup_steps(), prompt="warm-up", seed=0)
    generator.generate(warm)
    warmup_s = sync_time() - t0
    reset_peak_memory()
    with torch.inference_mode():
        our_latents, ours_encode, ours_denoise = time_encode_and_denoise(
            generator, generator.validate(request)
        )
        t0 = sync_time()
        our_video = generator.decode_video(our_latents)
        ours_decode = sync_time() - t0
        t0 = sync_time()
        our_frames = generator.to_frames(our_video)
        ours_handback = sync_time() - t0
        ours_peak = peak_memory_gib()
        # What the bf16 decode costs in accuracy: the same latents through the float32 VAE.
        fp32_frames = generator.to_frames(decode_latents(vae, our_latents.float()))
    ours = {"encode_s": ours_encode, "denoise_s": ours_denoise * scale, "decode_s": ours_decode}
    ours["handback_s"] = ours_handback
    ours["clip_s"] = sum(ours.values())
    print(f"ours:  { {k: round(v, 2) for k, v in ours.items()} } (warm-up {warmup_s:.0f} s)", flush=True)

    flops = forward_flops(spec, config) * 2 * spec.steps
    result |= {
        "stock": {k: round(v, 3) for k, v in stock.items()},
        "ours": {k: round(v, 3) for k, v in ours.items()},
        "stock_s": round(stock["clip_s"], 2),
        "ours_s": round(ours["clip_s"], 2),
        "speedup_vs_stock": round(stock["clip_s"] / ours["clip_s"], 3),
        "attention_backend": best_backend,
        "warmup_s": round(warmup_s, 1),
        "denoise_tflops": round(flops / ours["denoise_s"] / 1e12, 1),
        "denoise_matmul_fraction": round(flops / ours["denoise_s"] / 1e12 / matmul, 3),
        "stock_denoise_matmul_fraction": round(flops / stock["denoise_s"] / 1e12 / matmul, 3),
        "decode_fraction": round(ours["decode_s"] / ours["clip_s"], 3),
        "peak_gib": round(ours_peak, 1),
        "stock_peak_gib": round(stock_peak, 1),
        "latents_rel_error": relative_error(our_latents.float(), stock_latents.float()),
        "frames_rel_error": frames_error(our_frames, stock_frames),
        "vae_decode_dtype": str(generator.pipeline.vae.dtype),
        "bf16_decode_frames_rel_error_vs_fp32_decode": frames_error(our_frames, fp32_frames),
        "denoise_scaled_from_steps": run_steps if scale != 1 else None,
    }
    write_result(result, out_dir / f"engine-{config_name}.json")
    return result
