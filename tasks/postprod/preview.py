"""A small animated preview of a clip (WebP, or GIF) for the Prefect UI and run reports."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.postprod.errors import PostprocessError
from tasks.postprod.params import stage_params
from tasks.postprod.report import StageReport, cpu_timer


@stage_params
class PreviewParams:
    """Settings of :func:`write_preview`.

    long_side: the preview's longer side in pixels (the aspect ratio is kept; never upscaled).
    fps: preview frame rate (at most the clip's).
    max_seconds: longest preview; a longer clip is sampled evenly over its whole length
        (played faster) rather than cut, so the preview still shows how it ends.
    quality: WebP quality 0..100 (lossy); GIF ignores it.
    """

    long_side: int = 320
    fps: int = 8
    max_seconds: float = 6.0
    quality: int = 60


def preview_indices(frame_count: int, fps: int, params: PreviewParams) -> np.ndarray:
    """Which of a clip's frames the preview shows: evenly spaced, first and last included."""
    preview_fps = min(params.fps, fps)
    duration = frame_count / fps
    count = max(1, min(round(duration * preview_fps), math.floor(params.max_seconds * preview_fps)))
    count = min(count, frame_count)
    return np.unique(np.rint(np.linspace(0, frame_count - 1, count)).astype(int))


def write_preview(frames: np.ndarray, fps: int, path: Path, params: PreviewParams) -> StageReport:
    """Write an animated preview of ``frames`` (played at ``fps``) to ``path``.

    The format follows the suffix: ``.webp`` (lossy, small) or ``.gif`` (256 colours).
    """
    path = Path(path)
    kind = {".webp": "WEBP", ".gif": "GIF"}.get(path.suffix.lower())
    if kind is None:
        raise PostprocessError(f"preview must be .webp or .gif, got {path.name}")
    report = StageReport("preview", applied=True, params=asdict(params))
    with cpu_timer(report):
        n, height, width, _ = frames.shape
        shrink = min(1.0, params.long_side / max(height, width))
        size = (max(1, round(width * shrink)), max(1, round(height * shrink)))
        indices = preview_indices(n, fps, params)
        images = [
            Image.fromarray(frames[i]).resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)
            for i in indices
        ]
        frame_ms = round(1000 / min(params.fps, fps))
        options = {"quality": params.quality, "method": 4} if kind == "WEBP" else {"optimize": True}
        path.parent.mkdir(parents=True, exist_ok=True)
        images[0].save(
            path, format=kind, save_all=True, append_images=images[1:], duration=frame_ms, loop=0, **options
        )
        report.outcome.update(
            path=str(path),
            format=kind.lower(),
            frames=len(images),
            frame_ms=frame_ms,
            size=list(size),
            bytes=path.stat().st_size,
        )
    return report
