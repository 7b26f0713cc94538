"""The visible watermark's placement, size, opacity and label, and the animated preview, checked in pixels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tasks.postprod import overlay
from tasks.postprod.errors import PostprocessError
from tasks.postprod.overlay import VisibleWatermarkParams, apply_visible_watermark
from tasks.postprod.preview import PreviewParams, write_preview

RED = (255, 0, 0)


def _black(height: int, width: int, n: int = 3) -> np.ndarray:
    return np.zeros((n, height, width, 3), np.uint8)


def _red_box(frame: np.ndarray) -> tuple[int, int, int, int]:
    """(x, y, width, height) of the pure-red pixels."""
    ys, xs = np.nonzero((frame == RED).all(axis=2))
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


LOGO = Image.new("RGBA", (40, 20), (*RED, 255))


@pytest.mark.parametrize(("height", "width"), [(120, 200), (200, 120)], ids=["landscape", "portrait"])
@pytest.mark.parametrize("position", ["top-left", "top-right", "bottom-left", "bottom-right", "center"])
def test_logo_lands_where_asked_at_the_asked_size(height: int, width: int, position: str) -> None:
    params = VisibleWatermarkParams(
        logo=LOGO, text=None, position=position, margin=0.05, scale=0.2, opacity=1
    )
    frames = _black(height, width)

    out, report = apply_visible_watermark(frames, params)

    # Both orientations: the shorter side is 120, so the logo is 24x12 and the margin 6 px.
    logo_w, logo_h, margin = 24, 12, 6
    expected_x = {"left": margin, "right": width - margin - logo_w}.get(position.split("-")[-1])
    expected_y = {"top": margin, "bottom": height - margin - logo_h}.get(position.split("-")[0])
    if position == "center":
        expected_x, expected_y = (width - logo_w) // 2, (height - logo_h) // 2
    for frame in out:
        assert _red_box(frame) == (expected_x, expected_y, logo_w, logo_h)
        # Nothing else was touched.
        assert (frame == RED).all(axis=2).sum() == logo_w * logo_h
        assert np.count_nonzero(frame.any(axis=2)) == logo_w * logo_h
    assert report.applied and report.outcome["box"] == [expected_x, expected_y, logo_w, logo_h]
    assert frames.max() == 0  # the input is left alone


def test_logo_alpha_is_honoured() -> None:
    logo = Image.new("RGBA", (40, 20), (*RED, 255))
    logo.paste((0, 255, 0, 0), (20, 0, 40, 20))  # right half fully transparent green
    params = VisibleWatermarkParams(
        logo=logo, text=None, position="top-left", margin=0.0, scale=0.5, opacity=1
    )
    out, _ = apply_visible_watermark(_black(100, 160), params)
    # 50x25 logo at the origin: red left half, transparent right half leaves the frame black.
    assert (out[:, 2:23, :22] == RED).all()
    assert out[:, :, 28:].max() == 0


def test_half_opacity_blends_half_and_half() -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    logo = Image.new("RGB", (10, 10), (255, 255, 255))  # no alpha channel: opaque
    params = VisibleWatermarkParams(
        logo=logo, text=None, position="top-left", margin=0.0, scale=0.5, opacity=0.5
    )

    out, _ = apply_visible_watermark(frames, params)

    inside = out[:, :32, :32].astype(float)
    assert np.abs(inside - (frames[:, :32, :32] + 255.0) / 2).max() <= 1.0
    assert (out[:, 32:] == frames[:, 32:]).all() and (out[:, :, 32:] == frames[:, :, 32:]).all()


def test_text_label_renders_in_its_corner() -> None:
    grey = np.full((2, 120, 200, 3), 128, np.uint8)
    params = VisibleWatermarkParams(text="AI-generated", position="bottom-left", margin=0.05, opacity=1)

    out, report = apply_visible_watermark(grey, params)

    x, y, w, h = report.outcome["box"]
    changed = np.nonzero((out[0] != 128).any(axis=2))
    assert changed[1].min() >= x == 6 and changed[0].max() < y + h == 120 - 6
    label = out[0, y : y + h, x : x + w]
    # White letters with a dark outline: both inks present, in a label about one font size high.
    assert (label.min(axis=2) > 240).sum() > 50 and (label.max(axis=2) < 15).sum() > 50
    assert 4 <= h <= 12 and w > 3 * h  # 0.035 x 120 = 4 px is raised to the 8 px minimum font
    assert (out[1] == out[0]).all()


def test_same_mark_on_portrait_and_landscape() -> None:
    params = VisibleWatermarkParams(logo=LOGO, text="AI-generated")
    _, landscape = apply_visible_watermark(_black(480, 832, 1), params)
    _, portrait = apply_visible_watermark(_black(832, 480, 1), params)
    assert landscape.outcome["stamp_size"] == portrait.outcome["stamp_size"]
    # Logo 0.15 x 480 = 72 px wide, font 0.035 x 480 = 17 px: the label is the wider of the two.
    assert landscape.outcome["stamp_size"][0] >= 72


def test_nothing_to_draw_is_a_skip() -> None:
    frames = _black(32, 48)
    out, report = apply_visible_watermark(frames, VisibleWatermarkParams(text=None))
    assert out is frames and not report.applied
    with pytest.raises(PostprocessError):
        apply_visible_watermark(frames, VisibleWatermarkParams(opacity=1.5))


def _moving_clip(n: int, height: int, width: int) -> np.ndarray:
    """A bar sweeping across a gradient, so consecutive frames differ."""
    frames = np.empty((n, height, width, 3), np.uint8)
    frames[:] = np.linspace(40, 200, width, dtype=np.uint8)[None, None, :, None]
    for i in range(n):
        x = i * (width - 8) // max(1, n - 1)
        frames[i, :, x : x + 8] = (255, 60, 0)
    return frames


@pytest.mark.parametrize("suffix", [".webp", ".gif"])
def test_preview_is_small_and_animated(tmp_path, suffix: str) -> None:
    frames = _moving_clip(81, 480, 832)  # 5 s at 16 fps
    path = tmp_path / f"preview{suffix}"

    report = write_preview(frames, 16, path, PreviewParams())

    with Image.open(path) as image:
        assert image.is_animated and image.n_frames == report.outcome["frames"] == 40  # 5 s at 8 fps
        assert image.size == (320, 185)
        image.seek(image.n_frames - 1)
        last = np.asarray(image.convert("RGB"))
    # The last preview frame is the clip's last frame: the bar at the right edge.
    assert last[:, -3:, 0].mean() > 200 and last[:, :20, 0].mean() < 100
    assert path.stat().st_size == report.outcome["bytes"] < 100_000
    assert report.cpu_seconds > 0


def test_long_clip_preview_is_bounded(tmp_path) -> None:
    frames = _moving_clip(240, 64, 48)  # 10 s at 24 fps, portrait
    report = write_preview(frames, 24, tmp_path / "p.webp", PreviewParams(long_side=320, max_seconds=4))
    with Image.open(tmp_path / "p.webp") as image:
        assert image.n_frames == report.outcome["frames"] == 32  # 4 s at 8 fps, sampled over all 10 s
        assert image.size == (48, 64)  # never upscaled


def test_a_profiles_mark_is_rendered_once_per_frame_size(monkeypatch) -> None:
    rendered = []
    render = overlay.watermark_stamp
    monkeypatch.setattr(
        overlay, "watermark_stamp", lambda p, w, h: rendered.append((w, h)) or render(p, w, h)
    )
    logo = Image.new("RGBA", (40, 20), (*RED, 255))
    params = VisibleWatermarkParams(logo=logo, text="AI-generated")
    stamps = overlay.WatermarkStamps(params)
    frames = np.full((2, 64, 96, 3), 90, np.uint8)
    once, _ = apply_visible_watermark(frames, params, stamps)
    for _ in range(2):
        again, _ = apply_visible_watermark(frames, params, stamps)
        assert np.array_equal(again, once)
    apply_visible_watermark(_black(96, 64, 1), params, stamps)
    assert rendered == [(96, 64), (64, 96)]
    fresh, _ = apply_visible_watermark(frames, params)  # rendered anew: the same pixels
    assert np.array_equal(fresh, once)
