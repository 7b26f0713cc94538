"""Cost per clip and the run summary, as pure functions: GPU types, prices, the table per model and recipe,
and the markdown of the run-summary artifact (new clips, cost, failures by reason)."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime

import pytest

from infra.settings import DEFAULT_GPU_PRICE_PER_HOUR, Settings
from tasks.cost import (
    CPU,
    cost_markdown,
    cost_sentence,
    cost_text,
    figure,
    gpu_cost_usd,
    gpu_type_key,
    priced,
    run_costs,
)
from tasks.manifest import ManifestLocation
from tasks.records import ClipStatus, ManifestEntry
from tasks.run_report import FAILURES_LISTED, Links, failure_groups, reason_kind, run_summary_markdown

PRICES = {"H100": 3.0, "h200": 4.0, "cpu": 0.0}


@pytest.mark.parametrize(
    ("device_name", "key"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA L4", "L4"),
        ("Tesla T4", "T4"),
        ("NVIDIA GeForce RTX 4090", "RTX4090"),
        ("AMD Instinct MI300X", "MI300X"),
        ("cpu", CPU),
    ],
)
def test_a_device_name_is_normalised_to_its_price_table_key(device_name, key):
    assert gpu_type_key(device_name) == key


def test_every_default_price_is_for_a_normalised_type():
    assert all(gpu_type_key(name) == name for name in DEFAULT_GPU_PRICE_PER_HOUR)
    assert Settings().gpu_price_per_hour == DEFAULT_GPU_PRICE_PER_HOUR
    assert DEFAULT_GPU_PRICE_PER_HOUR[CPU] == 0


def test_the_price_table_is_a_json_setting(monkeypatch):
    monkeypatch.setenv("WANFACTORY_GPU_PRICE_PER_HOUR", '{"H100": 2.5, "cpu": 0}')
    monkeypatch.setenv("WANFACTORY_ESTIMATE_GPU_TYPE", "H200")
    settings = Settings()
    assert settings.gpu_price_per_hour == {"H100": 2.5, "cpu": 0.0}
    assert settings.estimate_gpu_type == "H200"
    monkeypatch.setenv("WANFACTORY_GPU_PRICE_PER_HOUR", '{"H100": -1}')
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        Settings()


def test_gpu_time_is_priced_by_type_and_an_unknown_type_costs_none_with_one_warning(caplog):
    assert gpu_cost_usd(3600, "H100", PRICES) == 3.0
    assert gpu_cost_usd(1800, "H200", PRICES) == 2.0  # keys match whatever their case
    assert gpu_cost_usd(90, "cpu", PRICES) == 0.0
    assert gpu_cost_usd(None, "H100", PRICES) is None and gpu_cost_usd(10, None, PRICES) is None
    with caplog.at_level(logging.WARNING, logger="tasks.cost"):
        assert gpu_cost_usd(60, "TEST-GPU-X1", PRICES) is None
        assert gpu_cost_usd(120, "TEST-GPU-X1", PRICES) is None
    warnings = [r.getMessage() for r in caplog.records if "TEST-GPU-X1" in r.getMessage()]
    assert len(warnings) == 1 and "WANFACTORY_GPU_PRICE_PER_HOUR" in warnings[0], warnings


def _entry(row: int, status: ClipStatus, **details) -> ManifestEntry:
    return ManifestEntry(run_id="r", row=row, status=status, **{"sku": f"SKU-{row}", **details})


def _run() -> list[ManifestEntry]:
    a14b = {"model": "t2v-a14b", "recipe": "standard", "gpu_type": "H100"}
    fast = {"model": "t2v-a14b", "recipe": "lightx2v-4step", "gpu_type": "H100"}
    entries = [
        _entry(0, ClipStatus.PUBLISHED, gpu_seconds=1800.0, **a14b),
        _entry(1, ClipStatus.PUBLISHED, gpu_seconds=1800.0, **a14b),
        # Failed after generation: its GPU time counts, and it is no published clip.
        _entry(2, ClipStatus.FAILED, stage="upload", reason="S3Error: gone", gpu_seconds=3600.0, **a14b),
        _entry(3, ClipStatus.PUBLISHED, gpu_seconds=36.0, **fast),
        _entry(4, ClipStatus.SKIPPED, model="t2v-a14b", recipe="standard"),
        _entry(5, ClipStatus.FAILED, stage="plan", reason="row 5 (sku 'SKU-5'), field 'size': 1x1"),
        _entry(6, ClipStatus.PLANNED, model="ti2v-5b", recipe="standard", estimated_gpu_seconds=7200.0),
    ]
    return [priced(entry, PRICES) for entry in entries]


def test_the_run_cost_per_model_and_recipe_and_in_total():
    costs = run_costs(_run(), PRICES, "H100")
    lines = {(line.model, line.recipe): line for line in costs.lines}
    assert list(lines) == [("t2v-a14b", "standard"), ("t2v-a14b", "lightx2v-4step"), ("ti2v-5b", "standard")]
    standard = lines["t2v-a14b", "standard"]
    assert (standard.published, standard.gpu_hours, standard.cost_usd) == (2, 2.0, 6.0)
    assert standard.cost_per_published_clip == 3.0 and standard.clips_per_gpu_hour == 1.0
    fast = lines["t2v-a14b", "lightx2v-4step"]
    assert fast.cost_usd == pytest.approx(0.03) and fast.clips_per_gpu_hour == pytest.approx(100.0)
    # A planned clip: its estimated seconds priced as the estimate's GPU type, by the same function.
    planned = lines["ti2v-5b", "standard"]
    assert (planned.planned, planned.estimated_gpu_hours, planned.estimated_cost_usd) == (1, 2.0, 6.0)
    assert planned.published == 0 and planned.cost_per_published_clip is None
    total = costs.total
    assert (total.published, total.gpu_hours, total.planned) == (3, 2.01, 1)
    assert total.cost_usd == pytest.approx(6.03) and total.cost_per_published_clip == pytest.approx(2.01)
    assert costs.gpu_types == ["H100"]


def test_a_clip_on_an_unpriced_gpu_makes_its_group_cost_unknown_not_zero():
    entries = [
        priced(_entry(0, ClipStatus.PUBLISHED, model="m", recipe="r", gpu_seconds=60.0, gpu_type=t), PRICES)
        for t in ("H100", "TEST-GPU-X2")
    ]
    costs = run_costs(entries, PRICES, "H100")
    assert costs.total.cost_usd is None and costs.total.cost_per_published_clip is None
    assert "n/a for 2 published clips" in cost_sentence(costs)


def test_the_cost_table_and_line_show_every_figure():
    costs = run_costs(_run(), PRICES, "H100")
    table = cost_markdown(costs)
    assert table[0] == (
        "| model | recipe | published | GPU-hours | cost | cost per published clip | clips per GPU-hour |"
    )
    assert "| t2v-a14b | standard | 2 | 2 | $6.00 | $3.00 | 1 |" in table
    assert "| t2v-a14b | lightx2v-4step | 1 | 0.01 | $0.03 | $0.03 | 100.00 |" in table
    assert "| **all** |  | 3 | 2.01 | $6.03 | $2.01 | 1.49 |" in table
    assert "| ti2v-5b | standard | 1 | 2 | $6.00 |" in table  # the estimate's table
    assert cost_sentence(costs) == (
        "$6.03 for 3 published clips ($2.01 a clip), 2.01 GPU-hours on H100, 1.49 clips per GPU-hour; "
        "1 planned clips estimated at ~2 GPU-hours, ~$6.00 on H100"
    )
    assert cost_text(costs)[0] == (
        "t2v-a14b standard: 2 published, 2 GPU-h, $6.00 ($3.00 a clip, 1 clips/GPU-h)"
    )


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (None, "-"),
        (0.0, "0"),
        (3.33e-05, "0.0000333"),
        (0.000272, "0.000272"),
        (0.111, "0.111"),
        (0.01, "0.01"),
    ]
    + [(2.0, "2"), (1.4925, "1.49"), (9.996, "10"), (7346.94, "7,346.94")],
)
def test_figures_read_as_people_write_them(value, shown):
    assert figure(value) == shown


def test_a_dry_run_shows_only_its_estimate():
    planned = [
        _entry(0, ClipStatus.PLANNED, model="t2v-a14b", recipe="standard", estimated_gpu_seconds=212.0)
    ]
    costs = run_costs(planned, PRICES, "H200")
    assert cost_sentence(costs) == "1 planned clips estimated at ~0.0589 GPU-hours, ~$0.24 on H200"
    assert cost_text(costs) == ["t2v-a14b standard: 1 planned ~0.0589 GPU-h, ~$0.24"]


def _links() -> Links:
    return Links(
        presigned=lambda key: f"http://s3.test/bucket/{key}?X-Amz-Expires=86400",
        uri=lambda key: f"s3://bucket/{key}",
        expiry_hours=24,
        expires_at=datetime(2026, 12, 8, 2, 5, tzinfo=UTC),
    )


def _published(row: int, sku: str) -> ManifestEntry:
    return _entry(
        row,
        ClipStatus.PUBLISHED,
        sku=sku,
        model="t2v-a14b",
        recipe="standard",
        gpu_seconds=200.0,
        gpu_type="H100",
        cost_usd=gpu_cost_usd(200.0, "H100", PRICES),
        clip_key=f"clips/{sku}/c{row}.mp4",
        preview_key=f"clips/{sku}/c{row}.webp",
    )


HOSTILE = "EVIL\n# Heading [link](http://evil.example) | x"


def _failures() -> list[ManifestEntry]:
    def plan(row: int, field: str, message: str, sku: str | None = None) -> ManifestEntry:
        sku = sku or f"SKU-{row}"
        reason = f"row {row} (sku {sku!r}), field {field!r}: {message}"
        return _entry(row, ClipStatus.FAILED, sku=sku, stage="plan", reason=reason)

    return [
        plan(10, "size", "1920x1080 is not one of t2v-a14b's sizes"),
        plan(11, "model", "unknown model 'wan9-xl'"),
        plan(12, "size", "64x64 is not one of t2v-a14b's sizes; field 'steps': 0 is below 1", sku=HOSTILE),
        plan(13, "size", "7x7 is not one of t2v-a14b's sizes"),
        _entry(14, ClipStatus.FAILED, stage="generate", reason="RuntimeError: CUDA error: out of memory"),
        _entry(
            15, ClipStatus.QUARANTINED, stage="content_filter", reason="blocked by the frame classifier: x"
        ),
    ]


def test_failures_are_grouped_by_stage_and_kind_of_reason_largest_first():
    groups = failure_groups(_failures())
    assert [(g.status, g.stage, g.reason, len(g.entries)) for g in groups] == [
        ("failed", "plan", "field 'size'", 3),
        ("failed", "generate", "RuntimeError", 1),
        ("failed", "plan", "field 'model'", 1),
        ("quarantined", "content_filter", "blocked by the frame classifier", 1),
    ]
    assert [e.row for e in groups[0].entries] == [10, 12, 13]  # the example is the first row
    # The row a reason names is left out of its kind, whatever the SKU holds.
    assert reason_kind(_failures()[2]) == "field 'size'"


def test_the_nightly_summary_shows_the_new_clips_the_cost_and_the_failures_by_reason():
    entries = [_published(0, "MUG-01"), _published(1, "TOTE-02"), *_failures()]
    costs = run_costs(entries, PRICES, "H100")
    location = ManifestLocation("runs/r/manifest.parquet", "runs/r/manifest.json", {})
    markdown = run_summary_markdown("r", entries, location, costs, _links(), "runs/r/contact-sheet.jpg")
    lines = markdown.splitlines()
    assert lines[0] == "# Run r"
    assert f"Cost: {cost_sentence(costs)}" in lines
    assert "Cost: $0.33 for 2 published clips ($0.17 a clip), 0.111 GPU-hours on H100" in markdown
    assert "Links expire after 24 h, at 2026-12-08 02:05 UTC." in lines
    assert "Manifest: `s3://bucket/runs/r/manifest.parquet` and `s3://bucket/runs/r/manifest.json`" in lines
    # The contact sheet, then each new clip's animated preview and its MP4, all presigned.
    sheet = "![contact sheet of the new clips](http://s3.test/bucket/runs/r/contact-sheet.jpg?X-Amz-Expires=86400)"
    assert sheet in lines
    link = "http://s3.test/bucket/clips/MUG-01/c0.{}?X-Amz-Expires=86400"
    assert (
        f"| MUG-01 | t2v-a14b | standard | ![MUG-01]({link.format('webp')}) | [mp4]({link.format('mp4')}) |"
        in lines
    )
    assert lines.index(sheet) < lines.index("## Cost") < lines.index("## Failures by reason")
    assert "| **all** |  | 2 | 0.111 | $0.33 | $0.17 | 18.00 |" in lines
    # Failures by reason: the kind, the count, the first row as the example.
    assert (
        "| failed | plan | field 'size' | 3 | row 10 SKU-10: field 'size': 1920x1080 is not one of "
        "t2v-a14b's sizes |"
    ) in lines
    # Text from the catalog renders as text: no heading, no link, no cell split by a stray '|'.
    assert not any(line.startswith("# Heading") for line in lines)
    assert "[link](http" not in markdown and "\\[link\\]" in markdown
    # Every table row has its table's cells: 7 in the cost table, 5 in the others.
    for line in lines:
        if line.startswith("| "):
            assert len(re.findall(r"(?<!\\)\|", line)) - 1 in (5, 7), line


def test_a_run_summary_without_new_clips_or_failures_has_neither_section():
    entries = [_entry(0, ClipStatus.SKIPPED, model="t2v-a14b", recipe="standard")]
    costs = run_costs(entries, PRICES, "H100")
    location = ManifestLocation("runs/r/manifest.parquet", "runs/r/manifest.json", {})
    markdown = run_summary_markdown("r", entries, location, costs, _links())
    assert "## New clips" not in markdown and "## Failures by reason" not in markdown
    assert "Cost: $0.00 for 0 published clips, 0 GPU-hours, - clips per GPU-hour" in markdown


def test_the_failed_rows_listed_one_by_one_are_capped():
    entries = [
        _entry(row, ClipStatus.FAILED, stage="generate", reason="RuntimeError: boom")
        for row in range(FAILURES_LISTED + 5)
    ]
    location = ManifestLocation("runs/r/manifest.parquet", "runs/r/manifest.json", {})
    markdown = run_summary_markdown("r", entries, location, run_costs(entries, PRICES, "H100"), _links())
    section = markdown.split("## Failed and quarantined", 1)[1].splitlines()
    assert (
        len([line for line in section if line.startswith("| ") and "---" not in line]) == 1 + FAILURES_LISTED
    )
    assert (
        f"The first {FAILURES_LISTED} of {FAILURES_LISTED + 5}; the clip-summary table has them all."
        in section
    )
    assert f"| failed | generate | RuntimeError | {FAILURES_LISTED + 5} |" in markdown
