"""Engine benchmark: stock diffusers vs wan_engine on the same random weights at real size, side by side.

    python bench/engine.py --config ti2v5b_720p [--steps N] [--out DIR]

Run on the GPU machine (see bench/README.md for the exact command used). For one config it
builds the real-size pipeline once (random weights: the compute of real weights), then:

1. measures the bf16 matmul rate of this GPU (8192^3, median of CUDA-event timings);
2. times each attention backend on one transformer forward and keeps the fastest for ours;
3. runs one clip through stock diffusers (``WanPipeline.__call__``) and one through
   ``WanGenerator`` (exact mode), same seed and inputs, timing text encoding, denoising,
   VAE decode and the hand-back of frames, and peak GPU memory;
4. compares final latents and decoded frames (relative L2 error of ours against stock);
5. reports the denoising loop's achieved TFLOP/s against the measured matmul rate.

With ``--steps N`` below the config's step count the denoising time is measured over N steps
and scaled to the full count (every step costs the same); the output says so.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel
from PIL import Image
from transformers import UMT5Config, UMT5EncoderModel

from wan_engine import EngineOptions, GenerationRequest, WanGenerator, get_model_spec
from wan_engine.attention import FLASH_ATTENTION_BACKEND, resolve_attention_backend
from wan_engine.memory import ExpertSlot, gpu_memory_budget, plan_memory, weight_bytes
from wan_engine.random_weights import build_tokenizer
from wan_engine.specs import ModelSpec


@dataclass(frozen=True)
class Config:
    family: str
    width: int
    height: int
    frames: int


CONFIGS = {
    "ti2v5b_720p": Config("ti2v-5b", 1280, 704, 121),
    "a14b_t2v_480p": Config("t2v-a14b", 832, 480, 81),
    "a14b_t2v_720p": Config("t2v-a14b", 1280, 720, 81),
    "a14b_i2v_480p": Config("i2v-a14b", 832, 480, 81),
}
PROMPT = "A red knit sneaker turns slowly on a turntable, soft studio light, white backdrop."
# flash_4_hub: FlashAttention's CuTe-DSL kernel, when flash_attn.cute is installed (wan_engine.attention).
ATTENTION_BACKENDS = (
    "native",
    "_native_cudnn",
    "_native_flash",
    "_native_efficient",
    FLASH_ATTENTION_BACKEND,
)


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def conditioning_image(config: Config) -> Image.Image:
    """A fixed product-like image for image-to-video configs (smooth gradients, not noise)."""
    y, x = np.mgrid[0 : config.height, 0 : config.width]
    pixels = np.stack([x * 255 // config.width, y * 255 // config.height, (x + y) * 127 // config.width], -1)
    return Image.fromarray(pixels.astype(np.uint8))


def clip_request(config: Config, steps: int, prompt: str = PROMPT, seed: int = 42) -> GenerationRequest:
    image = conditioning_image(config) if get_model_spec(config.family).requires_image else None
    return GenerationRequest(
        prompt=prompt,
        seed=seed,
        width=config.width,
        height=config.height,
        num_frames=config.frames,
        steps=steps,
        image=image,
    )


def pipeline_for(spec: ModelSpec, components: dict) -> WanPipeline | WanImageToVideoPipeline:
    """The stock diffusers pipeline of ``spec`` over ``components``."""
    if spec.pipeline_class == "WanImageToVideoPipeline":
        return WanImageToVideoPipeline(**components, image_encoder=None, image_processor=None)
    return WanPipeline(**components)


def sync_time() -> float:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def matmul_tflops(n: int = 8192, repeats: int = 20) -> float:
    """The bf16 matmul rate of this device: median of ``repeats`` timed n^3 products after warm-up."""
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start = sync_time()
        a @ b
        times.append(sync_time() - start)
    return 2 * n**3 / statistics.median(times) / 1e12


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"cpu ({platform.processor()})"


def forward_flops(spec: ModelSpec, config: Config, text_tokens: int = 512) -> float:
    """Matmul FLOPs of one transformer forward for one sample (attention included)."""
    arch = spec.architecture.transformer
    dim = arch["num_attention_heads"] * arch["attention_head_dim"]
    spatial = 16 if spec.expand_timesteps else 8  # the 2.2 VAE compresses 16x, the 2.1 VAE 8x
    tokens = ((config.frames - 1) // 4 + 1) * (config.height // spatial // 2) * (config.width // spatial // 2)
    linear = 12 * tokens * dim * dim + 4 * text_tokens * dim * dim  # q,k,v,o self; q,o cross; k,v of text
    ffn = 4 * tokens * dim * arch["ffn_dim"]
    attention = 4 * tokens * tokens * dim + 4 * tokens * text_tokens * dim
    return arch["num_layers"] * (linear + ffn + attention)


def build_components(spec: ModelSpec) -> dict:
    """Real-size components with random weights, made directly on the GPU in their serving dtypes."""
    arch = spec.architecture
    torch.manual_seed(0)
    with DEVICE:
        vae = AutoencoderKLWan(**arch.vae)
        # Made in bf16 directly: two 14B experts made in float32 first would not fit on 80 GB.
        torch.set_default_dtype(torch.bfloat16)
        try:
            text_encoder = UMT5EncoderModel(UMT5Config(**arch.text_encoder))
            experts = [WanTransformer3DModel(**arch.transformer) for _ in range(2 if spec.is_moe else 1)]
        finally:
            torch.set_default_dtype(torch.float32)
        for model in (vae, text_encoder, *experts):
            model.requires_grad_(False)
        for model in experts:
            # As from_pretrained(torch_dtype=bf16) does: these stay float32.
            for name, module in model.named_modules():
                if any(part in model._keep_in_fp32_modules for part in name.split(".")):
                    module.float()
    from diffusers import UniPCMultistepScheduler

    return {
        "tokenizer": build_tokenizer(arch.text_encoder["vocab_size"]),
        "text_encoder": text_encoder,
        "vae": vae,
        "scheduler": UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=spec.flow_shift
        ),
        "transformer": experts[0],
        "transformer_2": experts[1] if spec.is_moe else None,
        "boundary_ratio": spec.boundary_ratio,
        "expand_timesteps": spec.expand_timesteps,
    }


def time_attention_backends(
    model: WanTransformer3DModel, spec: ModelSpec, config: Config
) -> dict[str, float]:
    spatial = 16 if spec.expand_timesteps else 8
    latent = torch.randn(
        1,
        spec.architecture.transformer["in_channels"],
        (config.frames - 1) // 4 + 1,
        config.height // spatial,
        config.width // spatial,
        device=DEVICE,
        dtype=torch.bfloat16,
    )
    text = torch.randn(1, 512, spec.architecture.transformer["text_dim"], device=DEVICE, dtype=torch.bfloat16)
    timestep = torch.tensor([500.0], device=DEVICE)
    seconds = {}
    for backend in ATTENTION_BACKENDS:
        try:
            model.set_attention_backend(resolve_attention_backend(backend, DEVICE))
            with torch.inference_mode():
                model(hidden_states=latent, timestep=timestep, encoder_hidden_states=text, return_dict=False)
                start = sync_time()
                model(hidden_states=latent, timestep=timestep, encoder_hidden_states=text, return_dict=False)
                seconds[backend] = sync_time() - start
        except Exception as err:
            print(f"attention backend {backend}: unavailable ({type(err).__name__}: {str(err)[:120]})")
    model.set_attention_backend("native")
    return seconds


def time_encode_and_denoise(
    generator: WanGenerator, request: GenerationRequest
) -> tuple[torch.Tensor, float, float]:
    """(final latents, encode seconds, denoise seconds) of a resolved request.

    ``denoise`` encodes the prompt itself (the negative one from cache), so the loop's own time is
    its time less a separately timed encoding.
    """
    t0 = sync_time()
    generator.encode_prompts(request)
    encode_s = sync_time() - t0
    t0 = sync_time()
    latents = generator.denoise(request)
    return latents, encode_s, sync_time() - t0 - encode_s


def reset_peak_memory() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else 0.0


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    ours, reference = ours.double(), reference.double()
    return float(torch.linalg.vector_norm(ours - reference) / torch.linalg.vector_norm(reference))


def run(config_name: str, steps: int | None, out_dir: Path, variant: str = "full") -> dict:
    config = CONFIGS[config_name]
    spec = get_model_spec(config.family, variant)
    if variant == "tiny":  # a CPU smoke test of this script: the tiny model at its own size
        config = Config(config.family, *spec.default_size, spec.num_frames)
    run_steps = steps or spec.steps
    scale = spec.steps / run_steps
    started = time.perf_counter()
    components = build_components(spec)
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
    result["matmul_tflops"] = round(matmul_tflops(8192 if DEVICE.type == "cuda" else 512), 1)
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
    extra = {"guidance_scale_2": spec.guidance_scale_2} if spec.is_moe else {}
    call = {
        "prompt": PROMPT,
        "negative_prompt": spec.negative_prompt,
        "height": config.height,
        "width": config.width,
        "num_frames": config.frames,
        "num_inference_steps": run_steps,
        "guidance_scale": spec.guidance_scale,
        "max_sequence_length": spec.max_sequence_length,
        **extra,
    }
    if request.image is not None:
        call["image"] = request.image
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
        stock_video = vae.decode(stock_latents.float() * vae_std(vae) + vae_mean(vae), return_dict=False)[0]
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
        fp32_frames = generator.to_frames(
            vae.decode(our_latents.float() * vae_std(vae) + vae_mean(vae), return_dict=False)[0]
        )
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
        "denoise_matmul_fraction": round(flops / ours["denoise_s"] / 1e12 / result["matmul_tflops"], 3),
        "stock_denoise_matmul_fraction": round(
            flops / stock["denoise_s"] / 1e12 / result["matmul_tflops"], 3
        ),
        "decode_fraction": round(ours["decode_s"] / ours["clip_s"], 3),
        "peak_gib": round(ours_peak, 1),
        "stock_peak_gib": round(stock_peak, 1),
        "latents_rel_error": relative_error(our_latents.float(), stock_latents.float()),
        "frames_rel_error": frames_error(our_frames, stock_frames),
        "vae_decode_dtype": str(generator.pipeline.vae.dtype),
        "bf16_decode_frames_rel_error_vs_fp32_decode": frames_error(our_frames, fp32_frames),
        "denoise_scaled_from_steps": run_steps if scale != 1 else None,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"engine-{config_name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1), flush=True)
    return result


def vae_mean(vae: AutoencoderKLWan) -> torch.Tensor:
    return torch.tensor(vae.config.latents_mean, device=DEVICE, dtype=vae.dtype).view(1, -1, 1, 1, 1)


def vae_std(vae: AutoencoderKLWan) -> torch.Tensor:
    return torch.tensor(vae.config.latents_std, device=DEVICE, dtype=vae.dtype).view(1, -1, 1, 1, 1)


def frames_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return relative_error(
        torch.from_numpy(ours.astype(np.float32)), torch.from_numpy(reference.astype(np.float32))
    )


def error_study(config_name: str, steps: int, out_dir: Path) -> dict:
    """How far exact mode is from stock, measured against the yardstick of bf16 itself.

    Final latents after ``steps`` steps from: stock diffusers in bf16; ours with batching and
    compilation off; ours in its default mode; and a reference, stock diffusers with the same
    weights in float32 (TF32 matmuls). Exact mode is within bf16 tolerance when its distance to
    the reference is of the order of stock bf16's own.
    """
    config = CONFIGS[config_name]
    spec = get_model_spec(config.family)
    components = build_components(spec)
    request = clip_request(config, steps)
    extra = {"guidance_scale_2": spec.guidance_scale_2} if spec.is_moe else {}

    def stock_latents() -> torch.Tensor:
        return pipeline_for(spec, components)(
            prompt=PROMPT,
            negative_prompt=spec.negative_prompt,
            height=config.height,
            width=config.width,
            num_frames=config.frames,
            num_inference_steps=steps,
            guidance_scale=spec.guidance_scale,
            max_sequence_length=spec.max_sequence_length,
            generator=torch.Generator("cpu").manual_seed(42),
            output_type="latent",
            **extra,
            **({"image": request.image} if request.image is not None else {}),
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
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"engine-error-{config_name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1), flush=True)
    return result


SUMMARY_FIELDS = (
    "stock_s",
    "ours_s",
    "speedup_vs_stock",
    "denoise_matmul_fraction",
    "decode_fraction",
    "peak_gib",
    "device",
    "matmul_tflops",
    "latents_rel_error",
    "frames_rel_error",
    "denoise_scaled_from_steps",
)


def memory_check(config_name: str, steps: int, out_dir: Path, gpu_memory_gib: float | None = None) -> dict:
    """Ours alone, in its default memory policy: peak memory through denoising and decode, step times
    on both sides of the expert switch, and what the text encoder's round trip to the host costs.

    With ``gpu_memory_gib`` this process may use only that much of the GPU, as on a smaller card, and
    the weights start in host memory, as from_pretrained leaves them: the policy picks what fits. When
    it streams the experts, the same clip is run again with every switch a whole copy instead, for
    the cost that streaming hides and to check that both give the same latents.
    """
    config = CONFIGS[config_name]
    spec = get_model_spec(config.family)
    components = build_components(spec)
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
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"-{gpu_memory_gib:g}gib" if gpu_memory_gib else ""
    result_path = out_dir / f"engine-memory-{config_name}{suffix}.json"
    result_path.write_text(json.dumps(result, indent=1))  # kept should the rest not finish
    slot = generator._expert_slot
    if slot is not None:
        # For scale: one whole expert copied from pinned host memory, nothing to overlap with.
        start = sync_time()
        slot._fill("low_noise")
        result["whole_expert_copy_s"] = round(sync_time() - start, 3)
        result["expert_gib"] = round(weight_bytes([generator.experts["low_noise"]]) / 2**30, 1)
        # The same clip with every switch a whole copy before the expert runs (nothing streamed).
        slot.stream_during_next_forward = lambda name: None
        reference, unstreamed = clip()
        result["switch_extra_s_whole_copy"] = unstreamed["switch_extra_s"]
        result["streamed_latents_equal_whole_copy"] = bool(torch.equal(latents, reference))
        result["streamed_vs_whole_copy_rel_error"] = relative_error(latents, reference)
    result_path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1), flush=True)
    return result


def streaming_check(config_name: str, steps: int, out_dir: Path) -> dict:
    """Are streamed experts bitwise the resident ones? One generator runs the same clip twice with
    both experts resident (is a GPU run repeatable at all?), then twice with the same weights moved
    into an ExpertSlot, streamed at each switch."""
    config = CONFIGS[config_name]
    spec = get_model_spec(config.family)
    generator = WanGenerator(pipeline_for(spec, build_components(spec)), spec, DEVICE, EngineOptions())
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
    generator._expert_slot = ExpertSlot(generator.experts, DEVICE)
    streamed = [latents(), latents()]
    result |= {
        "streamed_repeat_equal": bool(torch.equal(*streamed)),
        "streamed_equal_resident": bool(torch.equal(streamed[0], resident[0])),
        "streamed_vs_resident_rel_error": relative_error(streamed[0], resident[0]),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"engine-streaming-{config_name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1), flush=True)
    return result


def throughput_check(config_name: str, out_dir: Path, clips_per_forward: tuple[int, ...] = (1, 2)) -> dict:
    """Does putting several clips in one forward raise clips per hour? Per-clip step time by batch.

    A step of one clip is one forward of batch 2 (conditional and unconditional); of two clips,
    batch 4. The compiled transformer is timed on real-size inputs, median of three.
    """
    config = CONFIGS[config_name]
    spec = get_model_spec(config.family)
    components = build_components(spec)
    model = components["transformer"]
    model.compile_repeated_blocks(fullgraph=True)
    spatial = 16 if spec.expand_timesteps else 8
    shape = (
        spec.architecture.transformer["in_channels"],
        (config.frames - 1) // 4 + 1,
        config.height // spatial,
        config.width // spatial,
    )
    text_dim = spec.architecture.transformer["text_dim"]
    per_clip_step = {}
    with torch.inference_mode():
        for clips in clips_per_forward:
            batch = 2 * clips
            latent = torch.randn(batch, *shape, device=DEVICE, dtype=torch.bfloat16)
            text = torch.randn(batch, 512, text_dim, device=DEVICE, dtype=torch.bfloat16)
            timestep = torch.full((batch,), 500.0, device=DEVICE)
            times = []
            for _ in range(4):
                start = sync_time()
                model(hidden_states=latent, timestep=timestep, encoder_hidden_states=text, return_dict=False)
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
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"engine-throughput-{config_name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1), flush=True)
    return result


APPROXIMATE_MODES = {
    "exact": EngineOptions(),
    "step-cache-3": EngineOptions(step_cache_interval=3),
    "fp8": EngineOptions(fp8_matmuls=True),
    "step-cache-3+fp8": EngineOptions(step_cache_interval=3, fp8_matmuls=True),
}


def approximate_study(
    config_name: str, out_dir: Path, variant: str = "full", mode_names: list[str] | None = None
) -> dict:
    """The opt-in approximate modes against exact mode: whole clips, same weights, seed and inputs.

    Exact runs first: FP8 quantizes the shared experts in place, so the FP8 modes come last. Drift
    is the relative L2 distance of final latents and decoded frames from exact mode's.
    """
    config = CONFIGS[config_name]
    spec = get_model_spec(config.family, variant)
    if variant == "tiny":  # a CPU smoke test of this script: the tiny model at its own size
        config = Config(config.family, *spec.default_size, spec.num_frames)
    components = build_components(spec)
    request = clip_request(config, spec.steps)
    modes, exact = {}, None
    # Exact always runs first: it is what the other modes' speed and drift are measured against.
    chosen = {name: APPROXIMATE_MODES[name] for name in ["exact", *(mode_names or APPROXIMATE_MODES)]}
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
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"engine-approximate-{config_name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1), flush=True)
    return result


def summarize(results_dir: Path) -> dict:
    """engine-latest.json and engine-latest.md from the newest run of each config under ``results_dir``."""
    latest: dict = {}
    for path in sorted(results_dir.glob("*/engine-*.json")):
        result = json.loads(path.read_text())
        if "speedup_vs_stock" in result:
            latest[result["config"]] = {k: result[k] for k in SUMMARY_FIELDS} | {"source": str(path)}
    (results_dir / "engine-latest.json").write_text(json.dumps(latest, indent=1) + "\n")
    rows = [
        "| config | device | stock s | ours s | speedup | denoise / matmul rate | decode share | peak GiB |"
    ]
    rows.append("|---|---|---|---|---|---|---|---|")
    for name, r in latest.items():
        rows.append(
            f"| {name} | {r['device']} | {r['stock_s']} | {r['ours_s']} | {r['speedup_vs_stock']} | "
            f"{r['denoise_matmul_fraction']} | {r['decode_fraction']} | {r['peak_gib']} |"
        )
    (results_dir / "engine-latest.md").write_text("\n".join(rows) + "\n")
    return latest


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", choices=sorted(CONFIGS))
    parser.add_argument("--summarize", type=Path, metavar="DIR", help="rebuild DIR/engine-latest.{json,md}")
    parser.add_argument(
        "--steps", type=int, default=None, help="denoising steps to run (scaled to the full count)"
    )
    parser.add_argument(
        "--error-study",
        type=int,
        metavar="STEPS",
        help="measure exact mode's numeric distance over STEPS steps",
    )
    parser.add_argument(
        "--memory-check", type=int, metavar="STEPS", help="ours alone: peak memory and the expert switch"
    )
    parser.add_argument(
        "--gpu-memory-gib",
        type=float,
        help="with --memory-check: use only this much GPU memory, as on a smaller card",
    )
    parser.add_argument(
        "--streaming-check",
        type=int,
        metavar="STEPS",
        help="streamed experts against resident ones, bit for bit",
    )
    parser.add_argument(
        "--throughput", action="store_true", help="per-clip step time, 1 vs 2 clips per forward"
    )
    parser.add_argument(
        "--approximate", action="store_true", help="the opt-in approximate modes against exact mode"
    )
    parser.add_argument(
        "--modes", nargs="+", choices=sorted(APPROXIMATE_MODES), help="with --approximate: these modes only"
    )
    parser.add_argument("--tiny", action="store_true", help="smoke-test the script on the tiny model (CPU)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize)
        return
    if not args.config:
        parser.error("--config is required")
    print(f"{platform.node()} {device_name()} torch {torch.__version__}", flush=True)
    if args.approximate:
        approximate_study(args.config, args.out, "tiny" if args.tiny else "full", args.modes)
    elif args.throughput:
        throughput_check(args.config, args.out)
    elif args.streaming_check:
        streaming_check(args.config, args.streaming_check, args.out)
    elif args.memory_check:
        memory_check(args.config, args.memory_check, args.out, args.gpu_memory_gib)
    elif args.error_study:
        error_study(args.config, args.error_study, args.out)
    else:
        run(args.config, args.steps, args.out, "tiny" if args.tiny else "full")


if __name__ == "__main__":
    main()
