"""Post-production benchmark: CPU seconds of every stage per clip, and CPU cores per GPU to keep up.

    python -m bench.postprocess [--out DIR] [--repeats N] [--profiles standard social-30]

Runs the real chain (``tasks.postprod.chain.finish_frames``: content filter, stabilization,
conform with motion interpolation and deflicker, visible and invisible watermarks, H.264
encode, C2PA signature, preview) for each profile (``standard`` delivers 24 fps, ``social-30``
30 fps, the expensive interpolation) on synthetic clips at the real sizes: 1280x704x121 at
24 fps (TI2V-5B) and 832x480x81 at 16 fps (A14B). The frames are a textured scene with a slow
pan and camera shake, so stabilization runs rather than skips (the expensive case). CPU seconds
are each stage's process plus child (ffmpeg) CPU time, one thread per clip: a host
post-processes as many clips in parallel as it has cores.

``cores_per_gpu`` = a clip's post-production CPU seconds / the GPU seconds that clip takes to
generate (bench/results/engine-latest.json, exact mode): the cores one GPU keeps busy.

``watermark_stages`` times the invisible watermark's two embedders side by side on the same
frames, in the same run: the dwtDctSvd chroma mark the profiles used before issue 17
(``tasks.postprod.invisible``) and the periodic luma mark that replaced it
(``tasks.postprod.periodic_mark``), with the new one's cost as a ratio of the old.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import cpu_name
from catalogs.problems import RowRef
from tasks.postprod.chain import ChainTools, finish_frames
from tasks.postprod.content_filter import FrameClassifier
from tasks.postprod.invisible import embed_watermark
from tasks.postprod.overlay import WatermarkStamps
from tasks.postprod.periodic_mark import embed_periodic_mark
from tasks.postprod.profile import PostprocessProfile, load_profiles
from tasks.postprod.provenance import ProvenanceParams, ensure_dev_certificate_chain
from tasks.records import ClipSpec, GeneratedClip
from wan_engine import GenerationRequest, get_model_spec, resolve_request

SIZES = {
    "1280x704x121": (1280, 704, 121, 24),
    "832x480x81": (832, 480, 81, 16),
}
# Which clip size each model makes, and its GPU seconds per clip in exact mode (engine-latest.json).
MODELS = {
    "ti2v-5b": ("1280x704x121", "ti2v5b_720p"),
    "t2v-a14b": ("832x480x81", "a14b_t2v_480p"),
    "i2v-a14b": ("832x480x81", "a14b_i2v_480p"),
}
ENGINE_RESULTS = Path(__file__).with_name("results") / "engine-latest.json"


def shaky_scene(width: int, height: int, frames: int, seed: int = 0) -> np.ndarray:
    """A smooth random texture filmed with a slow pan and a few pixels of hand-held shake."""
    rng = np.random.default_rng(seed)
    margin = 48
    texture = rng.integers(
        0, 255, ((height + 2 * margin) // 8 + 1, (width + 2 * margin + frames * 2) // 8 + 1, 3)
    )
    scene = np.kron(texture, np.ones((8, 8, 1))).astype(np.float32)
    # Blur the blocks so the motion search sees texture, not a grid.
    for axis in (0, 1):
        scene = (scene + np.roll(scene, 3, axis) + np.roll(scene, -3, axis)) / 3
    shake = rng.normal(0, 3, (frames, 2)).round().astype(int)
    video = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        y = margin + shake[t, 0]
        x = margin + 2 * t + shake[t, 1]
        video[t] = scene[y : y + height, x : x + width]
    return video


# The model that makes frames at each rate: a clip spec names one (no model made the synthetic frames).
_MODEL_AT_FPS = {24: "ti2v-5b", 16: "t2v-a14b"}


def spec_for(
    name: str, width: int, height: int, frames: int, fps: int, profile: str = "standard"
) -> ClipSpec:
    """A clip spec for synthetic frames of this size, as the model that makes clips at ``fps`` would."""
    model = get_model_spec(_MODEL_AT_FPS[fps])
    request = GenerationRequest(prompt="bench", seed=0, width=width, height=height, num_frames=frames)
    return ClipSpec(
        clip_id=f"bench-{name}",
        origin=RowRef(source="catalog", row=0, sku="BENCH"),
        model=model,
        request=resolve_request(model, request),
        profile=profile,
    )


def measure(profile: PostprocessProfile, repeats: int) -> dict:
    """Median CPU seconds per stage, per clip size, of ``profile`` over ``repeats`` runs."""
    logo = Image.open(profile.logo_location) if profile.logo_location else None
    with tempfile.TemporaryDirectory() as tmp:
        provenance = ProvenanceParams.for_chain(ensure_dev_certificate_chain(Path(tmp) / "c2pa"))
        mark = replace(profile.visible_watermark, logo=logo) if logo else profile.visible_watermark
        tools = ChainTools(FrameClassifier(1), provenance, WatermarkStamps(mark), threads=1)
        per_size = {}
        for name, (width, height, frames, fps) in SIZES.items():
            clip = GeneratedClip(
                clip=spec_for(name, width, height, frames, fps),
                frames=shaky_scene(width, height, frames),
                worker="bench",
                engine_mode="exact",
            )
            runs = []
            for repeat in range(repeats):
                started = time.perf_counter()
                finished = finish_frames(clip, profile, tools, "bench-run", Path(tmp) / f"{name}-{repeat}")
                wall = time.perf_counter() - started
                runs.append(({r.stage: r.cpu_seconds for r in finished.stages}, wall, finished))
                print(profile.name, name, repeat, json.dumps(runs[-1][0]), f"wall {wall:.1f} s", flush=True)
            stages = {stage: round(statistics.median(r[0][stage] for r in runs), 2) for stage in runs[0][0]}
            finished = runs[0][2]
            per_size[name] = {
                "stage_cpu_s": stages,
                "total_cpu_s": round(sum(stages.values()), 2),
                "wall_s": round(statistics.median(r[1] for r in runs), 2),
                "stabilize_applied": next(r.applied for r in finished.stages if r.stage == "stabilize"),
                "delivered": f"{finished.width}x{finished.height}x{finished.frame_count}@{finished.fps}",
            }
    return per_size


def watermark_stages(repeats: int) -> dict:
    """Median CPU seconds of the old (dwtDctSvd) and new (periodic) watermark stages on the same frames."""
    per_size = {}
    for name, (width, height, frames, _) in SIZES.items():
        clip = shaky_scene(width, height, frames)
        old = statistics.median(embed_watermark(clip, 0xA1B2C3D4E5F6)[1].cpu_seconds for _ in range(repeats))
        new_reports = [embed_periodic_mark(clip, 0xA1B2C3D4E5F6)[1] for _ in range(repeats)]
        new = statistics.median(report.cpu_seconds for report in new_reports)
        per_size[name] = {
            "dwtdctsvd_cpu_s": round(old, 3),
            "periodic_cpu_s": round(new, 3),
            "periodic_over_dwtdctsvd": round(new / old, 3),
            "dwtdctsvd_ms_per_frame": round(1000 * old / frames, 2),
            "periodic_ms_per_frame": round(1000 * new / frames, 2),
            "periodic_min_psnr_db": new_reports[0].outcome["min_psnr_db"],
        }
        print("watermark stages", name, json.dumps(per_size[name]), flush=True)
    return per_size


def cores_per_gpu(per_size: dict) -> dict:
    """For each model: its clip's post-production CPU seconds over its GPU seconds per clip."""
    engine = json.loads(ENGINE_RESULTS.read_text())
    cores = {}
    for model, (size, config) in MODELS.items():
        gpu_s = engine[config]["ours_s"]
        cores[model] = {
            "clip": size,
            "gpu_s_per_clip": gpu_s,
            "gpu_device": engine[config]["device"],
            "cpu_s_per_clip": per_size[size]["total_cpu_s"],
            "cores_per_gpu": round(per_size[size]["total_cpu_s"] / gpu_s, 2),
        }
    return cores


def run(out_dir: Path, repeats: int, profile_names: list[str]) -> dict:
    profiles = load_profiles()
    stages = watermark_stages(max(repeats, 3))
    measured = {name: measure(profiles[name], repeats) for name in profile_names}
    first = profile_names[0]
    result = {
        "host": platform.node(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": round(os.getloadavg()[0], 1),
        "profile": first,
        "repeats": repeats,
        "per_clip_size": measured[first],
        "cores_per_gpu": cores_per_gpu(measured[first]),
        "watermark_stages": stages,
        "profiles": {
            name: {"per_clip_size": sizes, "cores_per_gpu": cores_per_gpu(sizes)}
            for name, sizes in measured.items()
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "postprocess-latest.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--profiles", nargs="+", default=["standard", "social-30"], help="the first one is the summary's"
    )
    args = parser.parse_args()
    run(args.out, args.repeats, args.profiles)


if __name__ == "__main__":
    main()
