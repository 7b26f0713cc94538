"""The periodic watermark's false-positive study: its detection statistic on clips that carry no mark.

    python -m bench.watermark_null [--out DIR] [--windows-per-photo N] [--workers N]

Every window is an unmarked clip read exactly as ``wanfactory verify`` reads one
(:func:`tasks.postprod.periodic_mark.read_periodic_mark`: every scale from 0.4 to 1.6 and every
tile phase searched). The clips:

* **real photos** that scikit-image ships in its wheel (offline): a camera pan across each photo
  (12 to 24 frames, a random direction and speed, the photo resized so the window fits), at the
  sizes platforms serve (416x240 to 832x480, 9:16 and 1:1), every third window through x264;
* **a real video**: scikit-image's ``no_time_for_that_tiny.gif`` (a 10-frame film clip), upscaled;
* **tiny-model clips**: the tiny random-weight Wan2.2 models (T2V and TI2V) on the CPU, upscaled
  to the delivery size as the standard profile does, in crops and scales;
* **periodic textures**: scikit-image's chessboards and brick, the content most like a tiled mark.

It fits a Gumbel law (the law of maxima) to ``z``, gives the threshold where the fitted tail is
``NULL_TAIL_AT_THRESHOLD`` and 1e-6, counts the windows above each, and counts the CRC passes
(each wrong reading's 64-bit word is a guess; the CRC-16 lets one in 65,536 through). Writes
``watermark-null.json``; ``--refit`` summarises an earlier file's readings again (after the
module's threshold constants change) without reading the clips again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import skimage
from PIL import Image, ImageSequence
from scipy import stats

from bench.common import cpu_name
from tasks.postprod.periodic_mark import NULL_TAIL_AT_THRESHOLD, read_periodic_mark, z_threshold

SKIMAGE_DATA = Path(skimage.__file__).with_name("data")
PHOTOS = (
    "astronaut.png camera.png cell.png chelsea.png clock_motion.png coffee.png coins.png grass.png "
    "gravel.png hubble_deep_field.jpg ihc.png moon.png motorcycle_left.png motorcycle_right.png "
    "page.png retina.jpg rocket.jpg text.png horse.png"
).split()
PERIODIC = ("chessboard_GRAY.png", "chessboard_RGB.png", "brick.png")
# The sizes platforms serve: 16:9 at three sizes, 9:16, 1:1, and the A14B delivery size.
WINDOW_SIZES = ((416, 240), (640, 360), (854, 480), (270, 480), (480, 480), (832, 480))


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def pan_clip(image: np.ndarray, width: int, height: int, frames: int, rng: np.random.Generator) -> np.ndarray:
    """A camera pan across ``image`` (resized to leave room to move) at ``width`` x ``height``."""
    travel = int(rng.integers(frames, 6 * frames))
    factor = max((width + travel) / image.shape[1], (height + travel) / image.shape[0], 1.0)
    factor *= float(rng.uniform(1.0, 1.5))
    scene = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_CUBIC)
    angle = float(rng.uniform(0, 2 * np.pi))
    free_y, free_x = scene.shape[0] - height, scene.shape[1] - width
    start_y, start_x = int(rng.integers(0, free_y + 1)), int(rng.integers(0, free_x + 1))
    out = []
    for t in range(frames):
        y = int(np.clip(start_y + t * travel / frames * np.sin(angle), 0, free_y))
        x = int(np.clip(start_x + t * travel / frames * np.cos(angle), 0, free_x))
        out.append(scene[y : y + height, x : x + width])
    return np.stack(out)


def through_x264(frames: np.ndarray, crf: int) -> np.ndarray:
    """``frames`` encoded with x264 at ``crf`` and decoded again."""
    _, height, width, _ = frames.shape
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        encode = ["ffmpeg", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24"]
        encode += ["-s", f"{width}x{height}", "-r", "24", "-i", "-", "-c:v", "libx264", "-crf", str(crf)]
        subprocess.run([*encode, "-pix_fmt", "yuv420p", str(path)], input=frames.tobytes(), check=True)
        decode = ["ffmpeg", "-loglevel", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
        raw = subprocess.run(decode, capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)


def _even(size: tuple[int, int]) -> tuple[int, int]:
    return size[0] // 2 * 2, size[1] // 2 * 2


def photo_window(name: str, index: int) -> np.ndarray:
    """Unmarked pan clip number ``index`` across one photo (its own random direction, size and length)."""
    image, rng = _rgb(SKIMAGE_DATA / name), np.random.default_rng([index, *name.encode()])
    width, height = _even(WINDOW_SIZES[index % len(WINDOW_SIZES)])
    clip = pan_clip(image, width, height, int(rng.integers(12, 25)), rng)
    return through_x264(clip, int(rng.choice([18, 23, 30]))) if index % 3 == 0 else clip


def gif_frames() -> np.ndarray:
    """scikit-image's bundled film clip (a GIF of 10 frames) as RGB frames."""
    gif = Image.open(SKIMAGE_DATA / "no_time_for_that_tiny.gif")
    return np.stack([np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)])


def rescaled_window(frames: np.ndarray, index: int) -> np.ndarray:
    """Window ``index`` of a small clip: upscaled to a short side of 256 to 720, then a random crop."""
    rng = np.random.default_rng([index, frames.shape[0], frames.shape[1], int(frames[0].sum())])
    _, height, width, _ = frames.shape
    factor = float(rng.uniform(256, 720)) / min(height, width)
    size = _even((round(width * factor), round(height * factor)))
    crop_w, crop_h = _even((int(size[0] * rng.uniform(0.6, 1)), int(size[1] * rng.uniform(0.6, 1))))
    top, left = int(rng.integers(0, size[1] - crop_h + 1)), int(rng.integers(0, size[0] - crop_w + 1))
    clip = np.stack(
        [
            cv2.resize(f, size, interpolation=cv2.INTER_LANCZOS4)[top : top + crop_h, left : left + crop_w]
            for f in frames
        ]
    )
    return through_x264(clip, 23) if index % 3 == 0 else clip


def tiny_model_clips(count: int) -> list[np.ndarray]:
    """``count`` clips from the tiny random-weight T2V and TI2V models (CPU), different seeds and prompts."""
    from wan_engine import GenerationRequest, WanGenerator, get_model_spec, save_random_pipeline

    clips = []
    with tempfile.TemporaryDirectory() as root:
        for family in ("t2v-a14b", "ti2v-5b"):
            spec = get_model_spec(family, "tiny")
            generator = WanGenerator.from_pretrained(
                save_random_pipeline(spec, Path(root)), spec, device="cpu"
            )
            for seed in range(count // 2):
                request = GenerationRequest(prompt=f"a product shot, take {seed}", seed=seed)
                clips.append(generator.generate(request).frames)
    return clips


# A window: its kind, its label, and the source it is cut from (a photo's file name, or frames).
Job = tuple[str, str, str | np.ndarray, int]


def _read(job: Job) -> dict:
    kind, label, source, index = job
    started = time.process_time()
    clip = photo_window(source, index) if isinstance(source, str) else rescaled_window(source, index)
    reading = read_periodic_mark(clip)
    return {
        "kind": kind,
        "window": f"{label}#{index}",
        "size": f"{clip.shape[2]}x{clip.shape[1]}x{clip.shape[0]}",
        "z": round(reading.z, 4),
        "crc_ok": reading.crc_ok,
        "found": reading.found,
        "payload_hex": reading.payload_hex,
        "cpu_s": round(time.process_time() - started, 3),
    }


def _jobs(windows_per_photo: int, tiny_clips: int) -> list[Job]:
    jobs: list[Job] = []
    for name in PHOTOS:
        jobs += [("photo", name, name, index) for index in range(windows_per_photo)]
    for name in PERIODIC:
        jobs += [("periodic texture", name, name, index) for index in range(windows_per_photo // 2)]
    video = gif_frames()
    jobs += [("video", "no_time_for_that_tiny.gif", video, index) for index in range(windows_per_photo)]
    for number, frames in enumerate(tiny_model_clips(tiny_clips)):
        jobs += [("tiny model", f"tiny-model-{number}", frames, i) for i in range(windows_per_photo // 2)]
    return jobs


def fit_null(z: np.ndarray) -> dict:
    """The Gumbel law fitted to ``z`` (maximum likelihood), its thresholds and how well it fits."""
    loc, scale = stats.gumbel_r.fit(z)
    fitted = stats.gumbel_r(loc, scale)
    quantiles = {q: (float(np.quantile(z, q)), float(fitted.ppf(q))) for q in (0.5, 0.9, 0.99, 0.999)}
    return {
        "law": "gumbel_r (maximum likelihood, scipy.stats)",
        "loc": round(float(loc), 4),
        "scale": round(float(scale), 4),
        "ks_pvalue": round(float(stats.kstest(z, fitted.cdf).pvalue), 4),
        "quantiles_measured_vs_fitted": {
            str(q): [round(a, 3), round(b, 3)] for q, (a, b) in quantiles.items()
        },
        "z_at_tail": {
            str(tail): round(float(fitted.isf(tail)), 3)
            for tail in (1e-2, NULL_TAIL_AT_THRESHOLD, 1e-6, 1e-9)
        },
    }


def run(out_dir: Path, windows_per_photo: int, tiny_clips: int, workers: int, refit: Path | None) -> dict:
    started = time.time()
    if refit:  # the same readings, summarised again (z and the CRC do not depend on the threshold)
        earlier = json.loads(refit.read_text())
        windows, workers, read_wall_s = earlier["per_window"], earlier["workers"], earlier["wall_s"]
    else:
        with ProcessPoolExecutor(workers) as pool:
            windows = list(pool.map(_read, _jobs(windows_per_photo, tiny_clips), chunksize=4))
        read_wall_s = round(time.time() - started, 1)
    threshold_z = z_threshold()
    for window in windows:
        window["found"] = window["z"] >= threshold_z and window["crc_ok"]
    kinds = [window["kind"] for window in windows]
    z = np.array([w["z"] for w in windows])
    null = fit_null(z)
    threshold = null["z_at_tail"][str(NULL_TAIL_AT_THRESHOLD)]
    if abs(threshold - threshold_z) > 0.01:
        print(f"module threshold {threshold_z:.3f} != this fit's {threshold:.3f}: update its constants")
    crc_passes = sum(w["crc_ok"] for w in windows)
    result = {
        "host": platform.node(),
        "cpu": cpu_name(),
        "statistic": "z: the template's correlation peak over its null standard deviation, the largest over "
        "all scales (0.4 to 1.6) and tile phases the reader tries",
        "windows": len(windows),
        "by_kind": {k: kinds.count(k) for k in sorted(set(kinds))},
        "sources": {
            "photos": list(PHOTOS),
            "periodic textures": list(PERIODIC),
            "video": "no_time_for_that_tiny.gif",
            "tiny-model clips": tiny_clips,
            "from": f"scikit-image {skimage.__version__} wheel (skimage/data) and wan_engine's tiny models",
        },
        "z_max": round(float(z.max()), 3),
        "z_max_by_kind": {k: round(max(w["z"] for w in windows if w["kind"] == k), 3) for k in set(kinds)},
        "null_fit": null,
        "threshold": {
            "z": threshold,
            "fitted_tail": NULL_TAIL_AT_THRESHOLD,
            "windows_at_or_above": int((z >= threshold).sum()),
            "z_for_1e-6_alone": null["z_at_tail"]["1e-06"],
            "windows_at_or_above_1e-6_z": int((z >= null["z_at_tail"]["1e-06"]).sum()),
        },
        "crc": {
            "passes": int(crc_passes),
            "expected_if_words_are_random": round(len(windows) * 2.0**-16, 4),
            "false_positive_rate": f"fitted tail x 2^-16 = {NULL_TAIL_AT_THRESHOLD * 2.0**-16:.2e}",
        },
        "found": int(sum(w["found"] for w in windows)),
        "wall_s": read_wall_s,
        "workers": workers,
        "per_window": windows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "watermark-null.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_window"}, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results"))
    parser.add_argument("--windows-per-photo", type=int, default=60)
    parser.add_argument("--tiny-clips", type=int, default=6)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--refit", type=Path, help="a watermark-null.json to summarise again from its per-window readings"
    )
    args = parser.parse_args()
    run(args.out, args.windows_per_photo, args.tiny_clips, args.workers, args.refit)


if __name__ == "__main__":
    main()
