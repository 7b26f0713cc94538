"""The A/B flow end to end: an .xlsx prompt sheet with good and bad rows to clips grouped by experiment."""

from __future__ import annotations

import io
import json
import re

import pyarrow.parquet as pq
import pytest
from openpyxl import Workbook
from PIL import Image

from flows.ab import ab_batch
from tasks.records import ClipStatus
from tests.test_nightly_flow import flow_run_artifacts

pytestmark = pytest.mark.usefixtures("tiny_models", "prefect_server", "ray_cluster")

HEADER = [
    "Experiment ID",
    "Variant ID",
    "Prompt",
    "Template",
    "Subject",
    "Model",
    "Seeds",
    "Aspect ratio",
    "Notes",
]
ROWS = [
    ["mug-launch", "A-studio", "", "studio", "Speckled stoneware mug", "", "1, 2", "16:9", "control"],
    [
        "mug-launch",
        "B-morning",
        "Morning light on a stoneware mug, steam rising",
        "",
        "",
        "",
        "1, 2",
        "9:16",
        "",
    ],
    ["mug-launch", "C-typo", "A mug", "", "", "wan-9", "1", "", "unknown model"],
    ["mug-launch", "D-blocked", "A mug beside a dismembered doll", "", "", "", "1", "", "policy"],
]


def xlsx(rows: list[list[str]]) -> bytes:
    book = Workbook()
    sheet = book.active
    sheet.append(HEADER)
    for row in rows:
        sheet.append(row)
    buffer = io.BytesIO()
    book.save(buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def ab_run(store):
    store.put_bytes("sheets/mug-launch.xlsx", xlsx(ROWS), "application/octet-stream")
    return ab_batch(sheet_uri=store.uri("sheets/mug-launch.xlsx"))


def test_good_rows_publish_grouped_by_experiment_and_variant(ab_run, store):
    published = [e for e in ab_run.entries if e.status == ClipStatus.PUBLISHED]
    assert sorted((e.variant_id, e.sample, e.seed) for e in published) == [
        ("A-studio", 0, 1),
        ("A-studio", 1, 2),
        ("B-morning", 0, 1),
        ("B-morning", 1, 2),
    ]
    for entry in published:
        assert entry.clip_key.startswith(f"experiments/mug-launch/{entry.variant_id}/"), entry.clip_key
        assert store.exists(entry.clip_key) and store.exists(entry.preview_key)
        # A/B samples have their own label fields, no made-up SKU.
        assert entry.sku is None and entry.experiment_id == "mug-launch" and entry.profile == "standard"
    sizes = {e.variant_id: (e.width, e.height) for e in published}
    assert sizes == {"A-studio": (96, 64), "B-morning": (64, 96)}  # 16:9 and 9:16 on the tiny models


def test_bad_rows_name_the_spreadsheet_row_and_column(ab_run):
    by_variant = {e.variant_id or e.reason: e for e in ab_run.entries if e.status != ClipStatus.PUBLISHED}
    (typo,) = [e for e in ab_run.entries if e.status == ClipStatus.FAILED]
    assert typo.row == 4 and typo.stage == "validate" and typo.variant_id == "C-typo"
    assert typo.reason.startswith("row 4, column 'Model': 'wan-9'"), typo.reason
    blocked = by_variant["D-blocked"]
    assert blocked.status == ClipStatus.QUARANTINED and blocked.stage == "prompt_policy" and blocked.row == 5


def test_each_experiment_gets_its_sheet_manifest_and_contact_sheet(ab_run, store):
    prefix = f"experiments/mug-launch/runs/{ab_run.run_id}"
    sheet = pq.read_table(io.BytesIO(store.get_bytes(f"{prefix}/sheet.parquet")))
    assert sorted(sheet.column("variant_id").to_pylist()) == ["A-studio", "B-morning", "D-blocked"]
    manifest = json.loads(store.get_bytes(f"{prefix}/manifest.json"))
    assert manifest["counts"] == {"failed": 1, "published": 4, "quarantined": 1}  # the bad row is listed too
    assert manifest["source"] == store.uri("sheets/mug-launch.xlsx")
    with Image.open(io.BytesIO(store.get_bytes(f"{prefix}/contact-sheet.jpg"))) as contact:
        assert contact.format == "JPEG" and contact.width >= 4 * 100 and contact.height > 300


def test_the_run_is_named_and_tagged_for_the_experiment_with_its_artifacts(ab_run):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(ab_run.flow_run_id)
    assert run.name == "ab-mug-launch" and {"ab", "experiment:mug-launch"} <= set(run.tags)
    artifacts = flow_run_artifacts(ab_run.flow_run_id)
    assert {"clip-summary", "run-summary", "clip-progress", "contact-sheet-mug-launch"} <= set(artifacts)
    assert "![contact sheet](http" in artifacts["contact-sheet-mug-launch"].data
    # Its summary: the cost of its samples and its failures by reason; the new clips are on the contact sheet.
    summary = artifacts["run-summary"].data
    assert "\nCost: $0.00 for 4 published clips ($0.00 a clip), " in summary and "## New clips" not in summary
    assert "| t2v-a14b-tiny | standard | 4 | " in summary, summary
    typo = r"^\| failed \| validate \| column 'Model' \| 1 \| row 4 mug-launch/C-typo: column 'Model': "
    blocked = r"^\| quarantined \| prompt_policy \| .+ \| 1 \| row 5 mug-launch/D-blocked: "
    assert re.search(typo, summary, re.MULTILINE) and re.search(blocked, summary, re.MULTILINE), summary


def test_a_rerun_of_the_same_sheet_skips_what_is_published(ab_run, store):
    again = ab_batch(sheet_uri=store.uri("sheets/mug-launch.xlsx"))
    statuses = sorted(str(e.status) for e in again.entries)
    assert statuses == ["failed", "quarantined"] + ["skipped"] * 4
    assert {e.clip_id for e in again.entries if e.status == ClipStatus.SKIPPED} == {
        e.clip_id for e in ab_run.entries if e.status == ClipStatus.PUBLISHED
    }
