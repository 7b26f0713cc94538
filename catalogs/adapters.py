"""The adapter registry: the LoRAs a catalog row or prompt sheet may name, and those recipes fuse.

One TOML file (``catalogs/adapters.toml`` unless settings name another) maps each name to
its model family, its file per expert, the scale it is applied at by default and the range
a row may ask for, and trigger words appended to the prompt. Files are relative to the
adapter root (``WANFACTORY_ADAPTER_ROOT``, a folder or ``s3://`` prefix) unless written as
an absolute path or ``s3://`` URI, so one registry serves the real and the tiny models.

A row asks for adapters as ``name`` or ``name:scale``, comma-separated: ``acme-style:0.8``.
Every rule about adapter and recipe choices is here, for the sheet reader and planning alike.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from catalogs.problems import InputError, InvalidValue
from catalogs.rules import MAX_SHEET_ID_LENGTH, storable_name
from wan_engine.adapters import AdapterWeights, expert_names
from wan_engine.recipes import UnknownRecipeError, get_recipe
from wan_engine.specs import ModelSpec, get_model_spec

DEFAULT_REGISTRY = Path(__file__).with_name("adapters.toml")
MAX_ADAPTERS_PER_CLIP = 4


class AdapterRegistryError(InputError):
    """The registry file cannot be used: one line naming the entry and field."""


class AdapterEntry(BaseModel):
    """One registered adapter."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    family: Literal["t2v-a14b", "i2v-a14b", "ti2v-5b"]
    description: str = ""
    # "clip": rows may name it; "recipe": only recipes fuse it (a distillation LoRA changes what the
    # sampler must do, so it comes with its recipe, never on its own).
    use: Literal["clip", "recipe"] = "clip"
    high_noise: str | None = None  # file for the A14B high-noise expert (``transformer``)
    low_noise: str | None = None  # file for the A14B low-noise expert (``transformer_2``)
    dense: str | None = None  # the file for TI2V-5B's one transformer
    default_scale: float = 1.0
    scale_range: tuple[float, float] = (0.0, 1.0)
    trigger_words: str | None = None

    @model_validator(mode="after")
    def _files_fit_the_family(self) -> AdapterEntry:
        experts = expert_names(get_model_spec(self.family))
        given = [expert for expert in ("high_noise", "low_noise", "dense") if getattr(self, expert)]
        if not given:
            raise ValueError(f"names no file; give {' and/or '.join(experts)}")
        if strange := [expert for expert in given if expert not in experts]:
            raise ValueError(f"{', '.join(strange)} is no expert of {self.family} ({', '.join(experts)})")
        low, high = self.scale_range
        if not low <= self.default_scale <= high:
            raise ValueError(f"default_scale {self.default_scale} is outside scale_range [{low}, {high}]")
        return self

    def files(self, root: str) -> tuple[tuple[str, str], ...]:
        """(expert, URI) in the order the experts run, relative paths resolved against ``root``."""
        experts = expert_names(get_model_spec(self.family))
        return tuple(
            (expert, _resolve(getattr(self, expert), root)) for expert in experts if getattr(self, expert)
        )


def _resolve(path: str, root: str) -> str:
    if path.startswith("s3://") or Path(path).is_absolute():
        return path
    return f"{root.rstrip('/')}/{path}"


@dataclass(frozen=True)
class AdapterRegistry:
    entries: dict[str, AdapterEntry]
    root: str  # where relative file paths are

    def weights(self, name: str, scale: float, digest: str | None = None) -> AdapterWeights:
        return AdapterWeights(
            name=name, files=self.entries[name].files(self.root), scale=scale, digest=digest
        )


def load_adapter_registry(path: Path | None, root: str) -> AdapterRegistry:
    """Read and check a registry file (``None``: the packaged one)."""
    path = path or DEFAULT_REGISTRY
    try:
        document = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise AdapterRegistryError(f"adapter registry {path}: {err}") from err
    entries = {}
    for name, fields in document.get("adapters", {}).items():
        try:
            storable_name(name, MAX_SHEET_ID_LENGTH)
            entries[name] = AdapterEntry(name=name, **fields)
        except InvalidValue as err:
            raise AdapterRegistryError(f"adapter registry {path}: adapter name {name!r} {err}") from None
        except (ValidationError, TypeError) as err:
            raise AdapterRegistryError(f"adapter registry {path}: adapter {name!r}: {_first(err)}") from None
    return AdapterRegistry(entries, root)


def _first(err: Exception) -> str:
    if isinstance(err, ValidationError):
        error = err.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        return f"{where + ': ' if where else ''}{error['msg'].removeprefix('Value error, ')}"
    return str(err)


# What a row asks for: (name, scale or None for the adapter's default), in the order written.
AdapterAsk = tuple[str, float | None]


def parse_adapters(value: Any) -> tuple[AdapterAsk, ...]:
    """``"acme-style:0.8, other"`` -> ``(("acme-style", 0.8), ("other", None))``; blank: ``()``."""
    if value is None:
        return ()
    if not isinstance(value, str):
        raise InvalidValue(f"must be text like 'name' or 'name:0.8', not {type(value).__name__}")
    asks: list[AdapterAsk] = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        name, colon, scale_text = part.partition(":")
        name = storable_name(name.strip(), MAX_SHEET_ID_LENGTH)
        scale = None
        if colon:
            try:
                scale = float(scale_text)
            except ValueError:
                raise InvalidValue(f"scale {scale_text.strip()!r} of {name} is not a number") from None
            if scale != scale or scale in (float("inf"), float("-inf")):
                raise InvalidValue(f"scale of {name} must be a finite number")
        if any(name == seen for seen, _ in asks):
            raise InvalidValue(f"names {name} twice")
        asks.append((name, scale))
    if len(asks) > MAX_ADAPTERS_PER_CLIP:
        raise InvalidValue(f"names {len(asks)} adapters; at most {MAX_ADAPTERS_PER_CLIP} per clip")
    return tuple(asks)


def format_adapters(asks: tuple[AdapterAsk, ...]) -> str | None:
    """The inverse of :func:`parse_adapters` (None for no adapters)."""
    parts = [name if scale is None else f"{name}:{scale:g}" for name, scale in asks]
    return ", ".join(parts) or None


def _adapters_or_invalid(value: Any) -> tuple[AdapterAsk, ...]:
    try:
        return parse_adapters(value)
    except InvalidValue as err:
        raise ValueError(str(err)) from None


# The catalog column's type: parsed and checked for syntax on the row; names checked at planning.
Adapters = Annotated[tuple[AdapterAsk, ...], BeforeValidator(_adapters_or_invalid), Field(default=())]


def recipe_problem(spec: ModelSpec, recipe: str) -> str | None:
    """Why ``spec`` cannot run ``recipe``, or None."""
    try:
        get_recipe(spec, recipe)
    except UnknownRecipeError as err:
        return str(err)
    return None


def adapter_problems(spec: ModelSpec, asks: tuple[AdapterAsk, ...], registry: AdapterRegistry) -> list[str]:
    """Why each asked adapter cannot be used on ``spec`` (empty when all can)."""
    problems = []
    for name, scale in asks:
        entry = registry.entries.get(name)
        if entry is None:
            known = ", ".join(sorted(n for n, e in registry.entries.items() if e.use == "clip")) or "none"
            problems.append(f"unknown adapter {name!r}; registered: {known}")
        elif entry.family != spec.family:
            problems.append(f"{name} is an adapter for {entry.family}, not {spec.family}")
        elif entry.use != "clip":
            problems.append(f"{name} is part of a recipe, not an adapter for rows; choose the recipe instead")
        elif scale is not None and not entry.scale_range[0] <= scale <= entry.scale_range[1]:
            low, high = entry.scale_range
            problems.append(f"scale {scale:g} of {name} is outside its range {low:g} to {high:g}")
    return problems


def with_trigger_words(prompt: str, asks: tuple[AdapterAsk, ...], registry: AdapterRegistry) -> str:
    """The prompt with each adapter's trigger words appended (once, in the order the adapters are named)."""
    words = [registry.entries[name].trigger_words for name, _ in asks if registry.entries[name].trigger_words]
    missing = [w for w in words if w.casefold() not in prompt.casefold()]
    return ", ".join([prompt, *missing]) if missing else prompt
