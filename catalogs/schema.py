"""The product catalog: its Parquet schema, the typed row, and validation that names row and field.

A catalog is read whole, but validated row by row, cell by cell: every problem becomes a
:class:`~catalogs.problems.RowProblem` naming the row (its position and SKU) and the field at
fault, and the valid rows go on to planning. Only a catalog that lacks a required column is
refused whole; a cell that cannot be read as its column's type fails its own row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from catalogs.adapters import Adapters
from catalogs.problems import InputError, RowProblem, RowRef
from catalogs.prompts import STYLES
from catalogs.rules import Locale, Seed, Size, Sku, WholeNumber

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
        pa.field("recipe", pa.string()),
        pa.field("adapters", pa.string()),
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
        "recipe": "optional: sampling recipe, standard or lightx2v-4step (default: the run's, where the "
        "model has it)",
        "adapters": "optional: registered adapters (LoRAs), comma-separated, e.g. acme-style:0.8",
    },
)
REQUIRED_COLUMNS = tuple(f.name for f in CATALOG_SCHEMA if not f.nullable)


class CatalogRow(BaseModel):
    """One product, as validated from a catalog row."""

    model_config = ConfigDict(frozen=True, str_strip_whitespace=True, extra="ignore")

    row: int = Field(description="0-based position in the catalog")
    sku: Sku = Field(min_length=1)  # it names the clip's folder in the object store
    title: str = Field(min_length=1)
    description: str
    style: str
    updated_at: datetime
    image_uri: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    model: str | None = None
    seed: Seed | None = None
    size: Size | None = None
    num_frames: WholeNumber | None = Field(default=None, ge=1)  # the model's rules (4k+1, ...) at planning
    steps: WholeNumber | None = Field(default=None, ge=1, le=1000)
    postprocess_profile: str | None = None
    locale: Locale | None = None
    recipe: str | None = None  # checked against the model at planning
    adapters: Adapters  # names and scales checked against the registry at planning

    @field_validator("style")
    @classmethod
    def _known_style(cls, style: str) -> str:
        if style not in STYLES:
            raise ValueError(f"unknown style {style!r}; known: {', '.join(sorted(STYLES))}")
        return style

    @field_validator(
        "image_uri",
        "prompt",
        "negative_prompt",
        "model",
        "size",
        "postprocess_profile",
        "locale",
        "recipe",
        mode="before",
    )
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value


@dataclass(frozen=True)
class ValidatedCatalog:
    rows: list[CatalogRow]
    problems: list[RowProblem]


class CatalogSchemaError(InputError):
    """The catalog as a whole cannot be read: it is no Parquet file, or a required column is missing."""


def catalog_records(table: pa.Table) -> list[dict[str, Any]]:
    """The catalog's rows as dicts of the schema's fields; absent optional columns are None.

    A column is cast to its schema type as a whole where it can be. Where it cannot (a seed of NaN
    or 2**70, a frame count in words), its cells are kept as read, so that validation fails only the
    rows whose cells are bad. Raises :class:`CatalogSchemaError` naming any missing required column;
    extra columns are dropped.
    """
    missing = [name for name in REQUIRED_COLUMNS if name not in table.column_names]
    if missing:
        raise CatalogSchemaError(f"catalog lacks required column(s): {', '.join(missing)}")
    columns: dict[str, list[Any]] = {}
    for field in CATALOG_SCHEMA:
        if field.name not in table.column_names:
            columns[field.name] = [None] * table.num_rows
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
            columns[field.name] = column.cast(field.type).to_pylist()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            columns[field.name] = column.to_pylist()
    return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def validate_catalog(table: pa.Table) -> ValidatedCatalog:
    """Validate every row; keep the valid ones and a problem per bad field of the others."""
    rows, problems = [], []
    seen_skus: dict[str, int] = {}
    for index, record in enumerate(catalog_records(table)):
        at = RowRef(
            source="catalog", row=index, sku=record["sku"] if isinstance(record["sku"], str) else None
        )
        try:
            row = CatalogRow(row=index, **record)
        except ValidationError as err:
            for error in err.errors():
                field = ".".join(str(part) for part in error["loc"]) or "row"
                problems.append(RowProblem(at=at, field=field, message=_plain_message(error)))
            continue
        if row.sku in seen_skus:
            problems.append(RowProblem(at=at, field="sku", message=f"duplicates row {seen_skus[row.sku]}"))
            continue
        seen_skus[row.sku] = index
        rows.append(row)
    return ValidatedCatalog(rows, problems)


def _plain_message(error: Any) -> str:
    if error["type"] == "missing" or (error["type"].endswith("_type") and error.get("input") is None):
        return "is required"
    return error["msg"].removeprefix("Value error, ")
