"""The periodic watermark through what platforms do to a clip, each step run by the real ffmpeg.

Two marked clips: a pan across a real photo at the A14B delivery size (832x480, 24 fps, 6.5 s, so
a 5-second excerpt comes from its middle), and a clip of the tiny T2V model delivered as the
standard profile delivers it (upscaled to 384x256, 16 fps). Each transform of issue 17 runs alone
and the platform chain (half size, crf 30, 30 fps) runs on both, as bench/watermark_robustness.py
defines them; the payload must come back bit-exact, found, with a false-positive probability
under 1e-6.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from bench.watermark_robustness import (
    PAYLOAD,
    PUBLISHED_CRF,
    all_transforms,
    coffee_pan,
    middle_excerpt,
    tiny_model_boomerang,
    transform,
)
from tasks.encode import encode_mp4
from tasks.postprod.invisible import embed_watermark, format_payload
from tasks.postprod.periodic_mark import (
    PeriodicMarkParams,
    _encode,
    _viterbi,
    embed_periodic_mark,
    periodic_size_problem,
    read_periodic_mark,
    read_periodic_mark_file,
    z_threshold,
)
from tasks.postprod.verify import verify_clip
from tests.media import probe_video
from tests.test_invisible_watermark import textured_clip

pytestmark = pytest.mark.services  # runs ffmpeg

PAYLOAD_HEX = format_payload(PAYLOAD)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def deliver(frames: np.ndarray, fps: int, folder: Path) -> tuple[np.ndarray, np.ndarray, Path]:
    """``frames``, marked, and the file the chain would deliver (x264 crf 18)."""
    marked, report = embed_periodic_mark(frames, PAYLOAD)
    assert report.applied and report.outcome["payload_hex"] == PAYLOAD_HEX
    return frames, marked, encode_mp4(marked, fps, folder / "delivered.mp4", crf=PUBLISHED_CRF)


@pytest.fixture(scope="module")
def photo_clip(tmp_path_factory) -> tuple[np.ndarray, np.ndarray, Path]:
    """The real image sequence (832x480, 24 fps, 6.5 s): frames, marked frames, delivered file."""
    return deliver(coffee_pan(), 24, tmp_path_factory.mktemp("photo"))


@pytest.fixture(scope="module")
def tiny_model_clip(tmp_path_factory) -> tuple[np.ndarray, np.ndarray, Path]:
    """The tiny T2V model's clip, delivered at 384x256 (16 fps, 6 s): frames, marked frames, file."""
    frames, fps = tiny_model_boomerang(tmp_path_factory.mktemp("tiny-model"))
    assert frames.shape[1:3] == (256, 384) and fps == 16
    return deliver(frames, fps, tmp_path_factory.mktemp("tiny"))


def assert_read_back(path: Path) -> None:
    reading = read_periodic_mark_file(path)
    assert reading.payload == PAYLOAD, (reading.to_dict(), PAYLOAD_HEX)
    assert reading.crc_ok and reading.found and reading.false_positive_probability < 1e-6, reading.to_dict()


def transformed(clip: tuple[np.ndarray, np.ndarray, Path], fps: int, name: str, out: Path) -> Path:
    frames, _, source = clip
    if name == "5-s-middle-excerpt":
        excerpt = middle_excerpt(source, out, len(frames) / fps)
        assert abs(probe_video(excerpt).frames / fps - 5) <= 0.1
        return excerpt
    return transform(source, out, all_transforms(fps)[name])


@pytest.mark.parametrize("name", [*all_transforms(24), "5-s-middle-excerpt"])
def test_the_photo_pan_reads_back_after(photo_clip, tmp_path, name):
    assert_read_back(transformed(photo_clip, 24, name, tmp_path / "out.mp4"))


@pytest.mark.parametrize("name", [*all_transforms(16), "5-s-middle-excerpt"])
def test_the_tiny_model_clip_reads_back_after(tiny_model_clip, tmp_path, name):
    assert_read_back(transformed(tiny_model_clip, 16, name, tmp_path / "out.mp4"))


def test_marked_frames_keep_38_db_and_unmarked_ones_are_not_found(photo_clip, tiny_model_clip):
    for frames, marked, _ in (photo_clip, tiny_model_clip):
        worst = min(psnr(a, b) for a, b in zip(frames, marked, strict=True))
        assert worst >= 38, worst
        reading = read_periodic_mark(frames)
        assert not reading.found and reading.z < z_threshold(), reading.to_dict()


def test_verify_reports_the_mark_found_with_its_confidence_after_the_chain(photo_clip, tmp_path):
    published = transformed(photo_clip, 24, "chain-1/2-crf30-30fps", tmp_path / "published.mp4")
    report = verify_clip(published)
    assert report.watermark.found and report.watermark.payload == PAYLOAD
    text = report.describe()
    assert "watermark: found (periodic-luma-v1), payload " + PAYLOAD_HEX in text
    assert "false-positive probability" in text and "C2PA manifest: none" in text
    assert not report.ok  # the re-encode dropped the manifest: the watermark alone does not verify


def test_clips_with_the_old_dwtdctsvd_mark_still_verify(tmp_path):
    frames, _ = embed_watermark(textured_clip(frames=16), PAYLOAD)
    report = verify_clip(encode_mp4(frames, 16, tmp_path / "old.mp4", crf=23))
    assert report.watermark.found and report.watermark.payload == PAYLOAD, report.to_dict()
    assert "(dwtDctSvd)" in report.describe()


def test_a_flat_gradient_shows_no_pattern():
    """On a flat region the mark must stay below what an 8-bit display can show as a pattern.

    Criterion: every pixel changes by at most one grey level (the size of the gradient's own
    8-bit steps, which carry no visible pattern) and the change is 0.5 grey levels RMS or less.
    The textured frame's mark is checked to be larger, so the test measures the mask, not a
    mark too weak to see anywhere; a mask with no flat floor (flat_gain 1) fails the criterion.
    """
    ramp = np.linspace(40, 215, 832, dtype=np.float32)[None, :, None] + np.zeros((480, 1, 3), np.float32)
    gradient = np.repeat(np.rint(ramp).astype(np.uint8)[None], 2, axis=0)
    marked, _ = embed_periodic_mark(gradient, PAYLOAD)
    change = marked.astype(np.int16) - gradient
    assert np.abs(change).max() <= 1 and np.sqrt(np.mean(change.astype(np.float64) ** 2)) <= 0.5

    unmasked, _ = embed_periodic_mark(gradient, PAYLOAD, PeriodicMarkParams(flat_gain=1.0))
    assert np.abs(unmasked.astype(np.int16) - gradient).max() > 1
    texture = coffee_pan(frames=2)
    textured = embed_periodic_mark(texture, PAYLOAD)[0].astype(np.int16) - texture
    assert np.sqrt(np.mean(textured.astype(np.float64) ** 2)) > 4 * np.sqrt(np.mean(change**2.0))


def test_the_code_corrects_errors_and_the_crc_catches_what_it_cannot():
    word = (PAYLOAD << 16) | 0xBEEF
    soft = 2 * _encode(word) - 1
    rng = np.random.default_rng(0)
    flipped = soft.copy()
    flipped[rng.choice(len(soft), 12, replace=False)] *= -1  # 12 of 210 coded bits wrong
    assert _viterbi(flipped) == word
    noisy = soft + rng.normal(0, 0.8, len(soft))
    assert _viterbi(noisy) == word


def test_bad_input_is_one_clear_line(tmp_path):
    with pytest.raises(ValidationError, match="flat_gain"):
        PeriodicMarkParams(flat_gain=2.0)
    with pytest.raises(ValueError, match="does not fit in 48 bits"):
        embed_periodic_mark(textured_clip(frames=2), 1 << 48)
    problem = periodic_size_problem(320, 160)
    assert problem and "320x160" in problem and "192x192" in problem
    small = textured_clip(frames=2, height=160, width=320)
    frames, report = embed_periodic_mark(small, PAYLOAD)
    assert frames is small and not report.applied and report.outcome == {"skipped": problem}
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 100)
    reading = read_periodic_mark_file(junk)
    assert reading.payload is None and not reading.found and reading.problem
    assert read_periodic_mark([]).problem == "no frames to read"


def test_disabled_passes_frames_through():
    clip = textured_clip(frames=2)
    frames, report = embed_periodic_mark(clip, PAYLOAD, PeriodicMarkParams(enabled=False))
    assert frames is clip and not report.applied and report.outcome == {"skipped": "disabled"}
