"""The product catalog: its Parquet schema, the typed row, and validation that names row and field.

A catalog is read whole, but validated row by row: every problem becomes a
:class:`RowProblem` naming the row (its position and SKU) and the field at fault,
and the valid rows go on to planning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from catalogs.prompts import STYLES

_SKU = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
CATALOG_SCHEMA = pa.schema(
    [
        pa.field("sku", pa.string(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("description", pa.string(), nullable=False),
        pa.field("style", pa.string(), nullable=False),
        pa.field("updated_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("image_uri", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("negative_prompt", pa.string()),
        pa.field("model", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("size", pa.string()),
        pa.field("num_frames", pa.int32()),
        pa.field("steps", pa.int32()),
        pa.field("postprocess_profile", pa.string()),
        pa.field("locale", pa.string()),
    ],
    metadata={
        "image_uri": "optional: s3://bucket/key, an absolute path, or a path relative to the catalog",
        "prompt": "optional: overrides the prompt made from title, description and style",
        "model": "optional: t2v-a14b, i2v-a14b or ti2v-5b (default by whether there is an image)",
        "seed": "optional: fixed seed (default: derived from the SKU)",
        "size": "optional: WIDTHxHEIGHT (default: the model's default size)",
        "num_frames": "optional: frames to generate, 4k+1 up to the model's maximum (default: the model's)",
        "steps": "optional: denoising steps (default: the model's official count); fewer: faster, rougher",
        "postprocess_profile": "optional: a post-production profile name (default: the run's)",
        "locale": "optional: the prompt's language for the prompt policy, e.g. en or de-AT",
    },
)
REQUIRED_COLUMNS = tuple(f.name for f in CATALOG_SCHEMA if not f.nullable)


class CatalogRow(BaseModel):
    """One product, as validated from a catalog row."""

    model_config = ConfigDict(frozen=True, str_strip_whitespace=True, extra="ignore")

    row: int = Field(description="0-based position in the catalog")
    sku: str = Field(min_length=1, max_length=128)
    title: str = Field(min_length=1)
    description: str
    style: str
    updated_at: datetime
    image_uri: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    model: str | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    size: tuple[int, int] | None = None
    num_frames: int | None = Field(default=None, ge=1)  # the model's rules (4k+1, its maximum) at planning
    steps: int | None = Field(default=None, ge=1, le=1000)
    postprocess_profile: str | None = None
    locale: str | None = None

    @field_validator("sku")
    @classmethod
    def _storable_sku(cls, sku: str) -> str:
        # The SKU names the clip's folder in the object store.
        if not _SKU.fullmatch(sku):
            raise ValueError(
                f"{sku!r} may hold only letters, digits, '.', '_' and '-', starting with a letter or digit"
            )
        return sku

    @field_validator("style")
    @classmethod
    def _known_style(cls, style: str) -> str:
        if style not in STYLES:
            raise ValueError(f"unknown style {style!r}; known: {', '.join(sorted(STYLES))}")
        return style

    @field_validator(
        "image_uri", "prompt", "negative_prompt", "model", "postprocess_profile", "locale", mode="before"
    )
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("size", mode="before")
    @classmethod
    def _parse_size(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if isinstance(value, str):
            width, sep, height = value.lower().partition("x")
            if not sep or not width.strip().isdigit() or not height.strip().isdigit():
                raise ValueError(f"{value!r} is not WIDTHxHEIGHT, e.g. 832x480")
            return int(width), int(height)
        return value


@dataclass(frozen=True)
class RowProblem:
    """Why a catalog row cannot become a clip."""

    row: int
    sku: str | None
    field: str
    message: str

    def __str__(self) -> str:
        sku = f" (sku {self.sku!r})" if self.sku else ""
        return f"row {self.row}{sku}, field {self.field!r}: {self.message}"


@dataclass(frozen=True)
class ValidatedCatalog:
    rows: list[CatalogRow]
    problems: list[RowProblem]


class CatalogSchemaError(ValueError):
    """The catalog as a whole cannot be read: a required column is missing or has the wrong type."""


def conform_table(table: pa.Table) -> pa.Table:
    """The catalog's columns in schema order and types; absent optional columns become nulls.

    Raises :class:`CatalogSchemaError` naming any missing required column or one that
    cannot be cast to its type; extra columns are dropped.
    """
    missing = [name for name in REQUIRED_COLUMNS if name not in table.column_names]
    if missing:
        raise CatalogSchemaError(f"catalog lacks required column(s): {', '.join(missing)}")
    columns = []
    for field in CATALOG_SCHEMA:
        if field.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        if (
            pa.types.is_timestamp(field.type)
            and pa.types.is_timestamp(column.type)
            and column.type.tz is None
        ):
            # Naive timestamps (as pandas writes them by default) are taken as UTC.
            column = column.cast(pa.timestamp(column.type.unit, tz="UTC"))
        try:
            columns.append(column.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise CatalogSchemaError(f"column {field.name!r} cannot be read as {field.type}: {err}") from err
    # Nullability is checked per row by validation, so that one bad row does not sink the catalog.
    relaxed = pa.schema([f.with_nullable(True) for f in CATALOG_SCHEMA], metadata=CATALOG_SCHEMA.metadata)
    return pa.Table.from_arrays(columns, schema=relaxed)


def validate_catalog(table: pa.Table) -> ValidatedCatalog:
    """Validate every row; keep the valid ones and a problem per bad field of the others."""
    rows, problems = [], []
    seen_skus: dict[str, int] = {}
    for index, record in enumerate(conform_table(table).to_pylist()):
        sku = record.get("sku") or None
        try:
            row = CatalogRow(row=index, **record)
        except ValidationError as err:
            for error in err.errors():
                field = ".".join(str(part) for part in error["loc"]) or "row"
                problems.append(RowProblem(index, sku, field, _plain_message(error)))
            continue
        if row.sku in seen_skus:
            problems.append(RowProblem(index, row.sku, "sku", f"duplicates row {seen_skus[row.sku]}"))
            continue
        seen_skus[row.sku] = index
        rows.append(row)
    return ValidatedCatalog(rows, problems)


def _plain_message(error: dict[str, Any]) -> str:
    if error["type"] == "missing" or (error["type"].endswith("_type") and error.get("input") is None):
        return "is required"
    return error["msg"].removeprefix("Value error, ")
