"""Contact sheets: every sample of every variant on one image, so an A/B experiment is seen at a glance.

One row per variant: on the left its id and the start of its prompt, on the right its samples'
thumbnails in a grid, each with a caption. Every cell has the same size, 16:9 at a fixed height, and
a thumbnail is scaled to fit inside it whole, so portrait and landscape clips sit side by side
without cropping. A sample without an image (its clip failed or was quarantined) is drawn as a
placeholder that says so. Pure PIL: images in, an image or its encoded bytes out.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image, ImageDraw, ImageFont, ImageOps

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")

Box = tuple[int, int, int, int]  # left, top, right, bottom (right and bottom exclusive), as PIL takes them
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

BACKGROUND = (255, 255, 255)
BAND_SHADE = (244, 245, 247)  # every other variant row, so rows read apart
CELL_BACKGROUND = (34, 34, 34)  # around a thumbnail that does not fill its cell
PLACEHOLDER = (226, 226, 226)
_HATCH = (206, 206, 206)
_INK = (20, 20, 20)
_MUTED = (90, 90, 90)
_RULE = (210, 210, 210)
STATUS_COLOURS = {"failed": (185, 28, 28), "quarantined": (194, 110, 0)}

_MARGIN = 16
_GAP = 10
_PAD = 8  # inside a row band, above and below its cells
_LABEL_WIDTH = 300
_TITLE_HEIGHT = 64
_CAPTION_HEIGHT = 22
_PROMPT_EXCERPT = 280  # characters of the prompt worth reading on a contact sheet


@dataclass(frozen=True)
class ContactSample:
    """One sample of a variant: its caption, and its thumbnail or why there is none."""

    label: str  # e.g. "#1 seed 42"
    image: Image.Image | None = None
    status: str = "failed"  # written on the placeholder when there is no image, e.g. "quarantined"


@dataclass(frozen=True)
class ContactRow:
    """One variant: its id, its prompt, and its samples in order."""

    variant_id: str
    prompt: str
    samples: Sequence[ContactSample]


@dataclass(frozen=True)
class RowLayout:
    band: Box  # the whole row
    label: Box  # variant id and prompt excerpt
    cells: list[Box]  # one per sample: the thumbnail or placeholder
    captions: list[Box]  # one per sample, under its cell


@dataclass(frozen=True)
class ContactLayout:
    """Where everything goes: computed before drawing, and the answer to 'where is sample k of variant v'."""

    size: tuple[int, int]
    title: Box
    rows: list[RowLayout]


def contact_sheet_layout(
    rows: Sequence[ContactRow], *, cell_height: int = 144, max_columns: int = 6
) -> ContactLayout:
    """Where things go on a sheet of ``rows``: 16:9 cells ``cell_height`` high, ``max_columns`` per line."""
    if cell_height < 32 or max_columns < 1:
        raise ValueError(
            f"cell_height must be at least 32 and max_columns at least 1 ({cell_height}, {max_columns})"
        )
    cell_width = round(cell_height * 16 / 9)
    columns = max(1, min(max_columns, max((len(row.samples) for row in rows), default=1)))
    grid_left = _MARGIN + _LABEL_WIDTH + _GAP
    width = grid_left + columns * cell_width + (columns - 1) * _GAP + _MARGIN
    line_height = cell_height + _CAPTION_HEIGHT
    layouts = []
    top = _TITLE_HEIGHT
    for row in rows:
        lines = max(1, math.ceil(len(row.samples) / columns))
        band_height = 2 * _PAD + lines * line_height + (lines - 1) * _GAP
        cells, captions = [], []
        for index in range(len(row.samples)):
            line, column = divmod(index, columns)
            left = grid_left + column * (cell_width + _GAP)
            cell_top = top + _PAD + line * (line_height + _GAP)
            cells.append((left, cell_top, left + cell_width, cell_top + cell_height))
            captions.append((left, cell_top + cell_height, left + cell_width, cell_top + line_height))
        layouts.append(
            RowLayout(
                band=(0, top, width, top + band_height),
                label=(_MARGIN, top + _PAD, _MARGIN + _LABEL_WIDTH, top + band_height - _PAD),
                cells=cells,
                captions=captions,
            )
        )
        top += band_height
    return ContactLayout(
        size=(width, top + _MARGIN), title=(_MARGIN, 0, width - _MARGIN, _TITLE_HEIGHT), rows=layouts
    )


def build_contact_sheet(
    rows: Sequence[ContactRow],
    title: str,
    *,
    cell_height: int = 144,
    max_columns: int = 6,
    nouns: tuple[str, str] = ("variant", "sample"),
) -> Image.Image:
    """An RGB contact sheet: a title with counts, then one labelled row of thumbnails per variant (or
    whatever else ``nouns`` calls a row and a sample in the counts, e.g. a nightly run's models and clips)."""
    layout = contact_sheet_layout(rows, cell_height=cell_height, max_columns=max_columns)
    sheet = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    _draw_title(draw, layout.title, title, rows, nouns)
    for index, (row, placed) in enumerate(zip(rows, layout.rows, strict=True)):
        if index % 2:
            draw.rectangle(_inclusive(placed.band), fill=BAND_SHADE)
        draw.line([(0, placed.band[1]), (layout.size[0], placed.band[1])], fill=_RULE)
        _draw_label(draw, placed.label, row)
        if not row.samples:
            grid_left = placed.label[2] + _GAP
            draw.text((grid_left, placed.label[1]), "no samples", font=_font(14), fill=_MUTED)
        for sample, cell, caption in zip(row.samples, placed.cells, placed.captions, strict=True):
            if sample.image is None:
                _draw_placeholder(draw, cell, sample.status)
            else:
                _paste_thumbnail(sheet, cell, sample.image)
            _draw_fitted(
                draw, (caption[0] + 2, caption[1] + 4), sample.label, _font(13), caption[2] - caption[0] - 4
            )
    return sheet


def contact_sheet_bytes(
    image: Image.Image, format: Literal["JPEG", "PNG"] = "JPEG", quality: int = 90
) -> bytes:
    """The contact sheet encoded as JPEG (small, for links and reports) or PNG (exact pixels)."""
    buffer = io.BytesIO()
    if format == "JPEG":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality, optimize=True)
    else:
        image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


@functools.cache
def _font(size: int, bold: bool = False) -> Font:
    path = FONT_DIR / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")
    try:
        return ImageFont.truetype(str(path), size)
    except OSError:
        # Without the DejaVu fonts (Debian's fonts-dejavu-core) Pillow's own font still draws legible text.
        return ImageFont.load_default(size)


def _inclusive(box: Box) -> Box:
    # PIL's rectangle includes its right and bottom edges; boxes here exclude them.
    return box[0], box[1], box[2] - 1, box[3] - 1


def _draw_title(
    draw: ImageDraw.ImageDraw, box: Box, title: str, rows: Sequence[ContactRow], nouns: tuple[str, str]
) -> None:
    samples = [sample for row in rows for sample in row.samples]
    missing = sum(1 for sample in samples if sample.image is None)
    counts = f"{len(rows)} {nouns[0]}(s), {len(samples)} {nouns[1]}(s)"
    if missing:
        counts += f", {missing} without a clip"
    width = box[2] - box[0]
    _draw_fitted(draw, (box[0], box[1] + 10), title, _font(22, bold=True), width)
    _draw_fitted(draw, (box[0], box[1] + 40), counts, _font(13), width, fill=_MUTED)


def _draw_label(draw: ImageDraw.ImageDraw, box: Box, row: ContactRow) -> None:
    width = box[2] - box[0]
    _draw_fitted(draw, (box[0], box[1] + 2), row.variant_id, _font(17, bold=True), width)
    font = _font(13)
    line_height = 18
    top = box[1] + 30
    max_lines = max(0, (box[3] - top) // line_height)
    excerpt = " ".join(row.prompt.split())
    if len(excerpt) > _PROMPT_EXCERPT:
        excerpt = excerpt[:_PROMPT_EXCERPT].rsplit(" ", 1)[0] + "…"
    lines = _wrap(excerpt, font, width)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        if lines:
            lines[-1] = _fit(lines[-1].rstrip("…") + " …", font, width)
    for number, line in enumerate(lines):
        draw.text((box[0], top + number * line_height), line, font=font, fill=_MUTED)


def _paste_thumbnail(sheet: Image.Image, cell: Box, image: Image.Image) -> None:
    width, height = cell[2] - cell[0], cell[3] - cell[1]
    sheet.paste(CELL_BACKGROUND, cell)
    thumbnail = ImageOps.contain(image.convert("RGB"), (width, height), Image.Resampling.LANCZOS)
    sheet.paste(
        thumbnail, (cell[0] + (width - thumbnail.width) // 2, cell[1] + (height - thumbnail.height) // 2)
    )


def _draw_placeholder(draw: ImageDraw.ImageDraw, cell: Box, status: str) -> None:
    left, top, right, bottom = cell
    draw.rectangle(_inclusive(cell), fill=PLACEHOLDER)
    # Diagonal hatching: a missing clip must not read as a grey frame of a real one.
    for offset in range(-(bottom - top), right - left, 14):
        start = (left + max(0, offset), top + max(0, -offset))
        length = min(right - left - max(0, offset), bottom - top - max(0, -offset)) - 1
        if length > 0:
            draw.line([start, (start[0] + length, start[1] + length)], fill=_HATCH)
    colour = STATUS_COLOURS.get(status.casefold(), _MUTED)
    draw.rectangle(_inclusive(cell), outline=colour, width=2)
    text = status.upper()
    font = _font(16, bold=True)
    text = _fit(text, font, right - left - 12)
    text_left, text_top, text_right, text_bottom = draw.textbbox((0, 0), text, font=font)
    position = (
        left + (right - left - (text_right - text_left)) / 2 - text_left,
        top + (bottom - top - (text_bottom - text_top)) / 2 - text_top,
    )
    draw.text(position, text, font=font, fill=colour)


def _draw_fitted(
    draw: ImageDraw.ImageDraw,
    xy: tuple[int, int],
    text: str,
    font: Font,
    width: int,
    fill: tuple[int, int, int] = _INK,
) -> None:
    draw.text(xy, _fit(" ".join(text.split()), font, width), font=font, fill=fill)


def _fit(text: str, font: Font, width: int) -> str:
    """``text``, cut with an ellipsis where it would run past ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text.rstrip() + "…"


def _wrap(text: str, font: Font, width: int) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = _fit(word, font, width)  # a word longer than the line is cut, not spilled
    if current:
        lines.append(current)
    return lines
