"""Motion stages: camera-shake stabilization, and frame-rate conform with deflicker.

Both run ffmpeg filters over raw rgb24 pipes (:mod:`tasks.postprod.ffmpeg_io`) and keep
the clip's size. Stabilization is libvidstab's two passes; before running it the stage
measures the clip's jitter with :func:`residual_motion` (global translation by phase
correlation, in numpy) and skips clips too steady to gain anything.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from tasks.postprod import ffmpeg_io
from tasks.postprod.errors import PostprocessError
from tasks.postprod.params import stage_params
from tasks.postprod.report import StageReport, cpu_timer

# Phase correlation runs on grey frames box-reduced by an integer factor to about this long side:
# 121 frames of 1280x704 cost a quarter of a second.
_ANALYSIS_LONG_SIDE = 320
# Std of the Gaussian weight on the cross-power spectrum, in cycles per analysis pixel. The box
# reduction aliases fine detail, which shifts inconsistently between frames; weighting towards
# low frequencies drops it and makes the correlation peak a Gaussian, which a parabola through
# its logarithm locates to about 0.01 px (measured: 0.3 px without the weight, 1 px with a plain parabola).
_SPECTRAL_SIGMA = 0.06


def _analysis_frames(frames: np.ndarray) -> tuple[np.ndarray, int]:
    """Grey, box-reduced float32 frames for motion analysis, and the reduction factor."""
    _, height, width, _ = frames.shape
    factor = max(1, max(height, width) // _ANALYSIS_LONG_SIDE)
    grey = [np.asarray(Image.fromarray(frame).convert("L").reduce(factor), np.float32) for frame in frames]
    return np.stack(grey), factor


def _peak_offset(below: float, peak: float, above: float) -> float:
    """Sub-sample offset of a Gaussian peak from its samples either side (a parabola through the logs)."""
    below, peak, above = (np.log(max(value, 1e-12)) for value in (below, peak, above))
    curvature = below - 2 * peak + above
    return 0.0 if curvature >= 0 else 0.5 * (below - above) / curvature


def frame_translations(frames: np.ndarray) -> np.ndarray:
    """Global translation ``(dy, dx)`` in pixels of each frame relative to the one before it.

    Phase correlation on grey frames reduced to ~320 px on the long side, low-pass
    weighted and located to a fraction of a pixel, scaled back to the frames' own pixels.
    Returns shape ``(frames - 1, 2)``; positive values mean the content moved down/right.
    """
    grey, factor = _analysis_frames(frames)
    n, height, width = grey.shape
    if n < 2:
        return np.zeros((0, 2))
    # Zero mean and a Hann window, so the frame edges (which wrap in the FFT) do not make a peak at 0.
    grey -= grey.mean(axis=(1, 2), keepdims=True)
    grey *= np.outer(np.hanning(height), np.hanning(width)).astype(np.float32)
    spectra = np.fft.rfft2(grey)
    cross = np.conj(spectra[:-1]) * spectra[1:]
    cross /= np.abs(cross) + 1e-9
    radius2 = np.fft.fftfreq(height)[:, None] ** 2 + np.fft.rfftfreq(width)[None, :] ** 2
    cross *= np.exp(-radius2 / (2 * _SPECTRAL_SIGMA**2))
    surfaces = np.fft.irfft2(cross, s=(height, width))
    shifts = np.zeros((n - 1, 2))
    for i, surface in enumerate(surfaces):
        y, x = np.unravel_index(int(surface.argmax()), surface.shape)
        peak = surface[y, x]
        dy = y + _peak_offset(surface[y - 1, x], peak, surface[(y + 1) % height, x])
        dx = x + _peak_offset(surface[y, x - 1], peak, surface[y, (x + 1) % width])
        # Peaks past the middle are negative shifts (the correlation surface wraps around).
        shifts[i] = (dy - height if dy > height / 2 else dy, dx - width if dx > width / 2 else dx)
    return shifts * factor


def residual_motion(frames: np.ndarray, window: int = 9) -> float:
    """Mean camera jitter of a clip, in pixels per frame.

    The global translation between consecutive frames (:func:`frame_translations`)
    minus its moving average over ``window`` frame pairs is the shake; the deliberate
    motion (a pan, a push-in's drift) is what the moving average keeps. Returns the mean
    length of the shake vectors, 0.0 for clips of fewer than three frames.
    """
    shifts = frame_translations(frames)
    if len(shifts) < 2:
        return 0.0
    half = min(window // 2, len(shifts) - 1)
    padded = np.pad(shifts, ((half, half), (0, 0)), mode="edge")
    kernel = np.full(2 * half + 1, 1.0 / (2 * half + 1))
    trend = np.stack([np.convolve(padded[:, axis], kernel, mode="valid") for axis in range(2)], axis=1)
    return float(np.linalg.norm(shifts - trend, axis=1).mean())


@stage_params
class StabilizeParams:
    """Settings of :func:`stabilize` (libvidstab's vidstabdetect + vidstabtransform).

    enabled: False skips the stage.
    min_motion: skip clips whose :func:`residual_motion` is below this many pixels per
        frame: sub-pixel shake is hard to see at 480p and 720p, while stabilizing always
        costs a zoom-in and a resampling.
    shakiness: vidstabdetect 1..10, how shaky and quick the camera is (search range).
    accuracy: vidstabdetect 1..15 (at least ``shakiness``), how many measurement fields;
        on the synthetic shaky scenes 9 gave the same correction as vidstab's default 15
        for three quarters of the detect time (1.6 vs 2.2 CPU s at 1280x704x121).
    smoothing: vidstabtransform, frames each side of the low-pass over the camera path
        (10: 21 frames, about 0.9 s at 24 fps and 1.3 s at 16 fps). vidstab truncates the
        window at the clip's ends, so a pan eases in and out over that many frames there.
    zoom: extra zoom in percent on top of vidstab's optimal static zoom (``optzoom=1``),
        computed from the whole clip's corrections so the frame stays covered (no black
        borders; vidstab says only very strong motion can still uncover an edge, which
        ``crop=keep`` then fills from the previous frame instead of black).
    max_shift, max_angle: limits of the correction in pixels and radians, -1 for none.
    interpolation: vidstabtransform resampling, "bilinear" or "bicubic".
    window: frame pairs in :func:`residual_motion`'s moving average.
    threads: ffmpeg filter threads and libvidstab OpenMP threads; 1 spends the least CPU
        per clip, and clips in parallel use the other cores.
    """

    enabled: bool = True
    min_motion: float = 0.75
    shakiness: int = 5
    accuracy: int = 9
    smoothing: int = 10
    zoom: float = 0.0
    max_shift: int = -1
    max_angle: float = -1.0
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    window: int = 9
    threads: int = 1


def stabilize(frames: np.ndarray, fps: int, params: StabilizeParams) -> tuple[np.ndarray, StageReport]:
    """Remove camera shake from ``frames``, keeping their size and count.

    Skips (``applied=False``, the input returned as is) when switched off or when the
    measured jitter is below ``params.min_motion``; otherwise reports the jitter before
    and after in ``outcome``.
    """
    report = StageReport("stabilize", applied=False, params=asdict(params))
    if not params.enabled:
        report.outcome["reason"] = "disabled"
        return frames, report
    with cpu_timer(report):
        before = residual_motion(frames, params.window)
        report.outcome["residual_motion_before_px"] = round(before, 3)
        if before < params.min_motion:
            report.outcome["reason"] = (
                f"residual motion {before:.2f} px below min_motion {params.min_motion} px"
            )
            return frames, report
        stabilized = _vidstab(frames, fps, params)
        report.outcome["residual_motion_after_px"] = round(residual_motion(stabilized, params.window), 3)
        report.applied = True
    return stabilized, report


def _vidstab(frames: np.ndarray, fps: int, params: StabilizeParams) -> np.ndarray:
    _, height, width, _ = frames.shape
    with tempfile.TemporaryDirectory(prefix="vidstab-") as tmp:
        transforms = str(Path(tmp) / "transforms.trf")
        # libvidstab 1.1 aborts on packed RGB: it detects on the grey plane and transforms planar YUV.
        detect = (
            ffmpeg_io.raw_input(width, height, fps)
            .filter("format", "gray")
            .filter(
                "vidstabdetect",
                result=transforms,
                shakiness=params.shakiness,
                accuracy=max(params.accuracy, params.shakiness),
            )
        )
        ffmpeg_io.consume_frames(ffmpeg_io.null_output(detect), frames, params.threads)
        transform = (
            ffmpeg_io.raw_input(width, height, fps)
            .filter("format", "yuv444p")
            .filter(
                "vidstabtransform",
                input=transforms,
                smoothing=params.smoothing,
                zoom=params.zoom,
                optzoom=1,
                crop="keep",
                maxshift=params.max_shift,
                maxangle=params.max_angle,
                interpol=params.interpolation,
            )
        )
        stabilized = ffmpeg_io.filter_frames(ffmpeg_io.raw_output(transform), frames, params.threads)
    if stabilized.shape != frames.shape:
        raise PostprocessError(f"vidstab returned {stabilized.shape} for {frames.shape}")
    return stabilized


def conform_frame_count(frames: int, source_fps: int, target_fps: int) -> int:
    """How many frames a clip of ``frames`` at ``source_fps`` has after conforming to ``target_fps``.

    The first and last frames keep their times (0 and ``(frames - 1) / source_fps``) and
    output frame k shows time ``k / target_fps``, so the count is
    ``round((frames - 1) * target_fps / source_fps) + 1`` (halves round up). The clip's
    length then changes by less than one source frame (its last frame's display time):
    81 frames at 16 fps become 121 at 24, 121 at 24 become 151 at 30.
    """
    if frames < 1:
        return 0
    span = Fraction(frames - 1) * target_fps / source_fps
    return int(span + Fraction(1, 2)) + 1


@stage_params
class ConformParams:
    """Settings of :func:`conform`.

    target_fps: the delivery frame rate (24 or 30 for most platforms).
    interpolation: how new frames are made: "mci" motion-compensated interpolation
        (ffmpeg minterpolate; moving objects land between their neighbouring positions),
        "blend" a cross-fade of the neighbouring frames (about a tenth of the CPU, ghosts
        on fast motion), or "dup" repeating the nearest frame (judder).
    me: minterpolate's motion estimation search ("epzs", its default, was cheaper than
        "hexbs" and "ds" here and as good).
    mb_size: macroblock size in pixels (4..16; 16 is the cheapest).
    search_param: motion search range in pixels.
    vsbmc: variable-size block motion compensation (finer edges, slower).
    scene_threshold: frame difference (0..100) above which minterpolate takes a frame pair
        for a cut and does not interpolate across it (minterpolate's default).
    deflicker: smooth frame-to-frame luminance changes (ffmpeg deflicker) before the
        rate change, over ``deflicker_size`` frames (2..129) with ``deflicker_mode``
        ("am" arithmetic mean, "median", ...).

    minterpolate and deflicker have no slice threading in ffmpeg 5.1, so this stage has no
    threads setting: clips conformed in parallel use the cores.
    """

    target_fps: int = 24
    interpolation: Literal["mci", "blend", "dup"] = "mci"
    me: str = "epzs"
    mb_size: int = 16
    search_param: int = 32
    vsbmc: bool = False
    scene_threshold: float = 10.0
    deflicker: bool = True
    deflicker_size: int = 5
    deflicker_mode: str = "am"


# minterpolate emits an output frame only once it holds the input frames after it, so the
# last output frames need a few input frames past the end: repeats of the last frame, trimmed after.
_END_PADDING = 3


def conform(frames: np.ndarray, source_fps: int, params: ConformParams) -> tuple[np.ndarray, StageReport]:
    """Deflicker ``frames`` and change their rate from ``source_fps`` to ``params.target_fps``.

    Returns exactly :func:`conform_frame_count` frames of the same size. At the same rate
    nothing is interpolated (deflicker only); with deflicker off too the input is returned
    with ``applied=False``.
    """
    report = StageReport("conform", applied=False, params=asdict(params))
    n, height, width, _ = frames.shape
    target = conform_frame_count(n, source_fps, params.target_fps)
    resample = params.target_fps != source_fps
    report.outcome.update(frames_in=n, fps_in=source_fps, frames_out=target, fps_out=params.target_fps)
    if not resample and not params.deflicker:
        report.outcome["reason"] = "same frame rate and deflicker off"
        return frames, report
    with cpu_timer(report):
        # One conversion to planar YUV serves both filters: deflicker corrects plane 0 only
        # (luma, not green), and minterpolate takes no RGB.
        stream = ffmpeg_io.raw_input(width, height, source_fps).filter("format", "yuv444p")
        if params.deflicker:
            stream = stream.filter("deflicker", size=params.deflicker_size, mode=params.deflicker_mode)
        if resample:
            stream = stream.filter(
                "minterpolate",
                fps=params.target_fps,
                mi_mode=params.interpolation,
                me=params.me,
                mb_size=params.mb_size,
                search_param=params.search_param,
                vsbmc=int(params.vsbmc),
                scd_threshold=params.scene_threshold,
            )
        padding = _END_PADDING if resample else 0
        padded = np.concatenate([frames, np.repeat(frames[-1:], padding, axis=0)]) if padding else frames
        out = ffmpeg_io.filter_frames(ffmpeg_io.raw_output(stream), padded, expect=target + padding)
        produced = len(out)
        if produced < target:
            out = np.concatenate([out, np.repeat(out[-1:], target - produced, axis=0)])
        report.outcome["frames_from_ffmpeg"] = produced
        report.applied = True
    return out[:target], report
