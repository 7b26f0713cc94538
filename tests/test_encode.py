"""Encoding with the real ffmpeg: what a player and a browser need from the MP4."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tasks.encode import EncodeError, encode_mp4, encode_thumbnail
from tests.media import probe_video, top_level_boxes

pytestmark = pytest.mark.services  # runs ffmpeg


def moving_square(frames: int = 17, width: int = 96, height: int = 64) -> np.ndarray:
    video = np.full((frames, height, width, 3), 40, dtype=np.uint8)
    for t in range(frames):
        video[t, 20:40, 4 * t : 4 * t + 20] = (220, 60, 60)
    return video


def test_mp4_is_h264_yuv420p_faststart_with_every_frame(tmp_path):
    frames = moving_square()
    path = encode_mp4(frames, fps=16, path=tmp_path / "clip.mp4")
    info = probe_video(path)
    assert (info.codec, info.pix_fmt, info.width, info.height) == ("h264", "yuv420p", 96, 64)
    assert info.frames == 17 and info.fps == 16
    boxes = top_level_boxes(path)
    assert boxes.index("moov") < boxes.index("mdat"), boxes  # faststart: the index comes first


def test_thumbnail_is_the_middle_frame(tmp_path):
    frames = moving_square()
    path = encode_thumbnail(frames, tmp_path / "thumb.jpg")
    with Image.open(path) as image:
        assert image.format == "JPEG" and image.size == (96, 64)
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    error = np.abs(pixels - frames[len(frames) // 2]).mean()
    assert error < 6, error


def test_odd_sizes_are_refused_clearly(tmp_path):
    with pytest.raises(EncodeError, match="even sizes"):
        encode_mp4(np.zeros((5, 63, 96, 3), np.uint8), 16, tmp_path / "odd.mp4")
