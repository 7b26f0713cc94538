"""Stabilization, frame-rate conform and the raw-pipe helper on the real ffmpeg, on clips of known motion."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tasks.postprod.errors import PostprocessError
from tasks.postprod.ffmpeg_io import filter_frames, raw_input, raw_output
from tasks.postprod.motion import (
    ConformParams,
    StabilizeParams,
    conform,
    conform_frame_count,
    frame_translations,
    residual_motion,
    stabilize,
)

pytestmark = pytest.mark.services  # runs ffmpeg


def _texture(height: int, width: int, seed: int) -> np.ndarray:
    """Colour noise at three scales: detail everywhere for motion estimation, and no black pixels."""
    rng = np.random.default_rng(seed)
    out = np.zeros((height, width, 3), np.float32)
    for cell, amplitude in ((64, 90), (16, 60), (4, 40)):
        small = rng.uniform(0, 255, (max(2, height // cell), max(2, width // cell), 3)).astype(np.uint8)
        layer = np.asarray(
            Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC), np.float32
        )
        out += (layer - 128) * amplitude / 128
    return np.clip(out + 128, 24, 255).astype(np.uint8)


def _camera_positions(n: int, pan: int, jitter: int, seed: int) -> np.ndarray:
    """Per-frame (y, x) of a camera panning ``pan`` px/frame right, shaken by up to ``jitter`` px."""
    shake = np.random.default_rng(seed).integers(-jitter, jitter + 1, (n, 2))
    return np.stack([np.zeros(n, int), pan * np.arange(n)], axis=1) + shake


def _filmed(positions: np.ndarray, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Crops of one textured scene at the camera ``positions``."""
    low, high = positions.min(axis=0), positions.max(axis=0)
    scene = _texture(height + high[0] - low[0], width + high[1] - low[1], seed)
    return np.stack([scene[y : y + height, x : x + width] for y, x in positions - low])


def test_frame_translations_measure_the_camera_motion() -> None:
    positions = _camera_positions(17, pan=2, jitter=4, seed=1)
    frames = _filmed(positions, 128, 192)
    measured = frame_translations(frames)
    # The content moves against the camera.
    assert np.abs(measured + np.diff(positions, axis=0)).max() < 0.3


def test_stabilize_removes_jitter_and_keeps_the_pan() -> None:
    frames = _filmed(_camera_positions(33, pan=2, jitter=4, seed=1), 128, 192)
    before = residual_motion(frames)
    assert before > 4  # uniform shake of +-4 px: consecutive differences average ~5 px

    stabilized, report = stabilize(frames, 16, StabilizeParams())

    assert report.applied and report.stage == "stabilize" and report.cpu_seconds > 0
    assert stabilized.shape == frames.shape and stabilized.dtype == np.uint8
    after = residual_motion(stabilized)
    # Measured ~0.1 px from ~5.3 px; a tenth leaves ample margin and is far past "visibly calmer".
    assert after < 0.1 * before and after < 0.5
    assert report.outcome["residual_motion_before_px"] == pytest.approx(before, abs=1e-3)
    assert report.outcome["residual_motion_after_px"] == pytest.approx(after, abs=1e-3)
    # The deliberate pan survives (scaled by the zoom-in's few percent) away from the ends, where
    # vidstab's truncated smoothing window eases it in and out over ``smoothing`` frames.
    assert frame_translations(stabilized)[10:-10, 1].mean() == pytest.approx(-2, abs=0.35)
    # No black borders: the scene has no pixel darker than 24, so a dark edge pixel is a border.
    edges = np.concatenate(
        [stabilized[:, :2].reshape(-1, 3), stabilized[:, -2:].reshape(-1, 3)]
        + [stabilized[:, :, :2].reshape(-1, 3), stabilized[:, :, -2:].reshape(-1, 3)]
    )
    assert edges.max(axis=1).min() >= 16


def test_stabilize_skips_a_steady_clip() -> None:
    frames = _filmed(_camera_positions(17, pan=2, jitter=0, seed=1), 64, 96)
    out, report = stabilize(frames, 24, StabilizeParams())
    assert not report.applied
    assert out is frames
    assert report.outcome["residual_motion_before_px"] < 0.1
    assert "below min_motion" in report.outcome["reason"]


def test_stabilize_can_be_switched_off() -> None:
    frames = _filmed(_camera_positions(9, pan=1, jitter=4, seed=2), 64, 96)
    out, report = stabilize(frames, 24, StabilizeParams(enabled=False))
    assert out is frames and not report.applied and report.outcome == {"reason": "disabled"}


@pytest.mark.parametrize(
    ("frames", "source", "target", "expected"),
    [
        (81, 16, 24, 121),
        (121, 24, 30, 151),
        (17, 16, 24, 25),
        (17, 24, 30, 21),
        (10, 24, 30, 12),
        (1, 16, 24, 1),
    ],
)
def test_conform_frame_count_rule(frames: int, source: int, target: int, expected: int) -> None:
    assert conform_frame_count(frames, source, target) == expected


def _ball_clip(n: int, speed: int, radius: int = 16, height: int = 144, width: int = 256) -> np.ndarray:
    """A white disk moving ``speed`` px/frame right over a texture panning 2 px/frame."""
    frames = _filmed(_camera_positions(n, pan=2, jitter=0, seed=0), height, width, seed=3)
    yy, xx = np.mgrid[0:height, 0:width]
    for i, frame in enumerate(frames):
        frame[(yy - height // 2) ** 2 + (xx - (40 + speed * i)) ** 2 <= radius**2] = 255
    return frames


def _white_blob(frame: np.ndarray) -> tuple[float, int]:
    """Centre x and area of the pure-white pixels (the disk; the texture tops out below them)."""
    ys, xs = np.nonzero(frame.min(axis=2) > 235)
    return float(xs.mean()) if len(xs) else -1.0, len(xs)


def _interpolated_blobs(out: np.ndarray, source: int, target: int) -> list[tuple[float, float, int]]:
    """(expected x, measured x, area) of the disk in each conformed frame made between source frames."""
    blobs = []
    for k, frame in enumerate(out):
        source_time = k * source / target  # in source frames
        if source_time != int(source_time):
            blobs.append((40 + 20 * source_time, *_white_blob(frame)))
    return blobs


@pytest.mark.parametrize(("source", "target"), [(16, 24), (24, 30)])
def test_conform_interpolates_motion(source: int, target: int) -> None:
    frames = _ball_clip(9, speed=20)
    out, report = conform(frames, source, ConformParams(target_fps=target))

    expected_count = conform_frame_count(9, source, target)
    assert out.shape == (expected_count, 144, 256, 3)
    assert report.applied and report.cpu_seconds > 0
    assert {key: report.outcome[key] for key in ("frames_in", "fps_in", "frames_out", "fps_out")} == {
        "frames_in": 9,
        "fps_in": source,
        "frames_out": expected_count,
        "fps_out": target,
    }
    blobs = _interpolated_blobs(out, source, target)
    assert len(blobs) == 8  # all but the frames at whole source times (every 3rd at 16->24, 5th at 24->30)
    for expected_x, x, area in blobs:
        # One solid disk where the motion puts it between its neighbours (measured: within 1 px,
        # at least 0.68 of its area): not a repeat of either neighbour (dup), and not two
        # half-bright ghosts 20 px apart overlapping in a quarter of a disk (blend).
        assert x == pytest.approx(expected_x, abs=1.5)
        assert area > 0.5 * np.pi * 16**2


def test_conform_blend_is_not_motion_compensated() -> None:
    # The check mci passes above fails for a cross-fade: those tests see real motion interpolation.
    out, _ = conform(_ball_clip(9, speed=20), 16, ConformParams(target_fps=24, interpolation="blend"))
    for expected_x, x, area in _interpolated_blobs(out, 16, 24):
        assert area < 0.35 * np.pi * 16**2
        assert abs(x - expected_x) > 2


def test_conform_same_rate_only_deflickers() -> None:
    frames = _ball_clip(9, speed=3)
    out, report = conform(frames, 24, ConformParams(target_fps=24))
    assert report.applied and out.shape == frames.shape
    assert report.outcome["frames_out"] == report.outcome["frames_in"] == 9
    # A steady clip comes through deflicker practically unchanged.
    assert np.abs(out.astype(int) - frames).mean() < 2

    same, report = conform(frames, 24, ConformParams(target_fps=24, deflicker=False))
    assert same is frames and not report.applied


def test_deflicker_steadies_brightness() -> None:
    frames = _filmed(_camera_positions(33, pan=0, jitter=0, seed=0), 64, 96)
    gain = 1 + np.random.default_rng(0).uniform(-0.15, 0.15, len(frames))
    flickering = np.clip(frames * gain[:, None, None, None], 0, 255).astype(np.uint8)

    out, _ = conform(flickering, 16, ConformParams(target_fps=16))

    before = flickering.mean(axis=(1, 2, 3)).var()
    after = out.mean(axis=(1, 2, 3)).var()
    assert after < 0.5 * before  # measured 0.29


def test_ffmpeg_failure_carries_its_log() -> None:
    frames = _ball_clip(5, speed=3)
    with pytest.raises(PostprocessError, match="deflicker"):
        conform(frames, 16, ConformParams(target_fps=16, deflicker_mode="bogus"))


def test_filter_frames_streams_frames_of_the_graphs_output_size() -> None:
    frames = _ball_clip(5, speed=3, radius=4, height=64, width=96)
    same = filter_frames(raw_output(raw_input(96, 64, 16)), frames)
    assert (same == frames).all() and same.flags.writeable
    scaled = filter_frames(
        raw_output(raw_input(96, 64, 16).filter("scale", 150, 100)), frames, size=(150, 100)
    )
    assert scaled.shape == (5, 100, 150, 3)
    with pytest.raises(PostprocessError, match="uint8"):
        filter_frames(raw_output(raw_input(96, 64, 16)), frames.astype(np.float32))
