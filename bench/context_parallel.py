"""Context-parallel benchmark: one A14B clip on 1, 2 and 4 GPUs (diffusers' context parallelism).

    python3 -m bench.context_parallel --config a14b_t2v_720p --gpus 1 2 4 --steps 4 --out DIR [--latest]
    python3 -m bench.context_parallel --dry-run-cpu --out DIR      # the tiny model, 2 processes, gloo

For each GPU count (1 first) it spawns one process per GPU (NCCL; gloo on the CPU). Every process
builds the same real-size components with random weights (``bench.real_size.build_components``,
seeded, so every rank holds the same weights; checked by checksums) and wraps them in a
``WanGenerator`` with ``EngineOptions(context_parallel=gpus > 1)``: the same denoising loop on every
rank, the token sequence split inside each transformer (``wan_engine/parallel.py``). Then one clip
of ``--steps`` steps at the config's size (``--steps`` must cross the expert boundary: 3 or more):

* seconds per step, per expert, timed at each transformer call with a CUDA sync. There is no
  separate warm-up: the first step of each expert (compilation, autotuning, communicator setup) is
  reported as ``first_step_s`` and left out of the steady per-step time. A warm-up clip at 720p would
  cost more than the timed one, and one at another size would recompile at this one;
* the VAE decode, twice (the second is reported; every rank decodes the whole clip, not split);
* peak GPU memory per rank, and the final latents, compared with the 1-GPU run's (relative L2).

The estimate for a full clip is the 40-step schedule's high- and low-noise step counts times each
expert's steady step time, plus one decode. Results: ``DIR/context-parallel-<config>.json`` and
``.md``, and ``bench/results/context-parallel-latest.json`` with ``--latest``. Each GPU count is
written as soon as it finishes; a count that fails or would overrun ``--budget-s`` is recorded as
such and the rest go on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import traceback
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench import common
from bench.common import device_name, peak_memory_gib, relative_error, reset_peak_memory, sync_time
from bench.real_size import Config, build_components, clip_request, config_and_spec, latent_grid, pipeline_for
from infra.processes import free_ports
from wan_engine import EngineOptions, WanGenerator, get_model_spec

CONTEXT_PARALLEL_CONFIGS = ("a14b_t2v_720p", "a14b_t2v_480p")
# Set on the GPU machine (NVLink multicast off); children inherit them, the defaults keep them on.
GPU_ENVIRONMENT = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
FULL_STEPS = 40


def rank_main(rank: int, gpus: int, port: int, settings: dict, work: str) -> None:
    """One rank of one GPU count: build, generate one clip with per-step timing, write rank<N>.json."""
    cpu = settings["cpu"]
    if cpu:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // gpus))
        device = torch.device("cpu")
    else:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    common.DEVICE = device  # sync_time, the peak memory and device_name follow this rank's device
    if gpus > 1:
        dist.init_process_group(
            "gloo" if cpu else "nccl",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=gpus,
            timeout=timedelta(seconds=settings["collective_timeout_s"]),
            **({} if cpu else {"device_id": device}),
        )
    try:
        result = measure(rank, gpus, device, settings, Path(work))
    finally:
        if gpus > 1:
            dist.destroy_process_group()
    (Path(work) / f"rank{rank}.json").write_text(json.dumps(result))


def say(rank: int, message: str) -> None:
    if rank == 0:
        print(f"  [{time.strftime('%H:%M:%S')}] {message}", flush=True)


def measure(rank: int, gpus: int, device: torch.device, settings: dict, work: Path) -> dict:
    spec = get_model_spec(settings["family"], settings["variant"])
    config = Config(settings["family"], settings["width"], settings["height"], settings["frames"])
    started = time.perf_counter()
    components = build_components(spec, device)
    generator = WanGenerator(
        pipeline_for(spec, components),
        spec,
        device,
        EngineOptions(
            context_parallel=gpus > 1,
            compile_blocks=settings["compile"],
            attention_backend=settings["attention_backend"],
        ),
    )
    built_s = time.perf_counter() - started
    say(rank, f"built {spec.name} and its generator in {built_s:.0f} s")
    if settings["steps"] < generator.warmup_steps():
        raise ValueError(f"--steps {settings['steps']} does not cross the expert boundary")
    checksums = weight_checksums(generator)
    request = clip_request(config, settings["steps"])
    if settings["warmup"]:
        warm_started = time.perf_counter()
        generator.generate(replace(request, steps=generator.warmup_steps(), seed=0))
        say(
            rank,
            f"warm-up clip ({generator.warmup_steps()} steps): {time.perf_counter() - warm_started:.0f} s",
        )

    calls: list[tuple[str, float]] = []
    for name, module in generator.experts.items():

        def before_step(*_: object, name: str = name) -> None:
            calls.append((name, sync_time()))
            if len(calls) > 1:
                say(rank, f"step {len(calls) - 1} ({calls[-2][0]}): {calls[-1][1] - calls[-2][1]:.2f} s")

        module.register_forward_pre_hook(before_step)

    reset_peak_memory()
    with torch.inference_mode():
        resolved = generator.validate(request)
        latents = generator.denoise(resolved)  # encodes the prompt first: steps are timed from the hooks
        denoise_end = sync_time()
        denoise_peak = peak_memory_gib()
        say(rank, f"step {len(calls)} ({calls[-1][0]}): {denoise_end - calls[-1][1]:.2f} s")
        decode_s = []
        for _ in range(2):
            start = sync_time()
            video = generator.decode_video(latents)
            decode_s.append(sync_time() - start)
            del video
        say(rank, f"decode {decode_s[0]:.2f} s, again {decode_s[1]:.2f} s")
    if rank == 0:
        torch.save(latents.float().cpu(), work / "latents.pt")
    starts = [t for _, t in calls] + [denoise_end]
    return {
        "rank": rank,
        "device": device_name(),
        "built_s": built_s,
        "steps": [
            {"expert": name, "s": round(b - a, 4)} for (name, a), b in zip(calls, starts[1:], strict=True)
        ],
        "decode_s": decode_s,
        "peak_gib_denoise": denoise_peak,
        "peak_gib": peak_memory_gib(),
        "weight_checksums": checksums,
        "latents_norm": float(latents.double().norm()),
        "tokens_per_rank": token_count(spec, config) // gpus,
        "text_encoder_offloaded": generator.memory_plan.offload_text_encoder,
    }


def weight_checksums(generator: WanGenerator) -> list[float]:
    """Sums of a few weights: equal on every rank when the seeded build gave every rank the same model."""
    modules = [expert.blocks[-1].ffn.net[-1] for expert in generator.experts.values()]
    modules += [expert.proj_out for expert in generator.experts.values()]
    return [float(m.weight.double().sum()) for m in modules] + [
        float(generator.pipeline.text_encoder.shared.weight[:4096].double().sum())
    ]


def token_count(spec, config) -> int:
    _, patch_h, patch_w = spec.architecture.transformer["patch_size"]
    frames, height, width = latent_grid(spec, config)
    return frames * (height // patch_h) * (width // patch_w)


def summarize_count(gpus: int, ranks: list[dict], settings: dict, high_steps_full: int) -> dict:
    """Per-step, per-expert and whole-clip figures of one GPU count from its ranks' reports."""
    lead = ranks[0]
    by_expert: dict[str, list[float]] = {}
    for step in lead["steps"]:
        by_expert.setdefault(step["expert"], []).append(step["s"])
    first = {name: times[0] for name, times in by_expert.items()}
    steady = {
        name: statistics.median(times[1:]) if len(times) > 1 else None for name, times in by_expert.items()
    }
    all_steady = [t for times in by_expert.values() for t in times[1:]]
    per_step = statistics.median(all_steady or [t for times in by_expert.values() for t in times])
    high, low = "high_noise", "low_noise"
    high_s = steady.get(high) or per_step
    low_s = steady.get(low) or high_s  # the experts are the same architecture at the same size
    decode = lead["decode_s"][-1]
    clip = high_steps_full * high_s + (FULL_STEPS - high_steps_full) * low_s + decode
    return {
        "gpus": gpus,
        "layout": "single GPU" if gpus == 1 else settings["layouts"].get(str(gpus), "?"),
        "device": lead["device"],
        "tokens_per_rank": lead["tokens_per_rank"],
        "step_s": [step["s"] for step in lead["steps"]],
        "experts_by_step": [step["expert"] for step in lead["steps"]],
        "first_step_s": {k: round(v, 3) for k, v in first.items()},
        "steady_step_s": {k: None if v is None else round(v, 3) for k, v in steady.items()},
        "per_step_s": round(per_step, 3),
        "low_noise_step_estimated_from_high_noise": steady.get(low) is None,
        "decode_s": round(decode, 3),
        "first_decode_s": round(lead["decode_s"][0], 3),
        "est_clip_s": round(clip, 1),
        "peak_gib_per_gpu": round(max(r["peak_gib"] for r in ranks), 2),
        "peak_gib_denoise_per_gpu": round(max(r["peak_gib_denoise"] for r in ranks), 2),
        "text_encoder_offloaded": lead["text_encoder_offloaded"],
        "built_s": round(lead["built_s"], 1),
        "weights_equal_on_all_ranks": all(r["weight_checksums"] == lead["weight_checksums"] for r in ranks),
        "latents_equal_on_all_ranks": all(r["latents_norm"] == lead["latents_norm"] for r in ranks),
    }


def run_count(gpus: int, settings: dict, deadline: float) -> tuple[dict, torch.Tensor]:
    """Spawn ``gpus`` ranks and wait for them (killing them at ``deadline``); their summary and latents."""
    work = Path(tempfile.mkdtemp(prefix=f"cp-{gpus}-"))
    try:
        context = mp.start_processes(
            rank_main,
            args=(gpus, free_ports(1)[0], settings, str(work)),
            nprocs=gpus,
            join=False,
            start_method="spawn",
        )
        while not context.join(timeout=2):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(f"{gpus} GPU(s): past the time budget, stopped")
        ranks = [json.loads((work / f"rank{rank}.json").read_text()) for rank in range(gpus)]
        latents = torch.load(work / "latents.pt")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ranks, latents


def markdown(result: dict) -> str:
    lines = [
        f"Context parallelism, {result['config']} ({result['size']}, {result['frames']} frames), "
        f"{result['device']}, {result['steps_run']} steps timed, "
        f"compile {'on' if result['compile'] else 'off'}",
        "",
        "| GPUs | layout | s/step | step speedup | step efficiency | decode s | est. 40-step clip s "
        "| clip speedup | clip efficiency | peak GiB/GPU | latents rel L2 vs 1 GPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"].values():
        if "error" in run:
            lines.append(f"| {run['gpus']} | failed: {run['error'].splitlines()[0][:80]} " + "|" * 10)
            continue
        keys = ("step_speedup_vs_1_gpu", "step_parallel_efficiency", "decode_s", "est_clip_s")
        keys += ("clip_speedup_vs_1_gpu", "clip_parallel_efficiency", "peak_gib_per_gpu")
        cells = [run["gpus"], run["layout"], run["per_step_s"], *(run.get(key, "") for key in keys)]
        cells.append(run.get("latents_rel_l2_vs_1_gpu", ""))
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", choices=CONTEXT_PARALLEL_CONFIGS, default="a14b_t2v_720p")
    parser.add_argument(
        "--gpus", type=int, nargs="+", default=None, help="GPU counts (default 1 2 4; CPU 1 2)"
    )
    parser.add_argument(
        "--steps", type=int, default=4, help="denoising steps timed (>= 3: crosses the experts)"
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    parser.add_argument(
        "--latest", action="store_true", help="also write bench/results/context-parallel-latest.json"
    )
    parser.add_argument(
        "--warmup", action="store_true", help="a whole warm-up clip first (costly at 720p; default: none)"
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="eager transformer blocks (default: compiled)"
    )
    parser.add_argument(
        "--attention-backend", default=None, help="a diffusers attention backend (default native)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=540, help="stop starting or running counts after this"
    )
    parser.add_argument(
        "--dry-run-cpu", action="store_true", help="the tiny model on the CPU, gloo, 1 and 2 ranks"
    )
    args = parser.parse_args()
    started = time.monotonic()
    deadline = started + args.budget_s
    cpu = args.dry_run_cpu
    for key, value in GPU_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    counts = sorted(set(args.gpus or ([1, 2] if cpu else [1, 2, 4])))  # 1 first: the reference
    if not cpu and torch.cuda.device_count() < max(counts):
        parser.error(f"{max(counts)} GPUs asked for, {torch.cuda.device_count()} visible")

    variant = "tiny" if cpu else "full"
    config, spec = config_and_spec(args.config, variant)
    heads = spec.architecture.transformer["num_attention_heads"]
    from wan_engine.parallel import context_parallel_degrees

    layouts = {
        str(n): "ulysses" if context_parallel_degrees(heads, n)[1] > 1 else "ring" for n in counts if n > 1
    }
    settings = {
        "cpu": cpu,
        "family": config.family,
        "variant": variant,
        "width": config.width,
        "height": config.height,
        "frames": config.frames,
        "steps": args.steps,
        "compile": not args.no_compile and not cpu,
        "warmup": args.warmup,
        "attention_backend": args.attention_backend,
        "collective_timeout_s": 300,
        "layouts": layouts,
    }
    high_steps_full = high_noise_steps(spec, FULL_STEPS)
    if high_noise_steps(spec, args.steps) in (0, args.steps):
        parser.error(f"--steps {args.steps} does not cross the expert boundary: 3 or more")
    import diffusers

    result: dict = {
        "config": args.config + (" (tiny, CPU dry run)" if cpu else ""),
        "model": spec.name,
        "size": f"{config.width}x{config.height}",
        "frames": config.frames,
        "heads": heads,
        "steps_run": args.steps,
        "full_steps": FULL_STEPS,
        "high_noise_steps_of_full": high_steps_full,
        "compile": settings["compile"],
        "attention_backend": args.attention_backend or "native",
        "device": None,  # from the ranks: the parent never touches a GPU
        "host": platform.node(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "environment": {key: os.environ.get(key) for key in GPU_ENVIRONMENT},
        "warmup": (
            "a warm-up clip of the fewest steps that cross the expert boundary, at this size"
            if args.warmup
            else "no separate warm-up: each expert's first step (compile, autotune, communicators) is "
            "reported as first_step_s and left out of the steady step time"
        ),
        "latents_yardstick": "bf16 with random real-size weights amplifies rounding over the steps: "
        "bench/results/2026-11-21 engine-error-ti2v5b_720p.json, stock bf16 vs float32 after 8 steps, 15 %",
        "text_encoder_and_decode": "not split: every rank encodes and decodes the whole clip",
        "runs": {},
    }
    print(
        f"{platform.node()} torch {torch.__version__} diffusers {diffusers.__version__} "
        f"{spec.name} {result['size']}x{config.frames} steps {args.steps} compile {settings['compile']} "
        f"env {result['environment']}",
        flush=True,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    reference = None
    for gpus in counts:
        count_started = time.monotonic()
        predicted = predict_wall(result["runs"], gpus) or 0.0
        if count_started + predicted > deadline:
            reason = f"skipped: {count_started - started:.0f} s spent, {predicted:.0f} s more predicted, "
            reason += f"--budget-s {args.budget_s:.0f}"
            result["runs"][str(gpus)] = {"gpus": gpus, "error": reason}
            print(f"{gpus} GPU(s): {reason}", flush=True)
            write(result, args)
            continue
        print(f"{gpus} GPU(s): {layouts.get(str(gpus), 'single GPU')} ...", flush=True)
        try:
            ranks, latents = run_count(gpus, settings, deadline)
            run = summarize_count(gpus, ranks, settings, high_steps_full)
        except Exception as error:  # a failed count is a result too; the others go on
            details = f"{type(error).__name__}: {error}"
            last_line = [line for line in details.splitlines() if line.strip()][-1]
            run = {"gpus": gpus, "error": last_line[:500], "traceback": details[-4000:]}
            traceback.print_exc()
            latents = None
        run["wall_s"] = round(time.monotonic() - count_started, 1)
        if latents is not None:
            if gpus == 1:
                reference = latents
            elif reference is not None:
                run["latents_rel_l2_vs_1_gpu"] = round(relative_error(latents, reference), 5)
        one = result["runs"].get("1")
        if one and "error" not in one and "error" not in run:
            run["step_speedup_vs_1_gpu"] = round(one["per_step_s"] / run["per_step_s"], 3)
            run["step_parallel_efficiency"] = round(run["step_speedup_vs_1_gpu"] / gpus, 3)
            run["clip_speedup_vs_1_gpu"] = round(one["est_clip_s"] / run["est_clip_s"], 3)
            run["clip_parallel_efficiency"] = round(run["clip_speedup_vs_1_gpu"] / gpus, 3)
        result["runs"][str(gpus)] = run
        result["device"] = result["device"] or run.get("device")
        result["wall_s"] = round(time.monotonic() - started, 1)
        write(result, args)
        print(f"{gpus} GPU(s): {json.dumps(run)}", flush=True)
    print(markdown(result), flush=True)


def high_noise_steps(spec, steps: int) -> int:
    """How many of ``steps`` the high-noise expert runs (A14B's official schedule: 26 of 40)."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=spec.flow_shift
    )
    scheduler.set_timesteps(steps)
    return int((scheduler.timesteps >= spec.boundary_ratio * scheduler.config.num_train_timesteps).sum())


def predict_wall(runs: dict, gpus: int) -> float | None:
    """A GPU count's wall time from the 1-GPU run: its fixed costs (start, build, compilation, decode)
    plus its steady denoising split ``gpus`` ways, with 30 % slack for communication."""
    one = runs.get("1")
    if not one or "error" in one:
        return None
    compute = one["per_step_s"] * len(one["step_s"])
    return one["wall_s"] - compute + 1.3 * compute / gpus


def write(result: dict, args: argparse.Namespace) -> None:
    name = f"context-parallel-{args.config}" + ("-cpu-dry-run" if args.dry_run_cpu else "")
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(markdown(result))
    if args.latest:
        (Path(__file__).parent / "results" / "context-parallel-latest.json").write_text(
            json.dumps(result, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
