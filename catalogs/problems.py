"""Which row a clip or a problem comes from, and why a row cannot become a clip: one type for both
sources, catalogs and prompt sheets.

Rows are numbered the way each source's users see them, and :class:`RowRef` says which:

* ``catalog``: the row's 0-based position in the Parquet file, as pandas and pyarrow count;
* ``sheet``: the row as a spreadsheet shows it (the header is row 1, the first variant row 2).

The manifest's ``row`` column carries the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RowSource = Literal["catalog", "sheet"]


@dataclass(frozen=True, kw_only=True)
class RowRef:
    """A row of a catalog (by position, with its SKU) or of a prompt sheet (as the sheet shows it, with
    its experiment and variant cells as written)."""

    source: RowSource
    row: int | None  # in the source's own numbering (see the module's docstring); None: no one row
    sku: str | None = None  # catalogs
    experiment_id: str | None = None  # sheets
    variant_id: str | None = None

    def __str__(self) -> str:
        if self.row is None:
            return ""
        if self.source == "sheet":
            return f"row {self.row}"
        return f"row {self.row}" + (f" (sku {self.sku!r})" if self.sku else "")


@dataclass(frozen=True, kw_only=True)
class RowProblem:
    """One reason a row (or, at a row of None, a whole sheet column) is not used as written."""

    at: RowRef
    field: str  # a catalog's column name; a sheet's column header as written in the sheet
    message: str

    def __str__(self) -> str:
        where = f"{self.at}, " if self.at.row is not None else ""
        kind = "column" if self.at.source == "sheet" else "field"
        return f"{where}{kind} {self.field!r}: {self.message}"


class InputError(ValueError):
    """A whole input cannot be used (a catalog that is no Parquet file or lacks a required column, a file
    that is no prompt sheet, a broken profiles file): the same input fails the same way again, so it is
    said once, in one line, and never retried."""


class InvalidValue(ValueError):
    """A cell's value cannot be used; the message is for the person who wrote it."""
