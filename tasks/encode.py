"""Encoding frames into deliverables with ffmpeg (through ffmpeg-python).

The H.264 MP4 is yuv420p (plays everywhere) with the index at the front
(``+faststart``, so a browser starts playing before the download ends). The
thumbnail is the middle frame as a JPEG.
"""

from __future__ import annotations

from pathlib import Path

import ffmpeg
import numpy as np


class EncodeError(RuntimeError):
    """ffmpeg refused the frames; the message carries the end of its log."""


def _raw_input(width: int, height: int, fps: int | None = None) -> ffmpeg.nodes.FilterableStream:
    options = {"framerate": fps} if fps else {}
    return ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", **options)


def _run(stream: ffmpeg.nodes.OutputStream, frames: np.ndarray) -> None:
    try:
        stream.overwrite_output().run(
            input=np.ascontiguousarray(frames).tobytes(), capture_stdout=True, capture_stderr=True
        )
    except ffmpeg.Error as err:
        tail = err.stderr.decode(errors="replace")[-800:] if err.stderr else ""
        raise EncodeError(f"ffmpeg failed: {tail}") from err


def encode_mp4(frames: np.ndarray, fps: int, path: Path, crf: int = 18, threads: int = 1) -> Path:
    """Encode uint8 ``(frames, height, width, 3)`` to an H.264 MP4 at ``path``."""
    _, height, width, _ = frames.shape
    if width % 2 or height % 2:
        raise EncodeError(f"yuv420p needs even sizes, got {width}x{height}")
    output = _raw_input(width, height, fps).output(
        str(path),
        vcodec="libx264",
        pix_fmt="yuv420p",
        crf=crf,
        preset="medium",
        movflags="+faststart",
        threads=threads,
        an=None,
    )
    _run(output, frames)
    return path


def encode_thumbnail(frames: np.ndarray, path: Path, quality: int = 3) -> Path:
    """The middle frame as a JPEG at ``path`` (quality 2 best .. 31 worst)."""
    middle = frames[len(frames) // 2 : len(frames) // 2 + 1]
    _, height, width, _ = middle.shape
    output = _raw_input(width, height).output(
        str(path), vframes=1, format="image2", vcodec="mjpeg", q=quality
    )
    _run(output, middle)
    return path
