"""The record chain's contracts: the manifest's columns follow ManifestEntry, and light modules stay light."""

from __future__ import annotations

import dataclasses
import io
import re
import subprocess
import sys
from dataclasses import dataclass, field

import pyarrow.parquet as pq
import pytest

from tasks.manifest import manifest_table
from tasks.markdown import md_text
from tasks.records import ClipStatus, ManifestEntry, manifest_schema


def test_every_manifest_entry_field_is_a_manifest_column():
    names = [f.name for f in dataclasses.fields(ManifestEntry)]
    assert manifest_schema().names == names
    record = ManifestEntry(run_id="r", row=0, status=ClipStatus.FAILED).to_record()
    assert list(record) == names


def test_a_new_entry_field_reaches_the_parquet_manifest():
    @dataclass(frozen=True, kw_only=True)
    class WithCost(ManifestEntry):
        energy_kwh: float | None = None
        cost_breakdown: dict[str, float] = field(default_factory=dict)

    entries = [
        WithCost(run_id="r", row=1, sku="A", status=ClipStatus.PUBLISHED, energy_kwh=12.5),
        WithCost(run_id="r", row=0, sku="B", status=ClipStatus.FAILED, cost_breakdown={"gpu": 0.1}),
    ]
    buffer = io.BytesIO()
    pq.write_table(manifest_table(entries), buffer)
    table = pq.read_table(io.BytesIO(buffer.getvalue()))
    assert table.column("energy_kwh").to_pylist() == [None, 12.5]
    assert table.column("cost_breakdown").to_pylist() == ['{"gpu": 0.1}', "{}"]


def test_a_field_the_manifest_cannot_store_fails_loudly():
    @dataclass(frozen=True, kw_only=True)
    class WithTuple(ManifestEntry):
        shape: tuple[int, int] | None = None

    with pytest.raises(TypeError, match=r"WithTuple\.shape: the manifest cannot store"):
        manifest_table([WithTuple(run_id="r", row=0, status=ClipStatus.FAILED, shape=(1, 2))])


def test_records_are_keyword_only():
    with pytest.raises(TypeError):
        ManifestEntry("r", 0, None, ClipStatus.FAILED)  # type: ignore[misc]


def test_light_modules_import_no_torch():
    code = (
        "import sys; import catalogs, catalogs.sheets, tasks.records, tasks.planning, flows.cli; "
        "import tasks.cost, tasks.run_report, tasks.watchdog; "
        "import flows.intake; "
        "heavy = sorted(m for m in ('torch', 'diffusers', 'ray') if m in sys.modules); "
        "print(','.join(heavy)); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"imported: {result.stdout.strip()} {result.stderr[-2000:]}"


def test_text_from_rows_renders_as_written_in_a_markdown_table():
    hostile = "EVIL\n# Heading [link](http://evil.example) | www.evil.example `x` *b* <img src=x>"
    text = md_text(hostile)
    assert "\n" not in text and "# Heading" in text  # one line: a '#' mid-line is no heading
    assert not re.search(r"(?<!\\)[\[\]`*<>|]", text), text  # every markup character escaped
    assert "http://" not in text and "www.evil" not in text  # no bare link either
    # Escapes only: the text reads the same once rendered.
    assert text.replace("\\", "") == " ".join(hostile.split())
