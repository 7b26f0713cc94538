"""Visible watermark: a logo and/or a text label ("AI-generated") composited onto every frame.

The watermark is laid out once as an RGBA stamp with PIL (the logo resampled with its own
alpha, the label drawn in DejaVu Sans Bold) and alpha-blended into the same region of all
frames at once in numpy, which for raw frames is cheaper than a trip through ffmpeg's
overlay/drawtext. Sizes and margins are fractions of the frame's shorter side, so a
portrait and a landscape clip carry the same-looking mark.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tasks.postprod.errors import PostprocessError
from tasks.postprod.params import stage_params
from tasks.postprod.report import StageReport, cpu_timer

Position = Literal["top-left", "top-right", "bottom-left", "bottom-right", "center"]

DEFAULT_FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"


@stage_params
class VisibleWatermarkParams:
    """Settings of :func:`apply_visible_watermark`.

    logo: an image of any mode (its alpha, or a palette's transparency, is honoured), or None.
    text: a label drawn under the logo (or alone), or None.
    position: the corner the mark sits in, or "center".
    margin: gap between the mark and the frame's edges, as a fraction of the shorter side
        (ignored for "center").
    scale: the logo's width as a fraction of the frame's shorter side; its height follows
        its aspect ratio.
    opacity: 0 (invisible) .. 1 (opaque), multiplied into the logo's and label's alpha.
    text_size: the label's font size in pixels as a fraction of the shorter side, at least
        ``min_text_px``; the label is white with a dark outline of a fifteenth of that, so it
        reads on light and dark footage.
    """

    logo: Image.Image | None = None
    text: str | None = "AI-generated"
    position: Position = "bottom-right"
    margin: float = 0.03
    scale: float = 0.15
    opacity: float = 0.8
    text_size: float = 0.035
    min_text_px: int = 8
    text_color: tuple[int, int, int] = (255, 255, 255)
    outline_color: tuple[int, int, int] = (0, 0, 0)
    font_path: str = DEFAULT_FONT

    def describe(self) -> dict[str, Any]:
        """The settings as plain values for the manifest (the logo as its mode and size)."""
        logo = None if self.logo is None else f"{self.logo.mode} {self.logo.width}x{self.logo.height}"
        return {
            "logo": logo,
            "text": self.text,
            "position": self.position,
            "margin": self.margin,
            "scale": self.scale,
            "opacity": self.opacity,
            "text_size": self.text_size,
        }


def _logo_layer(logo: Image.Image, width: int) -> Image.Image:
    height = max(1, round(width * logo.height / logo.width))
    # Pillow resamples RGBA with premultiplied alpha, so transparent pixels do not bleed their colour.
    return logo.convert("RGBA").resize((width, height), Image.Resampling.LANCZOS)


def _text_layer(params: VisibleWatermarkParams, size: int) -> Image.Image:
    font = ImageFont.truetype(params.font_path, size)
    stroke = max(1, round(size / 15))
    left, top, right, bottom = font.getbbox(params.text, stroke_width=stroke)
    layer = Image.new("RGBA", (right - left, bottom - top), (0, 0, 0, 0))
    ImageDraw.Draw(layer).text(
        (-left, -top),
        params.text,
        font=font,
        fill=(*params.text_color, 255),
        stroke_width=stroke,
        stroke_fill=(*params.outline_color, 255),
    )
    return layer


def watermark_stamp(params: VisibleWatermarkParams, width: int, height: int) -> Image.Image | None:
    """The RGBA mark for a ``width`` x ``height`` frame: logo over label, aligned to the mark's side.

    Returns None when there is neither logo nor text. The stamp's alpha does not yet
    include ``params.opacity``.
    """
    short = min(width, height)
    layers = []
    if params.logo is not None:
        layers.append(_logo_layer(params.logo, max(1, round(params.scale * short))))
    if params.text:
        layers.append(_text_layer(params, max(params.min_text_px, round(params.text_size * short))))
    if not layers:
        return None
    gap = round(0.01 * short) if len(layers) == 2 else 0
    stamp = Image.new(
        "RGBA",
        (max(layer.width for layer in layers), sum(layer.height for layer in layers) + gap),
        (0, 0, 0, 0),
    )
    y = 0
    for layer in layers:
        if params.position.endswith("left"):
            x = 0
        elif params.position.endswith("right"):
            x = stamp.width - layer.width
        else:
            x = (stamp.width - layer.width) // 2
        stamp.alpha_composite(layer, (x, y))
        y += layer.height + gap
    return stamp


class WatermarkStamps:
    """One profile's mark at each frame size, rendered once (logo scaled, label font loaded and drawn)
    and reused by every clip of that size; a finishing worker keeps one per profile."""

    def __init__(self, params: VisibleWatermarkParams) -> None:
        self.params = params
        self._by_size: dict[tuple[int, int], Image.Image | None] = {}

    def __call__(self, width: int, height: int) -> Image.Image | None:
        if (width, height) not in self._by_size:
            self._by_size[width, height] = watermark_stamp(self.params, width, height)
        return self._by_size[width, height]


def _origin(params: VisibleWatermarkParams, frame_w: int, frame_h: int, w: int, h: int) -> tuple[int, int]:
    """Top-left corner of a ``w`` x ``h`` mark placed by ``params.position`` and ``params.margin``."""
    if params.position == "center":
        return (frame_w - w) // 2, (frame_h - h) // 2
    margin = round(params.margin * min(frame_w, frame_h))
    x = margin if params.position.endswith("left") else frame_w - margin - w
    y = margin if params.position.startswith("top") else frame_h - margin - h
    return x, y


def apply_visible_watermark(
    frames: np.ndarray, params: VisibleWatermarkParams, stamps: WatermarkStamps | None = None
) -> tuple[np.ndarray, StageReport]:
    """Composite the visible watermark onto every frame; returns a new array and the stage report.

    ``stamps`` renders the mark (default: rendered anew from ``params`` for this call).

    ``outcome["box"]`` is the mark's ``[x, y, width, height]`` in the frame (clipped to it).
    With neither logo nor text, or zero opacity, the input is returned with ``applied=False``.
    """
    report = StageReport("visible_watermark", applied=False, params=params.describe())
    if not 0.0 <= params.opacity <= 1.0:
        raise PostprocessError(f"opacity must be within 0..1, got {params.opacity}")
    _, height, width, _ = frames.shape
    with cpu_timer(report):
        stamp = (stamps or WatermarkStamps(params))(width, height)
        if stamp is None or params.opacity == 0:
            report.outcome["reason"] = "no logo or text" if stamp is None else "opacity 0"
            return frames, report
        x, y = _origin(params, width, height, stamp.width, stamp.height)
        # Clip to the frame: a mark larger than the frame keeps its placement, not its whole self.
        left, top = max(x, 0), max(y, 0)
        right, bottom = min(x + stamp.width, width), min(y + stamp.height, height)
        pixels = np.asarray(stamp, np.uint16)[top - y : bottom - y, left - x : right - x]
        alpha = np.rint(pixels[..., 3:] * params.opacity).astype(np.uint16)
        ink = pixels[..., :3] * alpha
        out = frames.copy()
        region = out[:, top:bottom, left:right].astype(np.uint16)
        # Integer "over" blend with rounding: (ink*a + frame*(255-a)) / 255.
        out[:, top:bottom, left:right] = (ink + region * (255 - alpha) + 127) // 255
        report.outcome.update(
            box=[left, top, right - left, bottom - top],
            stamp_size=[stamp.width, stamp.height],
            frame_size=[width, height],
        )
        report.applied = True
    return out, report
