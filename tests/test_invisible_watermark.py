"""The invisible watermark with the real invisible-watermark library and the real libx264."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import pywt
from imwatermark import WatermarkDecoder

from tasks.encode import encode_mp4
from tasks.postprod.invisible import (
    InvisibleWatermarkParams,
    embed_watermark,
    extract_watermark,
    format_payload,
    payload_for,
    read_watermark_file,
    watermark_size_problem,
)
from tests.media import decode_frames

pytestmark = pytest.mark.services  # runs ffmpeg

PAYLOAD = payload_for("sku-123-a1b2c3", "nightly-2026-11-21")


def textured_clip(frames: int = 24, height: int = 288, width: int = 352, seed: int = 0) -> np.ndarray:
    """A natural-looking clip: soft colour regions, mid-scale detail and fine grain, the camera panning."""
    rng = np.random.default_rng(seed)
    full_h, full_w = height + 2 * frames, width + 3 * frames

    def noise(cells_h: int, cells_w: int, channels: int) -> np.ndarray:
        small = rng.random((cells_h, cells_w, channels)).astype(np.float32)
        return cv2.resize(small, (full_w, full_h), interpolation=cv2.INTER_CUBIC).reshape(full_h, full_w, -1)

    grain = cv2.GaussianBlur(rng.random((full_h, full_w)).astype(np.float32), (0, 0), 0.8)[..., None]
    scene = 0.65 * noise(full_h // 48, full_w // 48, 3) + 0.2 * noise(full_h // 8, full_w // 8, 3)
    scene = np.clip((scene + 0.25 * (grain - 0.5)) * 255, 0, 255).astype(np.uint8)
    return np.stack([scene[2 * t : 2 * t + height, 3 * t : 3 * t + width] for t in range(frames)])


def with_logo(frames: np.ndarray, area: float = 0.15) -> np.ndarray:
    """A visible-watermark stand-in: a high-contrast logo at 80% opacity over ``area`` of the frame."""
    _, height, width, _ = frames.shape
    logo_h, logo_w = int(height * area**0.5), int(width * area**0.5)
    pattern = (np.random.default_rng(1).random((logo_h // 8 + 1, logo_w // 8 + 1)) > 0.5) * 255.0
    logo = np.kron(pattern, np.ones((8, 8)))[:logo_h, :logo_w, None]
    out = frames.copy()
    corner = out[:, height - logo_h :, width - logo_w :].astype(np.float32)
    out[:, height - logo_h :, width - logo_w :] = np.rint(0.2 * corner + 0.8 * logo).astype(np.uint8)
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return textured_clip()


@pytest.fixture(scope="module")
def marked(clip) -> np.ndarray:
    frames, report = embed_watermark(clip, PAYLOAD)
    assert report.applied and report.outcome["payload_hex"] == format_payload(PAYLOAD)
    assert report.outcome["frames_marked"] == len(clip) and report.cpu_seconds > 0
    return frames


def test_marked_frames_keep_at_least_38_db_psnr(clip, marked):
    assert marked.shape == clip.shape and marked.dtype == np.uint8
    whole = psnr(clip, marked)
    worst = min(psnr(a, b) for a, b in zip(clip, marked, strict=True))
    assert whole >= 38 and worst >= 38, (whole, worst)


@pytest.mark.parametrize("crf", [23, 28])
def test_payload_survives_x264(marked, tmp_path, crf):
    video = encode_mp4(marked, fps=16, path=tmp_path / "clip.mp4", crf=crf)
    reading = extract_watermark(decode_frames(video))
    assert reading.payload == PAYLOAD, (reading.payload_hex, format_payload(PAYLOAD))
    assert reading.found and reading.frames_read == len(marked)
    assert reading.confidence > 0.75, reading.to_dict()


def test_payload_survives_a_logo_over_15_percent_then_crf_28(marked, tmp_path):
    video = encode_mp4(with_logo(marked), fps=16, path=tmp_path / "clip.mp4", crf=28)
    reading = read_watermark_file(video)  # decodes with ffmpeg itself, frame by frame
    assert reading.payload == PAYLOAD and reading.found, reading.to_dict()


def test_a_different_payload_reads_back_different(clip, tmp_path):
    other = payload_for("sku-123-a1b2c3", "nightly-2026-11-22")
    frames, _ = embed_watermark(clip, other)
    reading = read_watermark_file(encode_mp4(frames, fps=16, path=tmp_path / "clip.mp4", crf=23))
    assert reading.payload == other != PAYLOAD


def test_an_unmarked_clip_reads_as_no_watermark(clip, tmp_path):
    reading = read_watermark_file(encode_mp4(clip, fps=16, path=tmp_path / "clip.mp4", crf=23))
    assert not reading.found and reading.mean_strength < 0.2, reading.to_dict()


def test_the_librarys_own_decoder_reads_our_marks(marked):
    """The band-order fix and the vectorised embedder write what invisible-watermark itself reads."""
    params = InvisibleWatermarkParams()
    decoder = WatermarkDecoder("bytes", 48)
    bgr = cv2.cvtColor(marked[0], cv2.COLOR_RGB2BGR)
    read = decoder.decode(bgr, "dwtDctSvd", scales=list(params.scales), block=params.block)
    assert read == PAYLOAD.to_bytes(6, "big")


def test_marking_leaves_the_detail_bands_alone(clip, marked):
    """The library's bug swapped the marked plane's horizontal and vertical detail; the fix keeps them."""

    def u_bands(frame: np.ndarray) -> tuple[np.ndarray, ...]:
        u_plane = cv2.cvtColor(frame, cv2.COLOR_RGB2YUV)[..., 1].astype(np.float64)
        _, details = pywt.dwt2(u_plane, "haar")
        return details

    for before, after in zip(u_bands(clip[5]), u_bands(marked[5]), strict=True):
        # Only uint8 rounding separates them: about 0.26 here, where the library's swap gives 1.86.
        assert np.abs(before - after).mean() < 0.5


def test_frames_too_small_are_refused_clearly_and_nothing_crashes(tmp_path):
    message = watermark_size_problem(240, 240)
    assert message and "240x240" in message and "256x256" in message
    narrow = watermark_size_problem(8192, 8)
    assert narrow and "too narrow" in narrow
    assert watermark_size_problem(256, 256) is None
    assert watermark_size_problem(1280, 704) is watermark_size_problem(480, 832) is None

    small = textured_clip(frames=4, height=240, width=240)
    frames, report = embed_watermark(small, PAYLOAD)
    assert frames is small and not report.applied and report.outcome["skipped"] == message
    reading = extract_watermark(small)
    assert reading.payload is None and not reading.found and reading.problem == message


def test_disabled_passes_frames_through(clip):
    frames, report = embed_watermark(clip, PAYLOAD, InvisibleWatermarkParams(enabled=False))
    assert frames is clip and not report.applied and report.outcome == {"skipped": "disabled"}


def test_a_file_that_is_not_a_video_gives_a_problem_not_an_error(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 100)
    reading = read_watermark_file(junk)
    assert reading.payload is None and not reading.found and reading.problem
