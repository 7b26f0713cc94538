"""The rules catalogs and prompt sheets share, each stated once: names that become object keys,
sizes as people write them, seeds derived from what a clip is of, and the default model.

What a model accepts (sizes, frames, steps, the seed's range) is the engine's
(:mod:`wan_engine.requests`); these rules only read what people wrote.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Annotated, Any

import langcodes
from pydantic import AfterValidator, BeforeValidator

from catalogs.problems import InvalidValue
from wan_engine.requests import MAX_SEED
from wan_engine.specs import ModelSpec, Variant, get_model_spec

MAX_SKU_LENGTH = 128
MAX_SHEET_ID_LENGTH = 64  # experiment and variant ids, profile names

# SKUs, experiment and variant ids and profile names become object-store folders.
_STORABLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SIZE = re.compile(r"(\d+)\s*[xX×*]\s*(\d+)")


def storable_name(text: str, max_length: int) -> str:
    """``text`` if it is usable as a folder name in the object store; else :class:`InvalidValue` saying why,
    with an ASCII suggestion when there is one."""
    if len(text) > max_length:
        raise InvalidValue(f"{text[:20]!r}... is {len(text)} characters long; at most {max_length}")
    if not _STORABLE_NAME.fullmatch(text):
        message = f"{text!r} may hold only letters, digits, '.', '_' and '-', starting with a letter or digit"
        ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
        suggestion = re.sub(r"[^A-Za-z0-9._-]+", "-", ascii_text).strip("._-")[:max_length]
        if _STORABLE_NAME.fullmatch(suggestion):
            message += f", e.g. {suggestion!r}"
        raise InvalidValue(message)
    return text


def parse_size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` as people write it (``832x480``, ``832 X 480``, ``832×480``) -> (width, height)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise InvalidValue(f"{text!r} is not WIDTHxHEIGHT, e.g. 832x480")
    return int(match[1]), int(match[2])


def whole_number(value: Any) -> Any:
    """Spreadsheet exports write integer columns with gaps as floats: 7.0 is 7; NaN and 7.5 are refused."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidValue(f"{value} is not a number")
        if not value.is_integer():
            raise InvalidValue(f"{value} is not a whole number")
        return int(value)
    return value


def seed_in_range(seed: int) -> int:
    """The engine's seed range (:data:`wan_engine.requests.MAX_SEED`)."""
    if not 0 <= seed <= MAX_SEED:
        raise InvalidValue(f"{seed} is outside 0 to {MAX_SEED}")
    return seed


def locale_tag(text: str) -> str:
    """A BCP 47 language tag, normalised (``EN-us`` and ``en_US`` are ``en-US``); :class:`InvalidValue` for
    one that is malformed or names no registered language (``zz``)."""
    tag = text.strip().replace("_", "-")
    if not tag.isascii() or not tag.isprintable() or not langcodes.tag_is_valid(tag):
        raise InvalidValue(f"{text!r} is not a BCP 47 language tag, e.g. en, de-AT or pt-BR")
    return langcodes.standardize_tag(tag)


def _size_or_as_is(value: Any) -> Any:
    return parse_size(value) if isinstance(value, str) else value


# The rules above as pydantic types, for the models that validate rows with them.
Sku = Annotated[str, AfterValidator(lambda text: storable_name(text, MAX_SKU_LENGTH))]
Size = Annotated[tuple[int, int], BeforeValidator(_size_or_as_is)]
Seed = Annotated[int, BeforeValidator(whole_number), AfterValidator(seed_in_range)]
WholeNumber = Annotated[int, BeforeValidator(whole_number)]
Locale = Annotated[str, AfterValidator(locale_tag)]


def derive_seed(namespace: str, *parts: object) -> int:
    """A stable 32-bit seed from what a clip is of, so the same product or sample always starts from the
    same noise."""
    key = ":".join([namespace, *map(str, parts)])
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")


def product_seed(sku: str) -> int:
    """A catalog product's seed when its row gives none."""
    return derive_seed("wanfactory-seed", sku)


def sample_seed(experiment_id: str, sample: int) -> int:
    """The seed of sample ``sample`` (0-based) of every variant of an experiment whose row lists none."""
    return derive_seed("wanfactory-sheet-seed", experiment_id, sample)


@dataclass(frozen=True, kw_only=True)
class ModelDefaults:
    """Which model a row gets when it names none, and at which variant every model runs."""

    variant: Variant  # "full" (real weights) or "tiny" (the offline test models)
    text_model: str  # for rows without an image
    image_model: str  # for rows with one

    def family_for(self, model: str | None, has_image: bool) -> str:
        """The row's model family: its own, else the default for whether it has an image."""
        return model or (self.image_model if has_image else self.text_model)

    def spec_for(self, model: str | None, has_image: bool) -> ModelSpec:
        """The row's model at the run's variant; :class:`UnknownModelError` for a family we do not know."""
        return get_model_spec(self.family_for(model, has_image), self.variant)
