"""A person opens a nightly run in the Prefect UI and sees its artifacts: rendered in headless Chromium.

The flow runs for real (tiny models, Ray, the S3 server) against the session's Prefect test server;
the UI is Prefect's own, served next to it (``tests.browser`` says why the harness cannot serve it).
Assertions read the rendered DOM, with hidden elements left out, and follow the links a person would
click: the run page's Artifacts tab -> an artifact key -> the artifact. Screenshots of the pages are
kept under ``$WANFACTORY_TEST_ARTIFACTS`` (default ``tests/artifacts/``).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from flows.nightly import RunResult, nightly_catalog
from infra.objectstore import ObjectStore
from tests.browser import Page, PrefectUI, PrefectUIServer, parse_page, render, serve_prefect_ui
from tests.catalog_upload import upload_catalog

pytestmark = [
    pytest.mark.skipif(
        shutil.which("chromium") is None,
        reason="chromium is not installed (infra/setup.sh installs it): no browser to render the Prefect UI",
    ),
    pytest.mark.usefixtures("tiny_models", "prefect_server", "ray_cluster"),
]

# SKUs no other test uses, so the rows of the table can only come from this test's run.
SKUS = ["UI-MUG-01", "UI-TOTE-02"]
WINDOW = (1400, 1000)


@dataclass(frozen=True)
class UIRun:
    result: RunResult
    run_names: set[str]  # nightly-<UTC date>: the date when the run started or ended (midnight may pass)


@pytest.fixture(scope="module")
def artifacts_dir() -> Path:
    folder = Path(os.environ.get("WANFACTORY_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def prefect_ui_server(prefect_server, tmp_path_factory) -> Iterator[PrefectUIServer]:
    from prefect.settings import PREFECT_API_URL

    with serve_prefect_ui(PREFECT_API_URL.value(), tmp_path_factory.mktemp("prefect-ui")) as server:
        yield server


@pytest.fixture(scope="module")
def prefect_ui(prefect_ui_server: PrefectUIServer) -> PrefectUI:
    return prefect_ui_server.ready()


@pytest.fixture(scope="module")
def ui_run(store: ObjectStore, prefect_ui_server: PrefectUIServer) -> UIRun:
    """The nightly flow on a two-row catalog; the UI server (a fixture of this) boots meanwhile."""
    updated_at = datetime(2026, 11, 21, tzinfo=UTC)
    rows = [
        {"sku": SKUS[0], "title": "Stoneware mug", "description": "A blue mug.", "style": "studio"},
        {"sku": SKUS[1], "title": "Canvas tote", "description": "An olive tote bag.", "style": "lifestyle"},
    ]
    catalog_uri = upload_catalog(store, "catalogs/ui/catalog.parquet", rows, updated_at)
    started = datetime.now(UTC)
    # force: both clips are generated and published whatever else this session published before.
    result = nightly_catalog(catalog_uri=catalog_uri, force=True)
    ended = datetime.now(UTC)
    return UIRun(result, {f"nightly-{day:%Y-%m-%d}" for day in (started, ended)})


def open_page(url: str, screenshot: Path | None = None, window: tuple[int, int] = WINDOW) -> Page:
    dom = render(url, screenshot=screenshot, window=window)
    if screenshot is not None:
        assert_not_blank(screenshot, window)
    return parse_page(dom)


def assert_not_blank(png: Path, window: tuple[int, int] = WINDOW) -> None:
    """A real page, not an empty or single-colour frame: a blank 1400x1000 PNG is ~6 KB and flat."""
    assert png.stat().st_size > 20_000, (png, png.stat().st_size)
    with Image.open(png) as image:
        assert image.size == window
        rgb = image.convert("RGB")
        assert ImageStat.Stat(rgb.convert("L")).stddev[0] > 5, png
        assert len(rgb.getcolors(maxcolors=window[0] * window[1]) or []) > 100, png


def follow_to_artifact(
    ui: PrefectUI, run_page: Page, key: str, screenshot: Path, window: tuple[int, int] = WINDOW
) -> Page:
    """Click the run's card for ``key``, then the newest artifact on the key's page, as a person would."""
    (card,) = run_page.links_to(f"{ui.base_path}/artifacts/key/{key}")
    key_page = open_page(ui.url(card.href))
    # The key's page lists every artifact with that key, newest first: this run's is the newest.
    artifacts = key_page.links_to(f"{ui.base_path}/artifacts/artifact/")
    assert artifacts, f"no artifact link on the page of key {key}: {key_page.text[:2000]}"
    return open_page(ui.url(artifacts[0].href), screenshot, window)


@pytest.fixture(scope="module")
def run_page(ui_run: UIRun, prefect_ui: PrefectUI, artifacts_dir: Path) -> Page:
    """The flow run's page on its Artifacts tab, as a person opens it from the run's link."""
    url = prefect_ui.flow_run_url(ui_run.result.flow_run_id, tab="Artifacts")
    return open_page(url, artifacts_dir / "prefect-ui-flow-run.png")


def test_the_run_page_shows_the_run_and_its_three_artifacts(
    ui_run: UIRun, run_page: Page, prefect_ui: PrefectUI
):
    result = ui_run.result
    title = re.fullmatch(r"Flow Run: (nightly-\d{4}-\d{2}-\d{2}) • Prefect Server", run_page.title)
    assert title and title.group(1) in ui_run.run_names, run_page.title
    run_name = title.group(1)
    # The header: breadcrumb "Runs > <name>", then (after any tags) the run's state.
    assert re.search(rf"\bRuns {run_name}\b.{{0,200}}\bCompleted\b", run_page.text), run_page.text[:2000]
    assert "nightly-catalog" in run_page.text
    # Each artifact is a card on the tab: its type, its key and its description, which names this run
    # (the table's is cut short on the card, so only its start counts; its page shows all of it).
    expected = {
        "clip-progress": ("progress", f"run {result.run_id}: {len(SKUS)}/{len(SKUS)} clips"),
        "clip-summary": ("table", "Every clip of run"),
        "run-summary": ("markdown", f"Summary of {result.run_id}"),
    }
    for key, (kind, description) in expected.items():
        cards = [link.text for link in run_page.links_to(f"{prefect_ui.base_path}/artifacts/key/{key}")]
        assert len(cards) == 1, (key, cards, run_page.text[:2000])
        assert cards[0].lower().startswith(f"{kind} {key} "), cards[0]
        assert description in cards[0], cards[0]
    assert set(expected) <= set(run_page.headings), run_page.headings


def test_the_clip_summary_table_lists_every_clip_as_published(
    ui_run: UIRun, run_page: Page, prefect_ui: PrefectUI, artifacts_dir: Path
):
    page = follow_to_artifact(
        prefect_ui, run_page, "clip-summary", artifacts_dir / "prefect-ui-clip-summary.png"
    )
    assert page.title == "Artifact: clip-summary • Prefect Server", page.title
    assert f"Every clip of run {ui_run.result.run_id}; links expire after" in page.text, page.text[:2000]
    # The artifact's sidebar links back to this flow run: it is this run's table, not an older one.
    assert f"{prefect_ui.base_path}/runs/flow-run/{ui_run.result.flow_run_id}" in {
        link.href for link in page.links
    }
    (table,) = page.tables
    header, *rows = table
    assert header == ["row", "sku", "status", "model", "seconds", "clip", "reason"], header
    by_sku = {row[header.index("sku")]: dict(zip(header, row, strict=True)) for row in rows}
    assert sorted(by_sku) == sorted(SKUS), rows
    for sku, row in by_sku.items():
        assert row["status"] == "published", row
        assert row["model"] == "t2v-a14b-tiny", row
        assert float(row["seconds"]) > 0, row
        # A presigned link to the published MP4 (a person copies it from the cell).
        assert f"/clips/{sku}/" in row["clip"] and ".mp4?" in row["clip"] and "X-Amz-" in row["clip"], row


def test_the_nightly_summary_shows_the_run_its_cost_new_clips_and_manifest(
    ui_run: UIRun, run_page: Page, prefect_ui: PrefectUI, store: ObjectStore, artifacts_dir: Path
):
    result = ui_run.result
    # Tall enough for the whole summary in the screenshot: counts, cost line, contact sheet, previews.
    page = follow_to_artifact(
        prefect_ui, run_page, "run-summary", artifacts_dir / "prefect-ui-run-summary.png", (1400, 2000)
    )
    assert page.title == "Artifact: run-summary • Prefect Server", page.title
    assert f"{prefect_ui.base_path}/runs/flow-run/{result.flow_run_id}" in {link.href for link in page.links}
    # The markdown is rendered (a heading, bold counts), not shown as source: its raw text is hidden.
    assert f"Run {result.run_id}" in page.headings, page.headings
    assert re.search(rf"published\s*:\s*{len(SKUS)}", page.text), page.text[:2000]
    assert "# Run" not in page.text and "**published**" not in page.text
    assert f"Manifest: {store.uri(result.manifest.parquet_key)}" in page.text, page.text[:2000]
    cost_line = rf"Cost: \$0\.00 for {len(SKUS)} published clips .* GPU-hours on cpu"
    assert re.search(cost_line, page.text), page.text[:3000]
    assert "Links expire after 24 h, at " in page.text
    # The new clips: the contact sheet, then each clip's animated preview, as images from presigned links.
    assert "New clips" in page.headings and "Cost" in page.headings, page.headings
    by_alt = {image.alt: image.src for image in page.images}
    sheet = by_alt["contact sheet of the new clips"]
    assert f"/runs/{result.run_id}/contact-sheet.jpg?" in sheet and "X-Amz-Signature=" in sheet, sheet
    for sku in SKUS:
        assert f"/clips/{sku}/" in by_alt[sku] and ".webp?" in by_alt[sku], by_alt
