"""Fleet benchmark: the real nightly flow on 1, 2, 4... GPUs, and how busy it keeps each of them.

    python -m bench.fleet --gpus 1 2 --clips-per-gpu 5 --steps 6 --out DIR
    python -m bench.fleet --gpus 1 --recipe lightx2v-4step --clips-per-gpu 20 --out DIR
    python -m bench.fleet --summarize bench/results/DATE   # merge runs into bench/results/fleet-latest.json

Run on the GPU machine (bench/README.md has the exact commands used). It builds the model at real
size with random weights once (the compute of real weights) and saves it as a diffusers folder,
then for each GPU count runs the real ``nightly-catalog`` flow (Prefect, a Ray cluster of that
many GPUs, the generator actors, post-production, encoding, C2PA, upload, the manifest) over a
catalog of ``clips-per-gpu x GPUs`` new products. By default the model is TI2V-5B and the clips
are real-size 1280x704 x 121 frames; only their step count is cut (``--steps``) so that a run fits
the device's 10-minute commands.

``--recipe lightx2v-4step`` runs the distilled recipe instead: T2V-A14B at 832x480 x 81 frames, 4
steps without guidance, every catalog row naming the recipe (its ``recipe`` column). The recipe's
LoRA pair (catalogs/adapters.toml's entry) is written as random rank-64 files under a local adapter
root (``WANFACTORY_ADAPTER_ROOT``), and each generator actor fuses it at load, as a production actor
fuses the published files. The A14B folder stores one expert's weights and links the other's files
to them (the same random weights, loaded as two experts): a one-GPU machine's 64 GiB disk does not
hold two 28 GB experts and the text encoder.

The real object store cannot run there: an S3 stand-in (moto's server) takes its place, in this
process; upload throughput to the real store is measured on the CPU machine (bench.upload).

Measured per GPU count, between the first clip's start on a GPU and the last clip's end:
- each GPU's busy fraction: NVML's utilization (the share of time one or more kernels ran),
  sampled every 0.1 s, averaged over that window; and, from the manifest's per-clip timeline, the
  share of the window the GPU held a clip;
- clips per hour over that window, and over the whole flow (model loading included);
- each actor's model-load time (weights to the GPU plus compile and warm-up);
- post-production's CPU seconds per clip (every stage, ffmpeg included, from the manifest) and the
  CPU cores it takes per GPU at the measured clip rate.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bench.common import device_name
from infra.processes import free_ports

DEFAULT_FAMILY = "ti2v-5b"
DISTILLED_FAMILY = "t2v-a14b"  # the distilled recipe's model here (TI2V-5B has no distilled recipe)
DISTILLED_SIZE = "832x480"
NVML_PERIOD_S = 0.1
ADAPTER_RANK = 64


def build_model(model_root: Path, variant: str, family: str, recipe: str, adapter_root: Path) -> None:
    """Save ``family`` with random weights under ``model_root``, and random files for the adapters
    ``recipe`` fuses under ``adapter_root`` (run in a child process: the driver must hold no CUDA
    context, or GPU 0 would carry its memory through every run)."""
    from wan_engine import get_model_spec, get_recipe

    spec = get_model_spec(family, variant)
    folder = model_root / spec.folder
    started = time.perf_counter()
    transformer = None
    if not (folder / "model_index.json").exists():
        if variant == "tiny":
            from wan_engine.random_weights import build_random_pipeline

            pipeline = build_random_pipeline(spec)
            pipeline.save_pretrained(folder)
            transformer = pipeline.transformer
        else:
            # Real size: made on the GPU in bf16 (bench.real_size), as float32 on the host it would not fit.
            from bench.common import DEVICE
            from bench.real_size import build_components

            components = build_components(spec, DEVICE)
            save_real_size(spec, components, folder)
            transformer = components["transformer"]
        print(f"built {spec.name} in {time.perf_counter() - started:.0f} s at {folder}", flush=True)
    fused = get_recipe(spec, recipe).fused_adapters
    if fused:
        write_recipe_adapters(spec, [name for name, _ in fused], adapter_root, transformer, folder)


def save_real_size(spec, components: dict, folder: Path) -> None:
    """A real-size random pipeline as a diffusers folder; an A14B one with one expert's files stored
    and the other expert's folder hard links to them (both load, as two experts of equal weights)."""
    from bench.real_size import pipeline_for

    if not spec.is_moe:
        pipeline_for(spec, components).save_pretrained(folder)
        return
    pipeline_for(spec, {**components, "transformer_2": None}).save_pretrained(folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["transformer_2"] = index["transformer"]
    index_path.write_text(json.dumps(index, indent=2))
    (folder / "transformer_2").mkdir()
    for file in (folder / "transformer").iterdir():
        os.link(file, folder / "transformer_2" / file.name)


def write_recipe_adapters(
    spec, names: list[str], adapter_root: Path, transformer: object | None, folder: Path
) -> None:
    """Random rank-``ADAPTER_RANK`` LoRAs (bench.engine.distilled.write_lora) at the registry's paths of
    ``names`` under ``adapter_root``: the stand-ins for the published distillation files."""
    from bench.engine.distilled import write_lora
    from catalogs.adapters import load_adapter_registry

    if transformer is None:  # the model was built by an earlier run: its config is enough for the shapes
        from diffusers import WanTransformer3DModel

        with torch.device("meta"):
            transformer = WanTransformer3DModel.from_config(
                WanTransformer3DModel.load_config(folder / "transformer")
            )
    registry = load_adapter_registry(None, str(adapter_root))
    files = [(name, *file) for name in names for file in registry.entries[name].files(registry.root)]
    for seed, (name, expert, uri) in enumerate(files, start=1000):
        path = Path(uri)
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        write_lora(transformer, path, seed=seed, rank=ADAPTER_RANK)
        print(f"wrote random rank-{ADAPTER_RANK} {name} ({expert}) at {path}", flush=True)


class UtilizationSampler:
    """NVML's GPU utilization of the given GPUs, sampled every NVML_PERIOD_S in a thread."""

    def __init__(self, gpu_indices: list[int]) -> None:
        self.samples: dict[int, list[tuple[float, int]]] = {i: [] for i in gpu_indices}
        self.available = False
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = {i: pynvml.nvmlDeviceGetHandleByIndex(i) for i in gpu_indices}
            self.available = bool(gpu_indices)
        except Exception as err:  # no driver here (a CPU dry run): spans only
            print(f"NVML unavailable ({err}); GPU busy from clip spans only", flush=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> UtilizationSampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(NVML_PERIOD_S):
            now = time.time()
            for index, handle in self._handles.items():
                self.samples[index].append((now, self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu))

    def busy(self, index: int, start: float, end: float) -> float | None:
        window = [value for t, value in self.samples.get(index, []) if start <= t <= end]
        return round(statistics.fmean(window) / 100, 4) if window else None


def catalog_for(path: Path, gpus: int, clips: int, args: argparse.Namespace) -> None:
    """A catalog of ``clips`` new products for this GPU count (SKUs unique per count: none is skipped)."""
    # Imported here: --build-model runs where only the engine's packages are installed (no pydantic).
    from catalogs.schema import CATALOG_SCHEMA

    now = datetime.now(UTC)
    extra = {"recipe": args.recipe} if args.recipe != "standard" else {}
    rows = [
        {
            "sku": f"FLEET-{gpus}GPU-{i:04d}",
            "title": f"Bench product {i}",
            "description": "A ceramic mug with a matte glaze.",
            "style": "studio",
            "updated_at": now,
            "model": args.model,
            "size": args.size,
            "num_frames": args.frames,
            "steps": args.steps,
            **extra,
        }
        for i in range(clips)
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA), path)


def gpu_of(worker: str) -> int | None:
    """The GPU index a worker name carries ('<node>/gpu2/pid123' -> 2), as Ray numbered it."""
    part = worker.split("/")[1]
    return int(part.removeprefix("gpu")) if part.startswith("gpu") else None


def run_count(args: argparse.Namespace, gpus: int, workdir: Path) -> dict:
    """One nightly flow on ``gpus`` GPUs (or CPU actors when 0); its measurements."""
    import ray

    from flows.nightly import nightly_catalog
    from infra.settings import Settings
    from tasks.fleet import connect_ray

    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(gpus)))
    catalog = workdir / f"catalog-{gpus}gpu.parquet"
    clips = args.clips_per_gpu * max(gpus, 1)
    catalog_for(catalog, gpus, clips, args)
    connect_ray(Settings())
    print(f"[{gpus} GPU] ray resources {ray.cluster_resources()}", flush=True)
    started = time.time()
    with UtilizationSampler(list(range(gpus))) as sampler:
        result = nightly_catalog(catalog_uri=str(catalog), return_state=True).result(raise_on_failure=False)
    flow_seconds = time.time() - started
    ray.shutdown()

    made = [e for e in result.entries if e.generate_started_at is not None]
    spans = [
        (e.worker, e.generate_started_at.timestamp(), e.generate_started_at.timestamp() + e.generate_seconds)
        for e in made
    ]
    first, last = min(s for _, s, _ in spans), max(end for _, _, end in spans)
    window = last - first
    per_gpu = {}
    for worker in sorted({w for w, _, _ in spans}):
        held = sum(end - s for w, s, end in spans if w == worker)
        index = gpu_of(worker)
        per_gpu[worker] = {
            "gpu": index,
            "clips": sum(1 for w, _, _ in spans if w == worker),
            "nvml_busy": sampler.busy(index, first, last) if index is not None else None,
            "clip_span_busy": round(held / window, 4),
            "load_seconds": round(result.load_seconds.get(worker, float("nan")), 1),
        }
    nvml = [g["nvml_busy"] for g in per_gpu.values() if g["nvml_busy"] is not None]
    statuses = [str(e.status) for e in result.entries]
    clips_per_hour = len(made) / window * 3600
    # Post-production's CPU seconds per clip (every stage, its ffmpeg children included), and the cores
    # that takes per GPU at the clip rate measured: what a host must have beside each GPU.
    postprocess_cpu = [sum(stage["cpu_seconds"] for stage in e.postprocess) for e in made if e.postprocess]
    cpu_per_clip = statistics.fmean(postprocess_cpu) if postprocess_cpu else None
    summary = {
        "gpus": gpus,
        "clips": clips,
        "statuses": {s: statuses.count(s) for s in sorted(set(statuses))},
        "window_seconds": round(window, 1),
        "flow_seconds": round(flow_seconds, 1),
        "clips_per_hour": round(clips_per_hour, 1),
        "clips_per_hour_with_load": round(len(made) / flow_seconds * 3600, 1),
        "gpu_busy_min": min(nvml) if nvml else None,
        "clip_span_busy_min": min(g["clip_span_busy"] for g in per_gpu.values()),
        "load_seconds_max": max(g["load_seconds"] for g in per_gpu.values()),
        "seconds_per_clip_on_gpu": round(statistics.fmean(end - s for _, s, end in spans), 2),
        "postprocess_clips": len(postprocess_cpu),
        "postprocess_cpu_s_per_clip": round(cpu_per_clip, 2) if cpu_per_clip is not None else None,
        "postprocess_cores_per_gpu": round(cpu_per_clip * clips_per_hour / max(gpus, 1) / 3600, 3)
        if cpu_per_clip is not None
        else None,
        # What made the clips, from the manifest: the recipe and the adapters fused into the actors' weights.
        "recipes": dict(Counter(str(getattr(e, "recipe", None)) for e in made)),
        "fused_adapters": sorted(
            {a["name"] for e in made for a in getattr(e, "adapters", None) or [] if a.get("fused")}
        ),
        "adapter_swaps": sum(1 for e in made if getattr(e, "adapter_swap_seconds", None) is not None),
        "actors": per_gpu,
        "manifest": result.manifest.parquet_key,
    }
    print(f"[{gpus} GPU] {json.dumps({k: v for k, v in summary.items() if k != 'actors'})}", flush=True)
    return summary


def run(args: argparse.Namespace) -> None:
    started = time.monotonic()
    from moto.server import ThreadedMotoServer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="wanfactory-fleet-"))
    model_root = workdir / "models"
    adapter_root = workdir / "adapters"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.fleet",
            "--build-model",
            str(model_root),
            "--variant",
            args.variant,
            "--model",
            args.model,
            "--recipe",
            args.recipe,
            "--adapter-root",
            str(adapter_root),
        ],
        check=True,
    )
    (s3_port,) = free_ports(1)
    # The S3 stand-in: moto's server in this process (the real store cannot run on the GPU machine).
    store = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    store.start()
    os.environ |= {
        "WANFACTORY_S3_ENDPOINT": f"127.0.0.1:{s3_port}",
        "WANFACTORY_MODEL_ROOT": str(model_root),
        "WANFACTORY_MODEL_VARIANT": args.variant,
        "WANFACTORY_DEFAULT_TEXT_MODEL": args.model,
        "WANFACTORY_ADAPTER_ROOT": str(adapter_root),
        "WANFACTORY_STATE_DIR": str(workdir / "state"),
        "WANFACTORY_MODEL_CACHE_DIR": str(workdir / "cache"),
        "WANFACTORY_RAY_OBJECT_STORE_BYTES": str(args.object_store_gib << 30),
        "WANFACTORY_CPU_ACTORS_PER_MODEL": str(args.cpu_actors),
        "WANFACTORY_FINISHER_NUM_CPUS": "1",
        "RAY_AUTH_MODE": "disabled",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    from infra.objectstore import ObjectStore
    from infra.settings import Settings

    ObjectStore(Settings().object_store()).ensure_bucket()
    from prefect.testing.utilities import prefect_test_harness

    device = host_device()
    runs = []
    with prefect_test_harness(server_startup_timeout=120):
        for gpus in args.gpus:
            # A count that would not finish inside the command's limit is left for another command,
            # so the counts already measured are written and reported, not lost with a killed run.
            longest = max((r["flow_seconds"] for r in runs), default=0.0)
            if args.budget_s and runs and time.monotonic() - started + 1.2 * longest > args.budget_s:
                print(f"[{gpus} GPU] skipped: would not finish inside --budget-s {args.budget_s}", flush=True)
                continue
            summary = run_count(args, gpus, workdir)
            summary |= {
                "device": device,
                "model": args.model,
                "recipe": args.recipe,
                "size": args.size,
                "steps": args.clip_steps,
                "frames": args.frames,
                "variant": args.variant,
            }
            runs.append(summary)
            (out / f"fleet-{gpus}gpu.json").write_text(json.dumps(summary, indent=1))
    store.stop()
    print_table(runs)


def host_device() -> str:
    """This host's GPUs, e.g. ``2x NVIDIA H200`` (the runs use up to all of them), else its CPU.

    Naming a GPU creates no CUDA context (checked on an H200 with torch 2.11: no primary context,
    no memory), so this driver still holds none.
    """
    gpus = torch.cuda.device_count()
    return f"{gpus}x {device_name()}" if gpus else device_name()


def print_table(runs: list[dict]) -> None:
    one = next((r for r in runs if r["gpus"] == 1), None)
    print(
        "| GPUs | clips | clips/hour | vs 1 GPU | GPU busy min (NVML) | clip span busy min | load s "
        "| GPU s/clip | post-prod CPU s/clip | post-prod cores/GPU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        scaling = f"{r['clips_per_hour'] / one['clips_per_hour']:.2f}x" if one else "-"
        print(
            f"| {r['gpus']} | {r['clips']} | {r['clips_per_hour']} | {scaling} | {r['gpu_busy_min']} "
            f"| {r['clip_span_busy_min']} | {r['load_seconds_max']} | {r['seconds_per_clip_on_gpu']} "
            f"| {r.get('postprocess_cpu_s_per_clip')} | {r.get('postprocess_cores_per_gpu')} |"
        )


def summarize(results_dir: Path, note: str | None = None) -> dict:
    """Merge ``fleet-<n>gpu.json`` runs into ``bench/results/fleet-latest.json``, with scaling vs 1 GPU."""
    runs = sorted(
        (json.loads(p.read_text()) for p in results_dir.glob("fleet-*gpu.json")), key=lambda r: r["gpus"]
    )
    one = next(r for r in runs if r["gpus"] == 1)
    latest = {
        "source": str(results_dir),
        "note": note,
        "device": sorted({r["device"] for r in runs}),
        "runs": [
            {
                **{k: r[k] for k in ("gpus", "clips", "clips_per_hour", "gpu_busy_min", "device")},
                "scaling_vs_1gpu": round(r["clips_per_hour"] / one["clips_per_hour"], 3),
                "clip_span_busy_min": r["clip_span_busy_min"],
                "clips_per_hour_with_load": r["clips_per_hour_with_load"],
                "load_seconds_max": r["load_seconds_max"],
                "steps": r["steps"],
                "frames": r["frames"],
                **{
                    k: r[k]
                    for k in (
                        "model",
                        "recipe",
                        "size",
                        "seconds_per_clip_on_gpu",
                        "postprocess_cpu_s_per_clip",
                        "postprocess_cores_per_gpu",
                    )
                    if k in r
                },
            }
            for r in runs
        ],
    }
    target = Path(__file__).parent / "results" / "fleet-latest.json"
    target.write_text(json.dumps(latest, indent=1) + "\n")
    print_table(runs)
    return latest


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fill the model, size, frames, steps and object store a run of ``args.recipe`` takes by default."""
    from wan_engine import get_model_spec, get_recipe

    distilled = args.recipe != "standard"
    args.model = args.model or (DISTILLED_FAMILY if distilled else DEFAULT_FAMILY)
    spec = get_model_spec(args.model, args.variant)
    recipe = get_recipe(spec, args.recipe)  # UnknownRecipeError names the recipes the model has
    if distilled and args.size is None and args.variant == "full":
        args.size = DISTILLED_SIZE
    args.frames = args.frames or spec.num_frames
    if recipe.fixed_steps:
        args.steps = None  # the catalog names none: the recipe's own
    elif args.steps is None:
        args.steps = 6
    args.clip_steps = args.steps or recipe.steps
    if args.object_store_gib is None:
        args.object_store_gib = 8 if spec.is_moe else 16


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpus", type=int, nargs="+", default=[1], help="GPU counts to run, in order")
    parser.add_argument("--clips-per-gpu", type=int, default=5)
    parser.add_argument(
        "--recipe",
        choices=("standard", "lightx2v-4step"),
        default="standard",
        help=f"sampling recipe of every row; lightx2v-4step: {DISTILLED_FAMILY} at {DISTILLED_SIZE}, "
        "4 steps, its random LoRA pair fused at load",
    )
    parser.add_argument(
        "--model", help=f"model family (default: {DEFAULT_FAMILY}; {DISTILLED_FAMILY} with lightx2v-4step)"
    )
    parser.add_argument("--size", help="WIDTHxHEIGHT (default: the model's; 832x480 with lightx2v-4step)")
    parser.add_argument("--frames", type=int, help="frames per clip, 4k+1 (default: the model's, 121 or 81)")
    parser.add_argument(
        "--steps",
        type=int,
        help="denoising steps per clip (default 6, official: 50; a distilled recipe: its own)",
    )
    parser.add_argument("--variant", choices=("full", "tiny"), default="full")
    parser.add_argument("--cpu-actors", type=int, default=1, help="generator actors when a run has 0 GPUs")
    parser.add_argument(
        "--object-store-gib",
        type=int,
        help="Ray object store per run (default 16; 8 for A14B, whose weights "
        "take most of the host's memory while they load)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=0,
        help="skip GPU counts that would end past this many seconds of the command (the first always runs)",
    )
    parser.add_argument("--workdir", help="where models, state and catalogs go (default: a temp dir)")
    parser.add_argument("--out", default="bench/results/fleet-run")
    parser.add_argument("--build-model", metavar="MODEL_ROOT", help=argparse.SUPPRESS)
    parser.add_argument("--adapter-root", help=argparse.SUPPRESS)
    parser.add_argument("--summarize", metavar="RESULTS_DIR", type=Path)
    parser.add_argument("--note", help="with --summarize: what the summary should be read with")
    args = parser.parse_args()
    resolve_defaults(args)
    if args.build_model:
        build_model(Path(args.build_model), args.variant, args.model, args.recipe, Path(args.adapter_root))
    elif args.summarize:
        summarize(args.summarize, args.note)
    else:
        run(args)


if __name__ == "__main__":
    main()
