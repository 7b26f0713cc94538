"""Reading videos back the way a user's player would: ffprobe, ffmpeg decode, MP4 box order."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import ffmpeg
import numpy as np


@dataclass(frozen=True)
class VideoInfo:
    codec: str
    pix_fmt: str
    width: int
    height: int
    frames: int  # counted by decoding, not read from the header
    fps: float


def probe_video(path: Path) -> VideoInfo:
    stream = ffmpeg.probe(str(path), count_frames=None, select_streams="v:0")["streams"][0]
    return VideoInfo(
        codec=stream["codec_name"],
        pix_fmt=stream["pix_fmt"],
        width=int(stream["width"]),
        height=int(stream["height"]),
        frames=int(stream["nb_read_frames"]),
        fps=float(Fraction(stream["r_frame_rate"])),
    )


def decode_frames(path: Path) -> np.ndarray:
    info = probe_video(path)
    raw, _ = ffmpeg.input(str(path)).output("pipe:", format="rawvideo", pix_fmt="rgb24").run(quiet=True)
    return np.frombuffer(raw, np.uint8).reshape(-1, info.height, info.width, 3)


def top_level_boxes(path: Path) -> list[str]:
    """The MP4's top-level box types in file order."""
    data, boxes, offset = Path(path).read_bytes(), [], 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if size == 1:
            size = struct.unpack(">Q", data[offset + 8 : offset + 16])[0]
        boxes.append(kind.decode("latin-1"))
        if size < 8:
            break
        offset += size
    return boxes
