"""Turning a product into a prompt: the style presets and the template.

A row's own ``prompt`` wins; otherwise the product's title and description are set
in the style's shot description. Templates are plain ``str.format`` strings so the
content team can read and change them.
"""

from __future__ import annotations

from typing import Protocol

PRODUCT_TEMPLATE = "{title}. {description} {style}"

STYLES: dict[str, str] = {
    "studio": (
        "Studio product video: the product turns slowly on a turntable against a seamless white backdrop, "
        "soft key light, gentle reflections, sharp focus, 4k commercial look."
    ),
    "lifestyle": (
        "Lifestyle video: the product in use in a bright, modern home, natural window light, "
        "shallow depth of field, handheld camera drifting slowly."
    ),
    "cinematic": (
        "Cinematic hero shot: dramatic low-key lighting, slow dolly-in, volumetric haze, "
        "rich contrast, anamorphic lens flare."
    ),
    "outdoor": (
        "Outdoor video: the product in golden-hour sunlight, light breeze, warm tones, "
        "slow tracking shot, natural scenery softly out of focus."
    ),
    "flatlay": (
        "Top-down flat-lay video: the product on a textured surface with a few complementary props, "
        "even diffuse light, slow overhead push-in."
    ),
}


class ProductLike(Protocol):
    title: str
    description: str
    style: str
    prompt: str | None


def product_prompt(product: ProductLike) -> str:
    """The prompt for a product: its override, or the template filled from its fields."""
    if product.prompt:
        return product.prompt
    description = product.description.strip()
    if description and description[-1] not in ".!?":
        description += "."
    text = PRODUCT_TEMPLATE.format(
        title=product.title.strip().rstrip("."), description=description, style=STYLES[product.style]
    )
    return " ".join(text.split())
