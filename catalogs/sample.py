"""The sample catalog shipped in ``catalogs/sample/`` and a generator of large synthetic catalogs.

``python -m catalogs.sample`` rewrites the shipped sample (12 products, 3 with a
product photo drawn here, so nothing is downloaded). The synthetic generator makes
catalogs of any size for load tests: ``wanfactory catalog synth --rows 10000``.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from catalogs.prompts import STYLES
from catalogs.schema import CATALOG_SCHEMA

SAMPLE_DIR = Path(__file__).parent / "sample"
SAMPLE_CATALOG = SAMPLE_DIR / "catalog.parquet"
_UPDATED = datetime(2026, 11, 20, 22, 0, tzinfo=UTC)

SAMPLE_PRODUCTS: list[dict] = [
    {
        "sku": "MUG-0001",
        "title": "Speckled stoneware mug",
        "description": "Hand-glazed 350 ml mug in sea blue.",
        "style": "studio",
        "image_uri": "images/mug.png",
    },
    {
        "sku": "SNK-0002",
        "title": "Runner knit sneaker",
        "description": "Breathable knit upper, red with white sole.",
        "style": "studio",
    },
    {
        "sku": "LMP-0003",
        "title": "Arc floor lamp",
        "description": "Brushed brass arc lamp with a linen shade.",
        "style": "lifestyle",
        "image_uri": "images/lamp.png",
    },
    {
        "sku": "WCH-0004",
        "title": "Field chronograph",
        "description": "Steel 40 mm watch on a tan leather strap.",
        "style": "cinematic",
    },
    {
        "sku": "BAG-0005",
        "title": "Waxed canvas tote",
        "description": "Olive tote with leather handles.",
        "style": "outdoor",
        "seed": 1234,
    },
    {
        "sku": "BTL-0006",
        "title": "Insulated bottle",
        "description": "Matte black 750 ml steel bottle.",
        "style": "outdoor",
        "model": "ti2v-5b",
    },
    {
        "sku": "HDP-0007",
        "title": "Studio headphones",
        "description": "Closed-back headphones in silver.",
        "style": "cinematic",
        "size": "64x96",
    },
    {
        "sku": "CHR-0008",
        "title": "Oak lounge chair",
        "description": "Solid oak frame, cream wool cushions.",
        "style": "lifestyle",
    },
    {
        "sku": "JKT-0009",
        "title": "Quilted field jacket",
        "description": "Water-resistant navy jacket.",
        "style": "outdoor",
    },
    {
        "sku": "TBL-0010",
        "title": "Marble side table",
        "description": "White marble top on a slim black base.",
        "style": "flatlay",
    },
    {
        "sku": "HAT-0011",
        "title": "Wool felt fedora",
        "description": "Charcoal fedora with a grosgrain band.",
        "style": "studio",
        "prompt": "A charcoal wool fedora spins slowly on a hat stand, soft studio light.",
    },
    {
        "sku": "CUP-0012",
        "title": "Glass pour-over set",
        "description": "Borosilicate dripper and carafe.",
        "style": "flatlay",
        "image_uri": "images/pourover.png",
        "model": "ti2v-5b",
    },
]


def _draw_mug(draw: ImageDraw.ImageDraw) -> None:
    draw.rounded_rectangle(
        (220, 150, 400, 380), radius=24, fill=(40, 110, 170), outline=(20, 60, 100), width=6
    )
    draw.arc((370, 200, 470, 320), start=-80, end=80, fill=(30, 90, 140), width=22)
    for x, y in ((250, 190), (300, 260), (350, 210), (270, 320), (340, 330)):
        draw.ellipse((x, y, x + 8, y + 8), fill=(230, 230, 240))


def _draw_lamp(draw: ImageDraw.ImageDraw) -> None:
    draw.arc((150, 60, 470, 420), start=180, end=300, fill=(190, 150, 60), width=10)
    draw.polygon(
        [(380, 110), (470, 110), (500, 200), (350, 200)], fill=(235, 225, 200), outline=(160, 140, 110)
    )
    draw.ellipse((120, 400, 260, 440), fill=(170, 130, 50))


def _draw_pourover(draw: ImageDraw.ImageDraw) -> None:
    draw.polygon(
        [(240, 120), (400, 120), (350, 220), (290, 220)], fill=(210, 230, 240), outline=(120, 150, 170)
    )
    draw.ellipse((250, 220, 390, 400), fill=(200, 225, 235), outline=(120, 150, 170), width=4)
    draw.rectangle((270, 320, 370, 390), fill=(110, 70, 40))


_DRAWINGS = {"mug": _draw_mug, "lamp": _draw_lamp, "pourover": _draw_pourover}


def write_sample_catalog(out_dir: Path = SAMPLE_DIR) -> Path:
    """Write the sample catalog and its product photos under ``out_dir``; return the catalog's path."""
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for name, draw_product in _DRAWINGS.items():
        image = Image.new("RGB", (640, 480), (245, 243, 238))
        draw_product(ImageDraw.Draw(image))
        image.save(out_dir / "images" / f"{name}.png")
    rows = [{**product, "updated_at": _UPDATED} for product in SAMPLE_PRODUCTS]
    path = out_dir / "catalog.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA), path)
    return path


_ADJECTIVES = ("classic", "modern", "minimal", "premium", "vintage", "compact", "oversized", "handmade")
_COLOURS = ("red", "navy", "olive", "cream", "charcoal", "sand", "teal", "burgundy", "white", "black")
_PRODUCTS = (
    "sneaker",
    "tote bag",
    "desk lamp",
    "wristwatch",
    "mug",
    "armchair",
    "jacket",
    "water bottle",
    "sunglasses",
    "backpack",
    "candle",
    "vase",
    "headphones",
    "scarf",
    "wallet",
)
_MATERIALS = ("leather", "canvas", "ceramic", "oak", "steel", "wool", "linen", "glass", "recycled nylon")


def synthetic_catalog(
    rows: int, seed: int = 0, image_uris: tuple[str, ...] = (), image_every: int = 5
) -> pa.Table:
    """A valid catalog of ``rows`` made-up products, reproducible from ``seed``.

    When ``image_uris`` are given, every ``image_every``-th product uses one of them.
    """
    rng = random.Random(seed)
    styles = sorted(STYLES)
    records = []
    for index in range(rows):
        adjective, colour = rng.choice(_ADJECTIVES), rng.choice(_COLOURS)
        product, material = rng.choice(_PRODUCTS), rng.choice(_MATERIALS)
        with_image = bool(image_uris) and index % image_every == 0
        records.append(
            {
                "sku": f"SYN-{index:07d}",
                "title": f"{adjective.capitalize()} {colour} {product}",
                "description": f"A {adjective} {product} in {colour} {material}.",
                "style": rng.choice(styles),
                "updated_at": _UPDATED - timedelta(minutes=rng.randrange(60 * 24 * 30)),
                "image_uri": rng.choice(image_uris) if with_image else None,
            }
        )
    return pa.Table.from_pylist(records, schema=CATALOG_SCHEMA)


if __name__ == "__main__":
    print(write_sample_catalog())
