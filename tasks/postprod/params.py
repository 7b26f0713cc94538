"""How stage parameters are declared: frozen pydantic dataclasses, so a profile's values are checked
(types, choices, ranges, unknown fields) when the profile is loaded, before any clip is made."""

from __future__ import annotations

from typing import TypeVar

from pydantic import ConfigDict
from pydantic.dataclasses import dataclass

T = TypeVar("T")

# arbitrary_types_allowed: the visible watermark carries a loaded PIL image at run time.
_CONFIG = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


def stage_params(cls: type[T]) -> type[T]:
    """Declare a stage's parameters (a class body of annotated fields with defaults)."""
    return dataclass(frozen=True, config=_CONFIG)(cls)
