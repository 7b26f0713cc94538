"""Contact sheets: one labelled row per variant, thumbnails where the layout says, placeholders for gaps."""

from __future__ import annotations

import io

from PIL import Image

from tasks.contact_sheet import (
    BACKGROUND,
    BAND_SHADE,
    CELL_BACKGROUND,
    PLACEHOLDER,
    STATUS_COLOURS,
    ContactRow,
    ContactSample,
    build_contact_sheet,
    contact_sheet_bytes,
    contact_sheet_layout,
)

RED, GREEN, BLUE = (220, 30, 30), (30, 170, 60), (40, 60, 210)


def _rows() -> list[ContactRow]:
    return [
        ContactRow(
            "A-studio",
            "Speckled stoneware mug in sea blue. Studio product video: the product turns slowly on a "
            "turntable against a seamless white backdrop, soft key light, gentle reflections.",
            [
                ContactSample("#1 seed 11", Image.new("RGB", (1280, 720), RED)),  # landscape 16:9
                ContactSample("#2 seed 12", Image.new("RGB", (720, 1280), GREEN)),  # portrait 9:16
                ContactSample("#3 seed 13", None, "failed"),
            ],
        ),
        ContactRow(
            "B-morning",
            "Morning light on a kitchen counter.",
            [
                ContactSample("#1 seed 11", None, "quarantined"),
                ContactSample("#2 seed 12", Image.new("RGBA", (64, 64), (*BLUE, 255))),
            ],
        ),
    ]


def _centre(box: tuple[int, int, int, int]) -> tuple[int, int]:
    return (box[0] + box[2]) // 2, (box[1] + box[3]) // 2


def _close(pixel: tuple[int, ...], colour: tuple[int, int, int], tolerance: int = 6) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour, strict=True))


def test_one_labelled_row_per_variant():
    rows = _rows()
    sheet = build_contact_sheet(rows, "spring-mug-launch")
    layout = contact_sheet_layout(rows)
    assert sheet.size == layout.size and sheet.mode == "RGB"
    assert len(layout.rows) == 2
    first, second = layout.rows
    assert layout.title[3] <= first.band[1] and first.band[3] == second.band[1]  # stacked, in order
    for placed, shade in zip(layout.rows, (BACKGROUND, BAND_SHADE), strict=True):
        label = sheet.crop(placed.label)
        colours = label.getcolors(maxcolors=label.width * label.height)
        assert colours is not None and len(colours) > 2  # text with anti-aliasing, not a blank box
        assert max(colours)[1] == shade  # mostly the row's own background
        assert min(min(pixel) for _, pixel in colours) < 100  # dark ink
    # The longer prompt wraps onto several lines inside its label box.
    label = sheet.crop(first.label).convert("L")
    inked_lines = {
        y for y in range(label.height) if min(label.getpixel((x, y)) for x in range(label.width)) < 128
    }
    assert max(inked_lines) - min(inked_lines) > 60
    # Titles and captions are drawn too.
    assert sheet.crop(layout.title).convert("L").getextrema()[0] < 100
    assert all(
        sheet.crop(box).convert("L").getextrema()[0] < 100 for row in layout.rows for box in row.captions
    )


def test_thumbnails_land_in_their_cells_and_both_orientations_fit():
    rows = _rows()
    sheet = build_contact_sheet(rows, "spring-mug-launch")
    layout = contact_sheet_layout(rows)
    red_cell, green_cell, _ = layout.rows[0].cells
    left, top, right, bottom = red_cell
    # A 16:9 clip fills its 16:9 cell to the edges.
    for point in (_centre(red_cell), (left + 2, top + 2), (right - 3, bottom - 3)):
        assert _close(sheet.getpixel(point), RED)
    # A 9:16 clip fits whole: full height, centred, its sides filled with the cell background.
    left, top, right, bottom = green_cell
    cx, cy = _centre(green_cell)
    assert _close(sheet.getpixel((cx, top + 1)), GREEN) and _close(sheet.getpixel((cx, bottom - 2)), GREEN)
    assert _close(sheet.getpixel((left + 2, cy)), CELL_BACKGROUND)
    assert _close(sheet.getpixel((right - 3, cy)), CELL_BACKGROUND)
    green_width = sum(_close(sheet.getpixel((x, cy)), GREEN) for x in range(left, right))
    expected = (bottom - top) * 9 / 16
    assert abs(green_width - expected) <= 2
    # A small square RGBA frame is scaled up to the cell height.
    blue_cell = layout.rows[1].cells[1]
    cx, cy = _centre(blue_cell)
    assert _close(sheet.getpixel((cx, cy)), BLUE) and _close(sheet.getpixel((cx, blue_cell[1] + 1)), BLUE)


def test_missing_samples_get_labelled_placeholders():
    rows = _rows()
    sheet = build_contact_sheet(rows, "spring-mug-launch")
    layout = contact_sheet_layout(rows)
    for cell, status in ((layout.rows[0].cells[2], "failed"), (layout.rows[1].cells[0], "quarantined")):
        crop = sheet.crop(cell)
        colours = {pixel for _, pixel in crop.getcolors(maxcolors=crop.width * crop.height)}
        assert PLACEHOLDER in colours
        assert STATUS_COLOURS[status] in colours  # its border and its word
        assert not any(_close(pixel, colour) for pixel in colours for colour in (RED, GREEN, BLUE))
        # The word sits in the middle: the status colour appears in the central band, not only the border.
        middle = crop.crop((10, crop.height // 3, crop.width - 10, 2 * crop.height // 3))
        assert STATUS_COLOURS[status] in {
            p for _, p in middle.getcolors(maxcolors=middle.width * middle.height)
        }


def test_many_samples_wrap_and_mixed_sizes_share_one_grid():
    shapes = [(1280, 720), (720, 1280), (96, 64), (64, 96), (1280, 704), (500, 500), (2000, 400)]
    colours = [(20 + 30 * i, 200 - 25 * i, 90) for i in range(len(shapes))]
    samples = [
        ContactSample(f"#{i}", Image.new("RGB", shape, colour))
        for i, (shape, colour) in enumerate(zip(shapes, colours, strict=True))
    ]
    rows = [
        ContactRow("mix", "Every shape the models make, and two they do not.", samples),
        ContactRow("empty", "A variant with no samples yet.", []),
    ]
    sheet = build_contact_sheet(rows, "mix", cell_height=90, max_columns=3)
    layout = contact_sheet_layout(rows, cell_height=90, max_columns=3)
    cells = layout.rows[0].cells
    assert len({c[1] for c in cells}) == 3  # 7 samples, 3 per line: 3 lines
    assert {c[2] - c[0] for c in cells} == {160} and {c[3] - c[1] for c in cells} == {90}
    assert all(c[2] <= sheet.width and c[3] <= layout.rows[0].band[3] for c in cells)
    for cell, colour in zip(cells, colours, strict=True):
        assert _close(sheet.getpixel(_centre(cell)), colour, tolerance=8)
    assert layout.rows[1].cells == [] and layout.rows[1].band[3] < sheet.height


def test_encoded_bytes():
    sheet = build_contact_sheet(_rows(), "spring-mug-launch")
    jpeg = contact_sheet_bytes(sheet)
    assert jpeg[:3] == b"\xff\xd8\xff" and Image.open(io.BytesIO(jpeg)).size == sheet.size
    png = contact_sheet_bytes(sheet, "PNG")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(png)).convert("RGB").tobytes() == sheet.tobytes()
