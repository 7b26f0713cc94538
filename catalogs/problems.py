"""Why a row of a catalog or a prompt sheet cannot become a clip: one problem type for both sources.

Rows are numbered the way each source's users see them, and :class:`RowProblem` says which:

* ``catalog``: the row's 0-based position in the Parquet file, as pandas and pyarrow count;
* ``sheet``: the row as a spreadsheet shows it (the header is row 1, the first variant row 2).

The manifest's ``row`` column and :class:`tasks.records.ClipSpec` carry the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RowSource = Literal["catalog", "sheet"]


@dataclass(frozen=True, kw_only=True)
class RowProblem:
    """One reason a row (or, with ``row`` None, a whole sheet column) is not used as written."""

    source: RowSource
    row: int | None  # in the source's own numbering (see the module's docstring)
    field: str  # a catalog's column name; a sheet's column header as written in the sheet
    message: str
    sku: str | None = None  # catalogs
    # Sheets: the row's experiment and variant cells as written, so a failure is listed with its experiment.
    experiment_id: str | None = None
    variant_id: str | None = None

    def __str__(self) -> str:
        if self.source == "sheet":
            where = f"row {self.row}, " if self.row is not None else ""
            return f"{where}column {self.field!r}: {self.message}"
        sku = f" (sku {self.sku!r})" if self.sku else ""
        return f"row {self.row}{sku}, field {self.field!r}: {self.message}"


class InvalidValue(ValueError):
    """A cell's value cannot be used; the message is for the person who wrote it."""
