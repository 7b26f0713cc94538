"""The periodic watermark after what platforms do to a clip: per transform, bits correct and how sure.

    python -m bench.watermark_robustness [--out DIR]

Marks three clips with :func:`tasks.postprod.periodic_mark.embed_periodic_mark`, delivers each
as the chain does (x264 crf 18), then runs every transform of issue 17 with ffmpeg on the
delivered file and reads it back as ``wanfactory verify`` does:

* a pan across a real photo (scikit-image's coffee) at 832x480, 24 fps, 6.5 s;
* a pan across a real photo (scikit-image's Hubble deep field) at 1280x720, 24 fps, 6.5 s;
* a clip of the tiny T2V model delivered at 384x256 (upscaled as the standard profile does),
  16 fps, played forward, back and forward (the tiny model makes at most 33 frames) to 6 s.

Writes ``watermark-robustness.json``: per clip and transform the payload's correct bits (of 48),
``z``, the CRC, found, the false-positive probability and the scale found; per clip the marked
frames' lowest PSNR. tests/test_periodic_mark.py runs the same transforms and asserts on them.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

from bench.common import cpu_name
from tasks.encode import encode_mp4
from tasks.postprod.chain import deliver_size
from tasks.postprod.invisible import PAYLOAD_BITS, payload_for
from tasks.postprod.periodic_mark import embed_periodic_mark, read_periodic_mark_file
from tasks.postprod.profile import DeliveryParams

PAYLOAD = payload_for("sku-123-a1b2c3", "nightly-2026-12-07")
PUBLISHED_CRF = 18  # what the chain delivers

# What platforms do, as ffmpeg arguments on the delivered file. Crops and scales keep sizes even
# (yuv420p). "10 % from two sides" cuts the left and the top, which moves the tile phase on both axes.
TRANSFORMS: dict[str, list[str]] = {
    "scale-2/3": ["-vf", "scale=trunc(iw*2/3/2)*2:-2"],
    "scale-1/2": ["-vf", "scale=trunc(iw/4)*2:-2"],
    "crop-5%-every-side": ["-vf", "crop=trunc(iw*0.45)*2:trunc(ih*0.45)*2"],
    "crop-10%-left-and-top": ["-vf", "crop=trunc(iw*0.45)*2:trunc(ih*0.45)*2:iw*0.1:ih*0.1"],
    "centre-crop-9:16": ["-vf", "crop=trunc(ih*9/32)*2:ih"],
    "centre-crop-1:1": ["-vf", "crop=ih:ih"],
    "x264-crf-30": ["-crf", "30"],
    "chain-1/2-crf30-30fps": ["-vf", "scale=trunc(iw/4)*2:-2,fps=30", "-crf", "30"],
}
# The frame-rate change each clip's rate gets (the 24 -> 30 and 16 -> 25).
FPS_CHANGE = {24: 30, 16: 25}
EXCERPT_SECONDS = 5.0


def transform(source: Path, out: Path, args: list[str]) -> Path:
    """``source`` re-encoded by x264 after ``args`` (crf 18 unless the args name one), as a platform does."""
    crf = [] if "-crf" in args else ["-crf", str(PUBLISHED_CRF)]
    command = ["ffmpeg", "-y", "-loglevel", "error", "-i", str(source), *args, "-c:v", "libx264", *crf]
    subprocess.run([*command, "-pix_fmt", "yuv420p", "-an", str(out)], check=True)
    return out


def middle_excerpt(source: Path, out: Path, duration_s: float, seconds: float = EXCERPT_SECONDS) -> Path:
    """The ``seconds`` in the middle of ``source`` (``duration_s`` long), re-encoded."""
    return transform(source, out, ["-ss", f"{(duration_s - seconds) / 2:.3f}", "-t", str(seconds)])


def all_transforms(fps: int) -> dict[str, list[str]]:
    """Every transform of issue 17 for a clip at ``fps``, as ffmpeg arguments (the excerpt aside)."""
    return {**TRANSFORMS, f"{fps}-to-{FPS_CHANGE[fps]}-fps": ["-vf", f"fps={FPS_CHANGE[fps]}"]}


def photo_pan(
    photo: np.ndarray, scene_size: tuple[int, int], width: int, height: int, frames: int
) -> np.ndarray:
    """A slow diagonal pan across ``photo`` resized to ``scene_size`` (bicubic), ``frames`` long."""
    scene = np.asarray(Image.fromarray(photo).resize(scene_size, Image.Resampling.BICUBIC))
    return np.stack([scene[100 + t // 2 :][:height, 2 * t : 2 * t + width] for t in range(frames)])


def coffee_pan(frames: int = 156) -> np.ndarray:
    """scikit-image's coffee photo (400x600) panned at 832x480."""
    return photo_pan(data.coffee(), (1200, 800), 832, 480, frames)


def hubble_pan(frames: int = 156) -> np.ndarray:
    """scikit-image's Hubble deep field (872x1000) panned at 1280x720."""
    return photo_pan(data.hubble_deep_field(), (1600, 1000), 1280, 720, frames)


def tiny_model_boomerang(model_dir: Path) -> tuple[np.ndarray, int]:
    """A tiny T2V clip delivered at 384x256 as the standard profile does, forward-back-forward."""
    from wan_engine import GenerationRequest, WanGenerator, get_model_spec, save_random_pipeline

    spec = get_model_spec("t2v-a14b", "tiny")
    generator = WanGenerator.from_pretrained(save_random_pipeline(spec, model_dir), spec, device="cpu")
    generated = generator.generate(GenerationRequest(prompt="a red sneaker", seed=5, num_frames=33)).frames
    boomerang = np.concatenate([generated, generated[-2::-1], generated[1:]])
    return deliver_size(boomerang, DeliveryParams(min_short_side=256))[0], spec.fps


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def measure_clip(frames: np.ndarray, fps: int, work: Path) -> dict:
    """Mark, deliver and read back ``frames`` after every transform."""
    started = time.process_time()
    marked, report = embed_periodic_mark(frames, PAYLOAD)
    embed_cpu_s = time.process_time() - started
    delivered = encode_mp4(marked, fps, work / "delivered.mp4", crf=PUBLISHED_CRF)
    outputs = {
        name: transform(delivered, work / f"{i}.mp4", args)
        for i, (name, args) in enumerate(all_transforms(fps).items())
    }
    outputs["5-s-middle-excerpt"] = middle_excerpt(delivered, work / "excerpt.mp4", len(frames) / fps)
    readings = {"delivered": read_periodic_mark_file(delivered)}
    readings |= {name: read_periodic_mark_file(path) for name, path in outputs.items()}
    return {
        "size": f"{frames.shape[2]}x{frames.shape[1]}x{frames.shape[0]}@{fps}",
        "min_psnr_db": round(min(_psnr(a, b) for a, b in zip(frames, marked, strict=True)), 2),
        "embed_ms_per_frame": round(1000 * embed_cpu_s / len(frames), 2),
        "stage_outcome": report.outcome,
        "transforms": {
            name: {
                "bits_correct": None
                if r.payload is None
                else PAYLOAD_BITS - bin(r.payload ^ PAYLOAD).count("1"),
                "frames_read": r.frames_read,
                **{k: v for k, v in r.to_dict().items() if k in ("found", "z", "crc_ok", "scale")},
                "false_positive_probability": float(f"{r.false_positive_probability:.3g}"),
            }
            for name, r in readings.items()
        },
    }


def run(out_dir: Path) -> dict:
    result: dict = {"host": platform.node(), "cpu": cpu_name(), "payload_hex": f"{PAYLOAD:012x}", "clips": {}}
    with tempfile.TemporaryDirectory() as tmp:
        clips = {
            "coffee-pan-832x480": (coffee_pan(), 24),
            "hubble-pan-1280x720": (hubble_pan(), 24),
            "tiny-t2v-384x256": tiny_model_boomerang(Path(tmp) / "tiny-model"),
        }
        for name, (frames, fps) in clips.items():
            work = Path(tmp) / name
            work.mkdir()
            result["clips"][name] = measure_clip(frames, fps, work)
            print(name, json.dumps(result["clips"][name], indent=1), flush=True)
    every = [t for clip in result["clips"].values() for t in clip["transforms"].values()]
    result["all_exact_and_found"] = all(t["bits_correct"] == PAYLOAD_BITS and t["found"] for t in every)
    result["lowest_z"] = min(t["z"] for t in every)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "watermark-robustness.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results"))
    args = parser.parse_args()
    run(args.out)


if __name__ == "__main__":
    main()
