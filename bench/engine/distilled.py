"""The 4-step distilled recipe with LoRA adapters: stock diffusers against ``WanGenerator`` (``--distilled``).

For one config it builds the real-size pipeline once (random weights: the compute of real weights)
and writes random rank-64 LoRAs on the layers published Wan LoRAs train (q, k, v and o of ``attn1``
and ``attn2``, ``ffn.net.0.proj`` and ``ffn.net.2`` of every block), as safetensors in diffusers'
(PEFT) layout, bf16: a pair per adapter for A14B (high-noise and low-noise expert), one file for
TI2V-5B. The distillation LoRA is the one fused; two more, A and B, are per-clip adapters. Then, on
the same modules, seed and inputs:

(a) **stock** diffusers the documented way: ``load_lora_weights`` per expert
    (``load_into_transformer_2=True`` for the low-noise one), ``set_adapters``, ``fuse_lora`` on both
    experts, ``unload_lora_weights``; ``FlowMatchEulerDiscreteScheduler(shift=5)`` pinned to the
    distillation's sigmas 1, .75, .5, .25 (``WanPipeline.__call__`` only calls
    ``set_timesteps(num_inference_steps)``: a subclass pins them), 4 steps, guidance 1; one call at 5
    frames first (lazy CUDA/cuDNN set-up), then the clip timed by stage as ``compare`` times stock
    (encode, denoise, fp32 VAE decode, hand-back of uint8 frames on the host);
(b) **stock with its documented speed-ups**: ``compile_repeated_blocks(fullgraph=True)`` on both experts
    and ``set_attention_backend`` with the backend ours resolves (FlashAttention's kernel on a Hopper
    GPU, supplied from the local installation as ours does, instead of a Hub download); warmed up by a
    2-step call (one step per expert: both compile), then timed the same way;
(c) **ours**: ``WanGenerator(..., fused_adapters=[the pair])``, recipe ``lightx2v-4step``, warmed up
    with one clip of the same request (fuse, compilation and autotuning: what loading costs), then
    timed per stage as ``compare`` times ours;
(d) **fused overhead**: ours' denoising step with the pair fused against a generator on the same
    modules that was given no adapters (the ``standard`` recipe at 4 steps and guidance 1: the same
    forwards); and the cost of an unfused per-clip adapter: ``EngineOptions(adapter_slot_rank=64)``
    with a rank-64 adapter in the slot, the slot at zero, and no slot ((c)'s step);
(e) **per-clip swaps** A -> B -> none, each timed (``GeneratedVideo.adapter_swap_seconds``), and the
    graphs torch.compile made during each swap and the clip that follows it (dynamo's
    ``unique_graphs`` counter: 0 means no recompilation).

Fusing changes weights in place and every leg shares the modules (two A14B experts fit an 80 GB GPU
once): stock's fuse serves (a) and (b); before (c) the same pair is fused again at scale -1 through
the same API (the base back, to within bf16 rounding), and ours fuses it at load. (d) and (e) build
more generators over (c)'s fused weights: the slot's generator is told the pair is fused (it is), so
it serves the recipe without fusing it twice. Results are written as each part ends; parts (d) and
(e) are skipped when they would not end inside ``budget_s`` (the device's commands stop at 10
minutes), and the JSON says which.

TI2V-5B has no published distillation: every leg runs 4 steps of the base at guidance 1 with its
standard UniPC scheduler (the mechanics: one forward a step, no unconditional pass), nothing is
fused, and (d)'s fused part is skipped.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from safetensors.torch import save_file

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
    time_encode_and_denoise,
)
from wan_engine import AdapterWeights, EngineOptions, GenerationRequest, WanGenerator
from wan_engine.adapters import expert_names
from wan_engine.attention import AUTO, resolve_attention_backend
from wan_engine.lora import SLOT_TARGETS
from wan_engine.memory import gpu_memory_budget, plan_memory
from wan_engine.recipes import LIGHTX2V_4STEP, STANDARD, Recipe, get_recipe, recipe_names
from wan_engine.specs import ModelSpec
from wan_engine.vae import decode_latents

RANK = 64
STEPS = 4
LORA_STD = 0.01  # of each factor's entries: at real size a delta of about a tenth of the random base weights
# Frames of stock's eager warm-up call: the lazy CUDA, cuBLAS and cuDNN set-up, not a whole clip.
EAGER_WARMUP_FRAMES = 5
# The default limit leaves ~60 s of the device's 10-minute command for Python's start and the bundle.
DEFAULT_BUDGET_S = 530.0


class PinnedSigmasEuler(FlowMatchEulerDiscreteScheduler):
    """Flow-matching Euler on fixed sigmas, whatever step count it is asked for.

    ``WanPipeline.__call__`` calls ``scheduler.set_timesteps(num_inference_steps, device=...)`` and
    nothing else, so a stock user who runs a distilled schedule pins it in the scheduler: the sigmas
    are shifted by ``shift`` as ``set_timesteps(sigmas=...)`` shifts them.
    """

    pinned_sigmas: tuple[float, ...] = (1.0,)

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        super().set_timesteps(sigmas=list(self.pinned_sigmas), device=device)


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far (recompilations included)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def write_lora(module: torch.nn.Module, path: Path, seed: int, rank: int = RANK) -> Path:
    """A random rank-``rank`` LoRA on every block's ``SLOT_TARGETS`` of ``module``, saved to ``path`` in
    diffusers' layout (``transformer.blocks.N.<layer>.lora_A/B.weight``, bf16, no alpha: scale 1);
    drawn on the benchmark's device, where hundreds of MB of random numbers take no time."""
    generator = torch.Generator(DEVICE).manual_seed(seed)
    state = {}
    for index, block in enumerate(module.blocks):
        for target in SLOT_TARGETS:
            linear = block.get_submodule(target)
            prefix = f"transformer.blocks.{index}.{target}"
            for name, shape in (
                ("lora_A", (rank, linear.in_features)),
                ("lora_B", (linear.out_features, rank)),
            ):
                factor = torch.randn(shape, generator=generator, device=DEVICE) * LORA_STD
                state[f"{prefix}.{name}.weight"] = factor.to(torch.bfloat16).cpu()
    save_file(state, str(path))
    return path


def write_adapter(
    name: str, spec: ModelSpec, module: torch.nn.Module, folder: Path, seed: int
) -> AdapterWeights:
    """An adapter of random files, one per expert of ``spec``, at scale 1."""
    files = tuple(
        (expert, str(write_lora(module, folder / f"{name}.{expert}.safetensors", seed + index)))
        for index, expert in enumerate(expert_names(spec))
    )
    # The digest identifies the bytes for the slot's "already loaded" check; the name does here.
    return AdapterWeights(name=name, files=files, scale=1.0, digest=name)


def load_fuse_unload(pipeline: DiffusionPipeline, adapter: AdapterWeights, scale: float = 1.0) -> float:
    """Stock diffusers' documented way to fuse an A14B LoRA pair into both experts; the seconds it took.

    ``scale`` -1 fuses the same delta out again (the base back, to within bf16 rounding)."""
    files = dict(adapter.files)
    t0 = sync_time()
    pipeline.load_lora_weights(files["high_noise"], adapter_name="h")
    pipeline.load_lora_weights(files["low_noise"], adapter_name="l", load_into_transformer_2=True)
    pipeline.set_adapters(["h", "l"], [1.0, 1.0])
    pipeline.fuse_lora(components=["transformer", "transformer_2"], lora_scale=scale)
    pipeline.unload_lora_weights()
    return sync_time() - t0


def stock_clip(
    pipeline: DiffusionPipeline,
    call: dict,
    vae: torch.nn.Module,
    encode_s: float,
    encode_in_call: bool,
) -> tuple[dict, torch.Tensor, np.ndarray]:
    """One stock clip timed by stage: (seconds by stage, final latents, uint8 frames on the host).

    As ``compare`` times stock: the call returns latents; the fp32 VAE decodes them and diffusers'
    post-processing makes float frames on the host, cast to uint8 as ours hands them back."""
    reset_peak_memory()
    t0 = sync_time()
    latents = pipeline(**call, generator=torch.Generator("cpu").manual_seed(42), output_type="latent").frames
    denoise_s = sync_time() - t0 - (encode_s if encode_in_call else 0.0)
    t0 = sync_time()
    with torch.inference_mode():
        video = decode_latents(vae, latents.float())
    decode_s = sync_time() - t0
    t0 = sync_time()
    frames = pipeline.video_processor.postprocess_video(video, output_type="np")[0]
    frames = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    handback_s = sync_time() - t0
    stages = {"encode_s": encode_s, "denoise_s": denoise_s, "decode_s": decode_s, "handback_s": handback_s}
    stages["clip_s"] = sum(stages.values())
    stages["peak_gib"] = peak_memory_gib()
    return stages, latents, frames


def ours_clip(generator: WanGenerator, request: GenerationRequest) -> tuple[dict, torch.Tensor, np.ndarray]:
    """One clip through ours timed by stage, as ``compare`` times ours."""
    reset_peak_memory()
    with torch.inference_mode():
        latents, encode_s, denoise_s = time_encode_and_denoise(generator, generator.validate(request))
        t0 = sync_time()
        video = generator.decode_video(latents)
        decode_s = sync_time() - t0
        t0 = sync_time()
        frames = generator.to_frames(video)
        handback_s = sync_time() - t0
    stages = {"encode_s": encode_s, "denoise_s": denoise_s, "decode_s": decode_s, "handback_s": handback_s}
    stages["clip_s"] = sum(stages.values())
    stages["peak_gib"] = peak_memory_gib()
    return stages, latents, frames


def denoise_step_s(generator: WanGenerator, request: GenerationRequest, repeats: int) -> float:
    """The fastest of ``repeats`` denoising loops of ``request``, per step (encoding left out)."""
    best = float("inf")
    with torch.inference_mode():
        resolved = generator.validate(request)
        for _ in range(repeats):
            _, _, denoise_s = time_encode_and_denoise(generator, resolved)
            best = min(best, denoise_s)
    return best / resolved.steps


def release_cached_memory() -> None:
    """Give the allocator's cached blocks back before a generator is made: each one brings the 11 GB text
    encoder to the GPU for a moment (then to pinned host memory), beside whatever the last clip left
    cached (at 720p, with both experts resident, the two would not fit together)."""
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def rounded(stages: dict) -> dict:
    return {k: round(v, 3) for k, v in stages.items()}


class Budget:
    """Seconds left of the command, to skip the parts that would not end inside it."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.started = seconds, time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def fits(self, estimate: float) -> bool:
        return self.elapsed() + estimate <= self.seconds


def run(config_name: str, out_dir: Path, variant: str = "full", budget_s: float = DEFAULT_BUDGET_S) -> dict:
    budget = Budget(budget_s)
    config, spec = config_and_spec(config_name, variant)
    recipe = get_recipe(spec, LIGHTX2V_4STEP) if LIGHTX2V_4STEP in recipe_names(spec) else None
    path = out_dir / f"engine-distilled-{config_name}.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    lora_dir = Path(tempfile.mkdtemp(prefix="wanfactory-loras-"))
    result: dict = {
        "study": "distilled",
        "config": config_name,
        "model": spec.name,
        "size": f"{config.width}x{config.height}",
        "frames": config.frames,
        "recipe": recipe.name if recipe else f"{STEPS} steps of the base, guidance 1",
        "recipe_note": (
            f"{recipe.source}: {recipe.steps} steps, guidance 1, Euler shift {recipe.flow_shift:g}, "
            f"timesteps {list(recipe.timesteps)}, experts switch at step {recipe.switch_step}"
            if recipe
            else f"{spec.name} has no published distillation: {STEPS} steps of the base at guidance 1 with "
            "its standard UniPC scheduler, no adapter fused (the mechanics of a few-step clip)"
        ),
        "steps": STEPS,
        "steps_run": STEPS,
        "device": device_name(),
        "torch": torch.__version__,
        "skipped": {},
    }
    try:
        _run(result, path, budget, config, spec, recipe, lora_dir)
    finally:
        shutil.rmtree(lora_dir, ignore_errors=True)
    result["elapsed_s"] = round(budget.elapsed(), 1)
    write_result(result, path)
    return result


def _save(result: dict, path: Path) -> None:
    """The results so far, so that a command stopped at its limit still leaves them."""
    path.write_text(json.dumps(result, indent=1))


def _run(
    result: dict,
    path: Path,
    budget: Budget,
    config: Config,
    spec: ModelSpec,
    recipe: Recipe | None,
    lora_dir: Path,
) -> None:
    t0 = time.perf_counter()
    components = build_components(spec, DEVICE)
    print(f"built {spec.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    matmul = matmul_tflops(8192 if DEVICE.type == "cuda" else 512)
    result["matmul_tflops"] = round(matmul, 1)
    experts = [components["transformer"], components["transformer_2"]]
    experts = experts if spec.is_moe else experts[:1]

    distill = None
    if recipe:
        t0 = time.perf_counter()
        [(name, scale)] = recipe.fused_adapters
        distill = replace(write_adapter(name, spec, experts[0], lora_dir, seed=1000), scale=scale)
        size = sum(Path(file).stat().st_size for _, file in distill.files)
        result["adapters"] = {
            "rank": RANK,
            "targets": list(SLOT_TARGETS),
            "layout": "diffusers/PEFT (transformer.blocks.N.<layer>.lora_A/B.weight), bf16",
            "mb_per_file": round(size / len(distill.files) / 1e6, 1),
            "write_s": round(time.perf_counter() - t0, 1),
        }
        print(f"distillation pair written: {result['adapters']}", flush=True)

    # --- (a) stock diffusers, the documented way ---
    if recipe:
        scheduler = PinnedSigmasEuler(num_train_timesteps=1000, shift=recipe.flow_shift)
        scheduler.pinned_sigmas = tuple(t / 1000 for t in recipe.timesteps)
        stock = pipeline_for(spec, {**components, "scheduler": scheduler})
        result["stock_lora_load_fuse_s"] = round(load_fuse_unload(stock, distill), 2)
    else:
        stock = pipeline_for(spec, components)  # its standard UniPC scheduler at 4 steps, as ours runs it
    stock.set_progress_bar_config(disable=True)
    image = clip_request(config, STEPS).image
    call = {
        "height": config.height,
        "width": config.width,
        "num_frames": config.frames,
        "num_inference_steps": STEPS,
        "guidance_scale": 1.0,
        "max_sequence_length": spec.max_sequence_length,
    }
    if spec.is_moe:
        call["guidance_scale_2"] = 1.0
    if image is not None:
        call["image"] = image
    plan = plan_memory(experts, components["text_encoder"], gpu_memory_budget(DEVICE))
    vae = components["vae"]

    def encode() -> tuple[torch.Tensor, float]:
        t0 = sync_time()
        with torch.inference_mode():
            positive, _ = stock.encode_prompt(
                PROMPT,
                do_classifier_free_guidance=False,
                max_sequence_length=spec.max_sequence_length,
                device=DEVICE,
            )
        return positive, sync_time() - t0

    encode()  # the text encoder's first call, outside the timing
    positive, stock_encode = encode()
    encode_in_call = not (spec.is_moe and plan.offload_text_encoder)
    if encode_in_call:
        call["prompt"] = PROMPT
    else:
        # Both experts and the text encoder do not fit with room to spare: as a stock user on this GPU
        # must (and as compare's stock leg does), encode first and move the text encoder to the host.
        components["text_encoder"].to("cpu")
        call["prompt_embeds"] = positive
        result["stock_text_encoder"] = "encoded first, then moved to the host"
    t0 = sync_time()
    warm = stock(**{**call, "num_frames": EAGER_WARMUP_FRAMES}, output_type="latent").frames
    with torch.inference_mode():
        decode_latents(vae, warm.float())
    del warm
    result["stock_warmup_s"] = round(sync_time() - t0, 1)
    stock_stages, stock_latents, stock_frames = stock_clip(stock, call, vae, stock_encode, encode_in_call)
    print(f"stock: {rounded(stock_stages)}", flush=True)
    result["stock"] = rounded(stock_stages)
    _save(result, path)

    # --- (b) stock with regional compilation and ours' attention backend ---
    backend = resolve_attention_backend(AUTO, DEVICE)
    compiled = DEVICE.type == "cuda"
    for expert in experts:
        if backend:
            expert.set_attention_backend(backend)
        if compiled:
            expert.compile_repeated_blocks(fullgraph=True)
    result["stock_compiled_setup"] = {
        "attention_backend": backend or "native (PyTorch SDPA)",
        "compile_repeated_blocks": "fullgraph, both experts"
        if compiled
        else "no (CPU: ours compiles on a GPU only)",
    }
    graphs = compiled_graphs()
    t0 = sync_time()
    if recipe:
        # One step per expert compiles both: shifted, sigma .5 is timestep 833, below either boundary.
        scheduler.pinned_sigmas = (1.0, 0.5)
    stock(**{**call, "num_inference_steps": 2}, output_type="latent")
    if recipe:
        scheduler.pinned_sigmas = tuple(t / 1000 for t in recipe.timesteps)
    result["stock_compiled_warmup_s"] = round(sync_time() - t0, 1)
    result["stock_compiled_warmup_graphs"] = compiled_graphs() - graphs
    fast_stages, fast_latents, _ = stock_clip(stock, call, vae, stock_encode, encode_in_call)
    print(f"stock compiled: {rounded(fast_stages)}", flush=True)
    result["stock_compiled"] = rounded(fast_stages)
    result["stock_compiled_vs_stock_latents_rel_error"] = relative_error(
        fast_latents.float(), stock_latents.float()
    )
    _save(result, path)

    # --- (c) ours: the pair fused at load, the recipe, warmed up ---
    if distill:
        # Stock fused the pair into the shared experts; fuse it out again, so ours fuses it onto the base.
        result["unfuse_s"] = round(load_fuse_unload(stock, distill, scale=-1.0), 2)
    for expert in experts:
        expert.set_attention_backend("native")  # ours sets its own
    torch._dynamo.reset()  # ours compiles from scratch, as a fresh process does
    release_cached_memory()
    ours_vae = copy.deepcopy(vae)  # ours decodes in bf16, stock in fp32
    ours_components = {**components, "vae": ours_vae}
    request = (
        replace(clip_request(config, STEPS), steps=None, recipe=recipe.name)
        if recipe
        else replace(clip_request(config, STEPS), guidance_scale=1.0)
    )
    graphs = compiled_graphs()
    t0 = sync_time()
    generator = WanGenerator(
        pipeline_for(spec, ours_components),
        spec,
        DEVICE,
        EngineOptions(),
        fused_adapters=[distill] if distill else [],
    )
    warm_video = generator.generate(replace(request, prompt="warm-up", seed=0))
    warmup_s = sync_time() - t0
    result["ours_warmup_graphs"] = compiled_graphs() - graphs
    ours_stages, our_latents, our_frames = ours_clip(generator, request)
    print(f"ours: {rounded(ours_stages)} (warm-up {warmup_s:.0f} s)", flush=True)
    flops = forward_flops(spec, config) * STEPS  # guidance 1: one forward of one sample a step
    stock_peak, fast_peak, ours_peak = (s.pop("peak_gib") for s in (stock_stages, fast_stages, ours_stages))
    result |= {
        "stock": rounded(stock_stages),
        "stock_compiled": rounded(fast_stages),
        "ours": rounded(ours_stages),
        "stock_s": round(stock_stages["clip_s"], 2),
        "stock_compiled_s": round(fast_stages["clip_s"], 2),
        "ours_s": round(ours_stages["clip_s"], 2),
        "speedup_vs_stock": round(stock_stages["clip_s"] / ours_stages["clip_s"], 3),
        "speedup_vs_stock_compiled": round(fast_stages["clip_s"] / ours_stages["clip_s"], 3),
        "attention_backend": generator.attention_backend or "native (PyTorch SDPA)",
        "warmup_s": round(warmup_s, 1),
        "ours_fuse_s": round(generator.fuse_seconds, 2),
        "denoise_tflops": round(flops / ours_stages["denoise_s"] / 1e12, 1),
        "denoise_matmul_fraction": round(flops / ours_stages["denoise_s"] / 1e12 / matmul, 3),
        "stock_denoise_matmul_fraction": round(flops / stock_stages["denoise_s"] / 1e12 / matmul, 3),
        "stock_compiled_denoise_matmul_fraction": round(flops / fast_stages["denoise_s"] / 1e12 / matmul, 3),
        "decode_fraction": round(ours_stages["decode_s"] / ours_stages["clip_s"], 3),
        "peak_gib": round(ours_peak, 1),
        "stock_peak_gib": round(stock_peak, 1),
        "stock_compiled_peak_gib": round(fast_peak, 1),
        "latents_rel_error": relative_error(our_latents.float(), stock_latents.float()),
        "frames_rel_error": frames_error(our_frames, stock_frames),
        "vae_decode_dtype": str(generator.pipeline.vae.dtype),
        # Forwards per expert in a clip (the warm-up's): 2 and 2, no unconditional pass.
        "expert_calls": warm_video.expert_calls,
        "denoise_scaled_from_steps": None,
    }
    _save(result, path)
    del stock_latents, stock_frames, fast_latents, our_latents, our_frames

    # --- (d) fused overhead: the same generator config given no adapters ---
    ours_step = ours_stages["denoise_s"] / STEPS
    clip_s = ours_stages["clip_s"]
    repeats = 2 if clip_s < 30 else 1
    costs: dict = {"ours_step_s": round(ours_step, 4), "repeats": repeats}
    if distill is None:
        result["skipped"]["fused_overhead"] = "no fused adapter: the model has no distilled recipe"
    elif not budget.fits(2 * repeats * ours_stages["denoise_s"] + 15):
        result["skipped"]["fused_overhead"] = f"budget: {budget.elapsed():.0f} s of {budget.seconds:.0f} used"
    else:
        release_cached_memory()
        plain = WanGenerator(pipeline_for(spec, ours_components), spec, DEVICE, EngineOptions())
        base_request = replace(clip_request(config, STEPS), guidance_scale=1.0, guidance_scale_2=1.0)
        fused_step = denoise_step_s(generator, request, repeats)
        base_step = denoise_step_s(plain, base_request, repeats)
        costs |= {
            "fused_step_s": round(fused_step, 4),
            "no_adapter_step_s": round(base_step, 4),
            "fused_overhead": round(fused_step / base_step - 1, 4),
            "no_adapter_recipe": f"{STANDARD} at {STEPS} steps, guidance 1 (one forward a step)",
        }
        ours_step = fused_step
        print(f"fused overhead: {costs}", flush=True)
        del plain
    result["adapter_costs"] = costs
    _save(result, path)

    # --- (d) slot costs and (e) per-clip swaps ---
    # The slot's compile and a clip (~ours' warm-up), 3 clips with swaps and 2 x repeats timed loops.
    estimate = warmup_s + (3 + 2 * repeats) * clip_s + 30
    if not budget.fits(estimate):
        result["skipped"]["per_clip_adapters"] = (
            f"budget: ~{estimate:.0f} s needed, {budget.elapsed():.0f} s of {budget.seconds:.0f} used"
        )
        return
    t0 = time.perf_counter()
    style_a = write_adapter("style-a", spec, experts[0], lora_dir, seed=2000)
    style_b = write_adapter("style-b", spec, experts[0], lora_dir, seed=3000)
    write_s = time.perf_counter() - t0
    release_cached_memory()
    t0 = sync_time()
    slotted = WanGenerator(
        pipeline_for(spec, ours_components), spec, DEVICE, EngineOptions(adapter_slot_rank=RANK)
    )
    if distill:
        # The shared weights hold the pair already (fused by (c)'s generator): say so instead of fusing twice.
        slotted.fused_adapters = (distill,)
    slot_setup_s = sync_time() - t0
    graphs = compiled_graphs()
    t0 = sync_time()
    none_first = slotted.generate(request)  # compiles the blocks with the slot's LoRA layers
    slot_warmup_s = sync_time() - t0
    slot_warmup_graphs = compiled_graphs() - graphs
    zero_step = denoise_step_s(slotted, request, repeats)
    swaps = {}
    adapter_step = None
    for label, adapters in (("a", (style_a,)), ("b", (style_b,)), ("none", ())):
        graphs = compiled_graphs()
        video = slotted.generate(replace(request, adapters=adapters))
        swaps[label] = {
            "swap_s": round(video.adapter_swap_seconds, 4)
            if video.adapter_swap_seconds is not None
            else None,
            "clip_s": round(video.seconds, 2),
            "graphs_compiled": compiled_graphs() - graphs,
        }
        if label == "a":
            graphs = compiled_graphs()
            adapter_step = denoise_step_s(slotted, replace(request, adapters=adapters), repeats)
            swaps[label]["graphs_compiled_timed_loops"] = compiled_graphs() - graphs
        if label == "none":
            swaps[label]["frames_equal_before_any_swap"] = bool(
                np.array_equal(video.frames, none_first.frames)
            )
            swaps[label]["frames_rel_error_vs_before_any_swap"] = frames_error(
                video.frames, none_first.frames
            )
        print(f"swap to {label}: {swaps[label]}", flush=True)
    result["adapter_costs"] = costs | {
        "slot_rank": RANK,
        "slot_setup_s": round(slot_setup_s, 2),
        "slot_warmup_s": round(slot_warmup_s, 1),
        "slot_warmup_graphs": slot_warmup_graphs,
        "no_slot_step_s": round(ours_step, 4),
        "slot_zero_step_s": round(zero_step, 4),
        "slot_adapter_step_s": round(adapter_step, 4),
        "slot_zero_overhead": round(zero_step / ours_step - 1, 4),
        "slot_adapter_overhead": round(adapter_step / ours_step - 1, 4),
        "slot_adapter_vs_zero": round(adapter_step / zero_step - 1, 4),
        "style_adapters_write_s": round(write_s, 1),
    }
    result["swaps"] = swaps
    result["swap_s_max"] = max(s["swap_s"] for s in swaps.values() if s["swap_s"] is not None)
    result["swap_graphs_compiled"] = sum(
        s["graphs_compiled"] + s.get("graphs_compiled_timed_loops", 0) for s in swaps.values()
    )
