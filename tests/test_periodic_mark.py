"""The periodic watermark through what platforms do to a clip, each step run by the real ffmpeg.

Two marked clips: a pan across a real photo at the A14B delivery size (832x480, 24 fps, 6.5 s, so
a 5-second excerpt comes from its middle), and a clip of the tiny T2V model delivered as the
standard profile delivers it (upscaled to 384x256, 16 fps). Each transform runs alone and the
platform chain (half size, crf 30, 30 fps) runs on both; the payload must come back bit-exact,
found, with a false-positive probability under 1e-6.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from skimage import data

from tasks.encode import encode_mp4
from tasks.postprod.chain import deliver_size
from tasks.postprod.invisible import embed_watermark, format_payload, payload_for
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
from tasks.postprod.profile import DeliveryParams
from tasks.postprod.verify import verify_clip
from tests.media import probe_video
from tests.test_invisible_watermark import textured_clip
from wan_engine import GenerationRequest, WanGenerator, get_model_spec, save_random_pipeline

pytestmark = pytest.mark.services  # runs ffmpeg

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


def transform(source: Path, out: Path, args: list[str]) -> Path:
    """``source`` re-encoded by x264 after ``args`` (crf 18 unless the args name one), as a platform does."""
    crf = [] if "-crf" in args else ["-crf", str(PUBLISHED_CRF)]
    command = ["ffmpeg", "-y", "-loglevel", "error", "-i", str(source), *args, "-c:v", "libx264", *crf]
    subprocess.run([*command, "-pix_fmt", "yuv420p", "-an", str(out)], check=True)
    return out


def middle_excerpt(source: Path, out: Path, seconds: float = 5.0) -> Path:
    info = probe_video(source)
    start = (info.frames / info.fps - seconds) / 2
    return transform(source, out, ["-ss", f"{start:.3f}", "-t", str(seconds)])


def photo_pan(width: int = 832, height: int = 480, frames: int = 156) -> np.ndarray:
    """A slow diagonal pan across scikit-image's coffee photo (a real one), scaled up to leave room."""
    scene = np.asarray(Image.fromarray(data.coffee()).resize((1200, 800), Image.Resampling.BICUBIC))
    return np.stack([scene[100 + t // 2 :][:height, 2 * t : 2 * t + width] for t in range(frames)])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


@pytest.fixture(scope="module")
def photo_clip(tmp_path_factory) -> tuple[np.ndarray, np.ndarray, Path]:
    """The real image sequence: its frames, the marked frames, and the delivered file (24 fps)."""
    frames = photo_pan()
    marked, report = embed_periodic_mark(frames, PAYLOAD)
    assert report.applied and report.outcome["payload_hex"] == format_payload(PAYLOAD)
    path = encode_mp4(marked, 24, tmp_path_factory.mktemp("photo") / "delivered.mp4", crf=PUBLISHED_CRF)
    return frames, marked, path


@pytest.fixture(scope="module")
def tiny_model_clip(tmp_path_factory) -> tuple[np.ndarray, np.ndarray, Path]:
    """A clip of the tiny T2V model, delivered at 384x256 as the standard profile does, marked (16 fps)."""
    spec = get_model_spec("t2v-a14b", "tiny")
    folder = save_random_pipeline(spec, tmp_path_factory.mktemp("tiny-model"))
    generator = WanGenerator.from_pretrained(folder, spec, device="cpu")
    generated = generator.generate(GenerationRequest(prompt="a red sneaker", seed=5, num_frames=33))
    # The tiny model makes at most 33 frames (2 s): played forward, back and forward again (a
    # boomerang, 97 frames, 6 s) so that a 5-second excerpt comes from the middle.
    boomerang = np.concatenate([generated.frames, generated.frames[-2::-1], generated.frames[1:]])
    frames, _ = deliver_size(boomerang, DeliveryParams(min_short_side=256))
    marked, report = embed_periodic_mark(frames, PAYLOAD)
    assert report.applied and frames.shape[1:3] == (256, 384)
    path = encode_mp4(marked, spec.fps, tmp_path_factory.mktemp("tiny") / "delivered.mp4", crf=PUBLISHED_CRF)
    return frames, marked, path


def assert_read_back(path: Path) -> None:
    reading = read_periodic_mark_file(path)
    assert reading.payload == PAYLOAD, (reading.to_dict(), format_payload(PAYLOAD))
    assert reading.crc_ok and reading.found and reading.false_positive_probability < 1e-6, reading.to_dict()


@pytest.mark.parametrize("name", [*TRANSFORMS, "24-to-30-fps", "5-s-middle-excerpt"])
def test_the_photo_pan_reads_back_after(photo_clip, tmp_path, name):
    _, _, delivered = photo_clip
    if name == "5-s-middle-excerpt":
        out = middle_excerpt(delivered, tmp_path / "out.mp4")
        assert 4.9 <= probe_video(out).frames / 24 <= 5.1
    else:
        out = transform(delivered, tmp_path / "out.mp4", TRANSFORMS.get(name, ["-vf", "fps=30"]))
    assert_read_back(out)


@pytest.mark.parametrize("name", [*TRANSFORMS, "16-to-25-fps", "5-s-middle-excerpt"])
def test_the_tiny_model_clip_reads_back_after(tiny_model_clip, tmp_path, name):
    _, _, delivered = tiny_model_clip
    if name == "5-s-middle-excerpt":
        out = middle_excerpt(delivered, tmp_path / "out.mp4")
    else:
        out = transform(delivered, tmp_path / "out.mp4", TRANSFORMS.get(name, ["-vf", "fps=25"]))
    assert_read_back(out)


def test_marked_frames_keep_38_db_and_unmarked_ones_are_not_found(photo_clip, tiny_model_clip, tmp_path):
    for frames, marked, _ in (photo_clip, tiny_model_clip):
        worst = min(psnr(a, b) for a, b in zip(frames, marked, strict=True))
        assert worst >= 38, worst
        reading = read_periodic_mark(frames)
        assert not reading.found and reading.z < z_threshold(), reading.to_dict()


def test_verify_reports_the_mark_found_with_its_confidence_after_the_chain(photo_clip, tmp_path):
    _, _, delivered = photo_clip
    published = transform(delivered, tmp_path / "published.mp4", TRANSFORMS["chain-1/2-crf30-30fps"])
    report = verify_clip(published)
    assert report.watermark.found and report.watermark.payload == PAYLOAD
    text = report.describe()
    assert "watermark: found (periodic-luma-v1), payload " + format_payload(PAYLOAD) in text
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
    texture = photo_pan(frames=2)
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
