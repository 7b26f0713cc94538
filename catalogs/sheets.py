"""A/B prompt sheets: the spreadsheet a marketing team fills in, read, validated and stored as Parquet.

One row per variant. Row 1 holds the headers; headers match whatever their case, spacing or
punctuation ("Variant ID", "variant_id" and "variant-id" are one column) and a few plain-word
aliases ("Experiment", "Variant", "Seed", "Ratio", "Image", "Profile") are accepted.

=====================  =========  ============================================================
column                 required   meaning
=====================  =========  ============================================================
experiment_id          yes        the experiment, e.g. ``spring-mugs``
variant_id             yes        the variant within it, e.g. ``A``; unique per experiment
prompt                 one of     the prompt, free text, used as written
template + subject     the two    a style template (``catalogs.prompts.STYLES``: studio,
                                  lifestyle, cinematic, outdoor, flatlay) filled with the
                                  subject, exactly as a catalog product's title is
style                  no         extra style words appended to the prompt ("pastel palette")
negative_prompt        no         what to avoid; empty: Wan2.2's own negative prompt
model                  no         t2v-a14b, i2v-a14b, ti2v-5b; empty: i2v-a14b with an
                                  image, t2v-a14b without
seeds                  no         explicit seeds, e.g. ``1, 2, 3`` (commas, semicolons or spaces)
samples                no         how many clips (1-16) with derived seeds; default 1
aspect_ratio           no         16:9, 9:16 or 1:1: the model's first landscape, portrait or
                                  square size (16:9 is 1280x720, 1280x704 on ti2v-5b; the
                                  full models have no square size)
size                   no         WIDTHxHEIGHT, one of the model's sizes; default its first
image_uri              no         s3://bucket/key or a path (relative: to the sheet's folder)
postprocess_profile    no         the name of a post-processing profile
notes                  no         free text, kept but not used
=====================  =========  ============================================================

A row gives either ``prompt`` or ``template`` with ``subject``; ``seeds`` or ``samples``; and
``aspect_ratio`` or ``size``, never both of a pair. Experiment and variant ids name object-store
folders (``experiments/<experiment>/<variant>/``), so they hold only ASCII letters, digits, ``.``,
``_`` and ``-``, start with a letter or digit, and are at most 64 characters; two rows may not share
an (experiment, variant) pair, even in a different letter case.

Derived seeds depend on the experiment and the sample number only, not on the variant: the first
sample of every variant of an experiment starts from the same noise, and so on for the second and
the third, so two variants differ only by what the sheet changes between them (a paired
comparison, :func:`catalogs.rules.sample_seed`). A variant that wants other seeds lists them.

Each cell is read with the rules catalogs share (:mod:`catalogs.rules`: names, sizes, seeds, the
default model), the rules the catalog's pydantic model applies as field types. The checks across
cells of a row (a prompt or a template, a size the model has, an image the model takes) are plain
code here, not a pydantic model validator: pydantic runs those only once every field passed, and a
person fixing a sheet should see every problem of a row in one go.

Problems name the row as the spreadsheet shows it (the header is row 1, the first variant row 2)
and the column by its header as written. A bad row is reported and the others go on; only a file
that cannot be read as a prompt sheet at all (no ids columns, no prompt column, two columns for
the same field) raises :class:`SheetFormatError`. Columns the format does not know are ignored with
a warning, so a typo in a header is seen.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
import re
import zipfile
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
from openpyxl.utils import get_column_letter
from openpyxl.utils.exceptions import InvalidFileException

from catalogs.adapters import (
    AdapterAsk,
    AdapterRegistry,
    adapter_problems,
    format_adapters,
    parse_adapters,
    recipe_problem,
)
from catalogs.problems import InputError, InvalidValue, RowProblem, RowRef
from catalogs.prompts import STYLES, product_prompt
from catalogs.rules import (
    MAX_SHEET_ID_LENGTH,
    ModelDefaults,
    parse_size,
    sample_seed,
    seed_in_range,
    storable_name,
)
from catalogs.sources import read_bytes, resolve_reference, split_s3_uri
from wan_engine.specs import MODEL_FAMILIES, ModelSpec, Variant, get_model_spec

if TYPE_CHECKING:
    from minio import Minio

MAX_SAMPLES = 16  # clips per variant: a contact-sheet row, not a load test
ASPECT_RATIOS = ("16:9", "9:16", "1:1")

_WHOLE_NUMBER = re.compile(r"[+-]?\d+(?:\.0*)?")
# Also what Excel's time conversion of "16:9" reads back as ("16:09").
_RATIO = re.compile(r"(\d+)\s*[:/]\s*(\d+)")
# Invisible characters that copying from documents and web pages leaves in cells.
_INVISIBLE = "\ufeff\u200b\u200c\u200d\u2060"

COLUMNS = (
    "experiment_id",
    "variant_id",
    "prompt",
    "template",
    "subject",
    "style",
    "negative_prompt",
    "model",
    "seeds",
    "samples",
    "aspect_ratio",
    "size",
    "image_uri",
    "postprocess_profile",
    "recipe",
    "adapters",
    "notes",
)
# Headers are matched on their letters and digits alone, lower-cased: "Variant ID" -> "variantid".
_HEADER_ALIASES: dict[str, str] = {
    **{name.replace("_", ""): name for name in COLUMNS},
    "experiment": "experiment_id",
    "variant": "variant_id",
    "product": "subject",
    "negative": "negative_prompt",
    "seed": "seeds",
    "numsamples": "samples",
    "aspect": "aspect_ratio",
    "ratio": "aspect_ratio",
    "resolution": "size",
    "image": "image_uri",
    "imageurl": "image_uri",
    "imagepath": "image_uri",
    "postprocess": "postprocess_profile",
    "postprocessing": "postprocess_profile",
    "postprocessingprofile": "postprocess_profile",
    "profile": "postprocess_profile",
    "lora": "adapters",
    "loras": "adapters",
    "adapter": "adapters",
    "note": "notes",
    "comment": "notes",
    "comments": "notes",
}

PROMPT_SHEET_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int32(), nullable=False),
        pa.field("experiment_id", pa.string(), nullable=False),
        pa.field("variant_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("template", pa.string()),
        pa.field("subject", pa.string()),
        pa.field("style", pa.string()),
        pa.field("negative_prompt", pa.string()),
        pa.field("model", pa.string(), nullable=False),
        pa.field("model_variant", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("aspect_ratio", pa.string()),
        pa.field("seeds", pa.list_(pa.field("element", pa.int64(), nullable=False)), nullable=False),
        pa.field("seeds_derived", pa.bool_(), nullable=False),
        pa.field("image_uri", pa.string()),
        pa.field("postprocess_profile", pa.string()),
        pa.field("recipe", pa.string()),
        pa.field("adapters", pa.string()),
        pa.field("notes", pa.string()),
    ],
    metadata={
        "row": "the spreadsheet row the variant came from (the header is row 1)",
        "prompt": "the prompt sent to the model: the sheet's prompt, or its template filled, plus its style",
        "model": "the model family, the sheet's or the default; model_variant: full or tiny",
        "width": "width and height: the size resolved from the sheet's size or aspect ratio",
        "seeds": "one seed per sample; seeds_derived: derived from the experiment, not written in the sheet",
        "recipe": "the sampling recipe the sheet names (none: the run's default)",
        "adapters": "the adapters the sheet names, as name:scale, comma-separated",
    },
)


class SheetFormatError(InputError):
    """The file cannot be read as a prompt sheet at all; the message says what to change."""


@dataclass(frozen=True, kw_only=True)
class SheetRules:
    """The run's choices a sheet is read with: built once from settings
    (:func:`tasks.planning.sheet_rules`) for ``ab submit``, the intake watcher and the run alike."""

    models: ModelDefaults
    postprocess_profiles: frozenset[str] | None = None  # the only profile names accepted; None: any
    adapters: AdapterRegistry | None = None  # the adapters rows may name; None: names are not checked


def _sheet_problem(row: int | None, column: str, message: str) -> RowProblem:
    return RowProblem(at=RowRef(source="sheet", row=row), field=column, message=message)


@dataclass(frozen=True, kw_only=True)
class SheetVariant:
    """One valid row of a prompt sheet, resolved: final prompt, model, size and seeds."""

    row: int
    experiment_id: str
    variant_id: str
    prompt: str
    template: str | None
    subject: str | None
    style: str | None
    negative_prompt: str | None
    model: str
    model_variant: Variant
    width: int
    height: int
    aspect_ratio: str | None
    seeds: tuple[int, ...]
    seeds_derived: bool
    image_uri: str | None
    postprocess_profile: str | None
    recipe: str | None = None
    adapters: tuple[AdapterAsk, ...] = ()
    notes: str | None

    def clips(self) -> list[SheetClip]:
        """One clip per seed, in the order of the seeds."""
        return [SheetClip(variant=self, sample=index, seed=seed) for index, seed in enumerate(self.seeds)]


@dataclass(frozen=True, kw_only=True)
class SheetClip:
    """One clip to make for a variant: which of its samples, with which seed."""

    variant: SheetVariant
    sample: int  # 0-based position among the variant's samples
    seed: int


@dataclass(frozen=True)
class SheetReadResult:
    variants: list[SheetVariant]  # the valid rows, in sheet order
    problems: list[RowProblem]  # one per bad cell of the other rows, in sheet order
    warnings: list[RowProblem]  # columns that were ignored
    table: pa.Table  # the variants as PROMPT_SHEET_SCHEMA, ready to be written as Parquet


@dataclass(frozen=True)
class _TemplateInput:
    """A template's subject shaped as ``product_prompt`` reads it: sheets and catalogs share one template."""

    title: str
    style: str
    description: str = ""
    prompt: str | None = None


_BAD: Any = object()  # what a cell that failed its check parses to


def read_prompt_sheet(
    source: str | Path | bytes,
    filename: str | None = None,
    *,
    rules: SheetRules,
    sheet: str | None = None,
) -> SheetReadResult:
    """Read and validate a prompt sheet (.xlsx or .csv): its valid variants, its problems, and its table.

    ``source`` is a local path or the file's bytes; with bytes, ``filename`` gives the format. ``sheet``
    picks a worksheet of a workbook by name (default: the first). Models, sizes and profiles are
    checked against ``rules``. Image references are kept as written (:func:`load_prompt_sheet`
    resolves them). Raises :class:`SheetFormatError` when the file is not a readable prompt sheet.
    """
    if isinstance(source, bytes):
        if filename is None:
            raise ValueError("reading a prompt sheet from bytes needs its filename, for the format")
        data = source
    else:
        data = Path(source).expanduser().read_bytes()
        filename = filename or Path(source).name
    grid = [[_cell_text(value) for value in row] for row in _read_grid(data, filename, sheet)]
    if not grid or not any(grid[0]):
        raise SheetFormatError(f"row 1 must hold the column headers ({', '.join(COLUMNS)}), but it is empty")
    columns, headers, warnings = _map_headers(grid)
    variants, problems = [], []
    claimed: dict[tuple[str, str], int] = {}  # case-folded (experiment, variant) -> the row that has it
    for index, cells in enumerate(grid[1:]):
        row_number = index + 2
        values = {name: cells[col] if col < len(cells) else "" for name, col in columns.items()}
        if not any(values.values()):
            continue  # an empty row (or one with text only in ignored columns) is no variant
        parsed = _parse_row(row_number, values, headers, rules, claimed)
        if isinstance(parsed, SheetVariant):
            variants.append(parsed)
        else:
            problems.extend(parsed)
    return SheetReadResult(variants, problems, warnings, prompt_sheet_table(variants))


def load_prompt_sheet(
    uri: str, rules: SheetRules, client: Minio | None = None, sheet: str | None = None
) -> SheetReadResult:
    """Read the prompt sheet at a local path or ``s3://bucket/key``, with image references made absolute."""
    read = read_prompt_sheet(read_bytes(uri, client), PurePosixPath(uri).name, rules=rules, sheet=sheet)
    variants = [
        replace(v, image_uri=resolve_reference(v.image_uri, uri)) if v.image_uri else v for v in read.variants
    ]
    return SheetReadResult(variants, read.problems, read.warnings, prompt_sheet_table(variants))


def expand_variants(variants: Collection[SheetVariant]) -> list[SheetClip]:
    """Every clip of every variant: variants in the given order, then samples in seed order."""
    return [clip for variant in variants for clip in variant.clips()]


def prompt_sheet_table(variants: Collection[SheetVariant]) -> pa.Table:
    """The variants as a table of :data:`PROMPT_SHEET_SCHEMA`."""
    rows = [{**asdict(v), "adapters": format_adapters(v.adapters)} for v in variants]
    return pa.Table.from_pylist(rows, schema=PROMPT_SHEET_SCHEMA)


def variants_from_table(table: pa.Table) -> list[SheetVariant]:
    """The variants of a table written from :func:`prompt_sheet_table` (e.g. read back from Parquet)."""
    missing = [name for name in PROMPT_SHEET_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"not a prompt-sheet table: no column(s) {', '.join(missing)}")
    rows = table.select(PROMPT_SHEET_SCHEMA.names).cast(PROMPT_SHEET_SCHEMA).to_pylist()
    return [
        SheetVariant(**{**row, "seeds": tuple(row["seeds"]), "adapters": parse_adapters(row.get("adapters"))})
        for row in rows
    ]


# --- reading the file -------------------------------------------------------------------------


def _read_grid(data: bytes, filename: str, sheet: str | None) -> list[list[Any]]:
    suffix = PurePosixPath(filename).suffix.lower()
    if suffix in (".xlsx", ".xlsm"):
        try:
            frame = pd.read_excel(
                io.BytesIO(data),
                sheet_name=sheet or 0,
                header=None,
                dtype=object,
                engine="openpyxl",
                na_filter=False,
            )
        except (zipfile.BadZipFile, InvalidFileException, KeyError, ValueError, OSError) as err:
            raise SheetFormatError(f"{filename} could not be read as an Excel workbook: {err}") from err
        # pandas keeps leading and inner empty rows, so list position + 1 is the row Excel shows.
        return frame.to_numpy().tolist()
    if suffix == ".csv":
        # The csv module rather than pandas: hand-edited files have rows of different lengths.
        text = _decode(data)
        return list(csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(text)))
    raise SheetFormatError(
        f"{filename}: a prompt sheet is an .xlsx workbook or a .csv file; save or export it as one of those"
    )


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")  # Excel's "CSV UTF-8" and Google Sheets, with or without a BOM
    except UnicodeDecodeError:
        # Excel's plain "CSV" on Windows writes the ANSI code page.
        return data.decode("cp1252", errors="replace")


def _delimiter(text: str) -> str:
    # Excel in locales with a decimal comma separates with ';'; the header line shows which.
    header = text.split("\n", 1)[0]
    return max((",", ";", "\t"), key=header.count)


def _cell_text(value: Any) -> str:
    """A cell as the text its writer meant, stripped."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        text = "TRUE" if value else "FALSE"
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))
    elif isinstance(value, dt.time):
        # Excel turns "16:9" typed in a cell into the time 16:09.
        text = f"{value.hour}:{value.minute:02d}"
    elif isinstance(value, dt.datetime | dt.date):
        text = value.isoformat()
    else:
        text = str(value)
    return text.translate({ord(c): None for c in _INVISIBLE}).strip()


def _map_headers(grid: list[list[str]]) -> tuple[dict[str, int], dict[str, str], list[RowProblem]]:
    """Column positions and headers as written, by field; warnings for ignored columns."""
    columns: dict[str, int] = {}
    headers: dict[str, str] = {}
    warnings = []
    width = max(len(row) for row in grid)
    for col in range(width):
        header = grid[0][col] if col < len(grid[0]) else ""
        letter = get_column_letter(col + 1)
        filled = sum(1 for row in grid[1:] if col < len(row) and row[col])
        if not header:
            if filled:
                warnings.append(
                    _sheet_problem(None, letter, f"has no header, so its {filled} value(s) are ignored")
                )
            continue
        name = _HEADER_ALIASES.get(re.sub(r"[^a-z0-9]", "", header.casefold()))
        if name is None:
            warnings.append(
                _sheet_problem(
                    None,
                    header,
                    f"is not a prompt-sheet column, so column {letter} is ignored; "
                    f"the columns are {', '.join(COLUMNS)}",
                )
            )
        elif name in columns:
            raise SheetFormatError(
                f"columns {headers[name]!r} ({get_column_letter(columns[name] + 1)}) and {header!r} "
                f"({letter}) are both {name}; keep one of them"
            )
        else:
            columns[name] = col
            headers[name] = header
    missing = [name for name in ("experiment_id", "variant_id") if name not in columns]
    if missing:
        raise SheetFormatError(
            f"row 1 has no {' and no '.join(missing)} column; found: {', '.join(h for h in grid[0] if h)}"
        )
    if "prompt" not in columns and "template" not in columns:
        raise SheetFormatError(
            "row 1 has neither a prompt nor a template column; a variant needs one of them"
        )
    return columns, headers, warnings


# --- validating a row -------------------------------------------------------------------------


def _parse_row(
    row: int,
    values: Mapping[str, str],
    headers: Mapping[str, str],
    rules: SheetRules,
    claimed: dict[tuple[str, str], int],
) -> SheetVariant | list[RowProblem]:
    problems: list[RowProblem] = []
    # The row's experiment and variant cells as written, so its problems are listed with its experiment.
    at = RowRef(
        source="sheet",
        row=row,
        experiment_id=values.get("experiment_id", "").strip() or None,
        variant_id=values.get("variant_id", "").strip() or None,
    )

    def header(name: str) -> str:
        return headers.get(name, name)

    def report(name: str, message: str) -> None:
        problems.append(RowProblem(at=at, field=header(name), message=message))

    def check(name: str, parse: Callable[..., Any], *args: Any) -> Any:
        # One cell's value, or _BAD after recording why it cannot be used, under the cell's own header.
        try:
            return parse(*args)
        except InvalidValue as err:
            report(name, str(err))
            return _BAD

    text = {name: " ".join(values.get(name, "").split()) or None for name in COLUMNS}

    experiment_id = check("experiment_id", _parse_id, values.get("experiment_id", ""))
    variant_id = check("variant_id", _parse_id, values.get("variant_id", ""))
    if experiment_id is not _BAD and variant_id is not _BAD:
        # A row claims its pair even when it is otherwise bad: fixing that row must not clash later.
        pair = (experiment_id.casefold(), variant_id.casefold())
        if pair in claimed:
            report(
                "variant_id",
                f"variant {variant_id!r} of experiment {experiment_id!r} is already on row {claimed[pair]}",
            )
        else:
            claimed[pair] = row

    template = check("template", _parse_template, text["template"])
    if text["prompt"] and text["template"]:
        report("template", f"give a {header('prompt')} or a {header('template')}, not both")
    elif not text["prompt"] and not text["template"]:
        report(
            "prompt" if "prompt" in headers else "template",
            f"is empty; write a prompt, or choose a template ({', '.join(STYLES)}) and a subject",
        )
    elif text["template"] and not text["subject"]:
        report("subject", "is required with a template: the product or scene it shows")

    image_uri = check("image_uri", _parse_image_uri, text["image_uri"])
    spec = check("model", _parse_model, text["model"], text["image_uri"] is not None, rules)
    if spec is not _BAD and image_uri is not _BAD:
        check("image_uri", _check_image_for_model, image_uri, spec)

    ratio = (
        check("aspect_ratio", _parse_ratio, values["aspect_ratio"]) if values.get("aspect_ratio") else None
    )
    size = check("size", parse_size, values["size"]) if values.get("size") else None
    if ratio and size:
        report("size", f"give an {header('aspect_ratio')} or a {header('size')}, not both")
    elif spec is not _BAD and ratio is not _BAD and size is not _BAD:
        size = (
            check("size", _size_of_model, size, spec)
            if size
            else check("aspect_ratio", _size_for_ratio, ratio, spec)
        )

    if values.get("seeds") and values.get("samples"):
        report("samples", f"give {header('seeds')} or {header('samples')}, not both")
        seeds = _BAD
    elif values.get("seeds"):
        seeds = check("seeds", _parse_seeds, values["seeds"])
    else:
        samples = check("samples", _parse_samples, values.get("samples", ""))
        if samples is not _BAD and experiment_id is not _BAD:
            seeds = tuple(sample_seed(experiment_id, sample) for sample in range(samples))

    profile = check(
        "postprocess_profile", _parse_profile, text["postprocess_profile"], rules.postprocess_profiles
    )
    recipe = text["recipe"]
    adapters = check("adapters", parse_adapters, text["adapters"])
    if spec is not _BAD and recipe and (why := recipe_problem(spec, recipe)):
        report("recipe", why)
    if spec is not _BAD and adapters is not _BAD and rules.adapters is not None:
        for why in adapter_problems(spec, adapters, rules.adapters):
            report("adapters", why)

    if problems:
        return problems
    width, height = size
    return SheetVariant(
        row=row,
        experiment_id=experiment_id,
        variant_id=variant_id,
        prompt=_compose_prompt(text["prompt"], template, text["subject"], text["style"]),
        template=template,
        subject=text["subject"],
        style=text["style"],
        negative_prompt=text["negative_prompt"],
        model=spec.family,
        model_variant=spec.variant,
        width=width,
        height=height,
        aspect_ratio=ratio,
        seeds=seeds,
        seeds_derived=not values.get("seeds"),
        image_uri=image_uri,
        postprocess_profile=profile,
        recipe=recipe,
        adapters=adapters,
        notes=text["notes"],
    )


def _parse_id(text: str) -> str:
    if not text:
        raise InvalidValue("is required")
    return storable_name(text, MAX_SHEET_ID_LENGTH)


def _parse_template(text: str | None) -> str | None:
    if text is None:
        return None
    name = text.casefold()
    if name not in STYLES:
        raise InvalidValue(f"{text!r} is not one of {', '.join(STYLES)}")
    return name


def _parse_model(text: str | None, has_image: bool, rules: SheetRules) -> ModelSpec:
    family = text.casefold() if text is not None else None
    if family is not None and family not in MODEL_FAMILIES:
        raise InvalidValue(
            f"{text!r} is not one of {', '.join(MODEL_FAMILIES)} (leave it empty for the default)"
        )
    return rules.models.spec_for(family, has_image)


def _parse_image_uri(text: str | None) -> str | None:
    if text is None:
        return None
    if text.startswith("s3://"):
        try:
            split_s3_uri(text)
        except ValueError:
            raise InvalidValue(f"{text!r} is not an s3://bucket/key address") from None
    elif "://" in text:
        raise InvalidValue(f"{text!r} is a web link; give s3://bucket/key or a path to the image file")
    return text


def _check_image_for_model(image_uri: str | None, spec: ModelSpec) -> str | None:
    if image_uri is None and spec.requires_image:
        raise InvalidValue(f"is required: {spec.family} makes video from an image")
    if image_uri is not None and not spec.accepts_image:
        raise InvalidValue(
            f"{spec.family} is text-to-video and takes no image; leave it empty, or choose a model "
            f"that takes one ({', '.join(f for f in MODEL_FAMILIES if get_model_spec(f).accepts_image)})"
        )
    return image_uri


def _sizes(spec: ModelSpec) -> str:
    return ", ".join(f"{w}x{h}" for w, h in spec.sizes)


def _size_of_model(size: tuple[int, int], spec: ModelSpec) -> tuple[int, int]:
    if size not in spec.sizes:
        raise InvalidValue(f"{size[0]}x{size[1]} is not one of {spec.name}'s sizes: {_sizes(spec)}")
    return size


def _parse_ratio(text: str) -> str:
    match = _RATIO.fullmatch(text)
    ratio = f"{int(match[1])}:{int(match[2])}" if match else text
    if ratio not in ASPECT_RATIOS:
        raise InvalidValue(f"{text!r} is not one of {', '.join(ASPECT_RATIOS)}")
    return ratio


def _size_for_ratio(ratio: str | None, spec: ModelSpec) -> tuple[int, int]:
    """The model's first size of the ratio's orientation (16:9 landscape, 9:16 portrait, 1:1 square)."""
    if ratio is None:
        return spec.default_size
    wanted = {"16:9": 1, "9:16": -1, "1:1": 0}[ratio]
    for width, height in spec.sizes:
        if (width > height) - (width < height) == wanted:
            return width, height
    shape = {1: "landscape", -1: "portrait", 0: "square"}[wanted]
    raise InvalidValue(f"{ratio}: {spec.name} has no {shape} size; its sizes are {_sizes(spec)}")


def _parse_seeds(text: str) -> tuple[int, ...]:
    seeds: list[int] = []
    for token in re.split(r"[,;\s]+", text.strip(",; ")):
        if not _WHOLE_NUMBER.fullmatch(token):
            raise InvalidValue(f"{token!r} in {text!r} is not a whole number; write seeds like 1, 2, 3")
        seed = seed_in_range(int(token.split(".")[0]))
        if seed in seeds:
            raise InvalidValue(f"seed {seed} is listed twice")
        seeds.append(seed)
    if len(seeds) > MAX_SAMPLES:
        raise InvalidValue(f"lists {len(seeds)} seeds; at most {MAX_SAMPLES} per variant")
    return tuple(seeds)


def _parse_samples(text: str) -> int:
    if not text:
        return 1
    if not _WHOLE_NUMBER.fullmatch(text):
        raise InvalidValue(f"{text!r} is not a whole number of samples (1 to {MAX_SAMPLES})")
    samples = int(text.split(".")[0])
    if not 1 <= samples <= MAX_SAMPLES:
        raise InvalidValue(f"{text!r} is outside 1 to {MAX_SAMPLES}")
    return samples


def _parse_profile(text: str | None, known: frozenset[str] | None) -> str | None:
    if text is None:
        return None
    try:
        storable_name(text, MAX_SHEET_ID_LENGTH)
    except InvalidValue:
        raise InvalidValue(f"{text!r} is not a profile name (letters, digits, '.', '_' and '-')") from None
    if known is not None and text not in known:
        raise InvalidValue(
            f"{text!r} is not one of the profiles: {', '.join(sorted(known)) or 'none defined'}"
        )
    return text


def _compose_prompt(prompt: str | None, template: str | None, subject: str | None, style: str | None) -> str:
    body = prompt or product_prompt(_TemplateInput(title=subject or "", style=template or ""))
    if style:
        body = f"{body} {style}" if body[-1] in ".!?" else f"{body}. {style}"
    return " ".join(body.split())
