"""Nightly runs are incremental (only what changed is made) and resumable (a run killed halfway loses
nothing and duplicates nothing), on the real services with a catalog that changes between runs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from flows.nightly import nightly_catalog
from tasks import units
from tasks.records import ClipStatus
from tests.catalog_upload import upload_catalog

pytestmark = pytest.mark.usefixtures("tiny_models", "prefect_server", "ray_cluster")

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 11, 21, tzinfo=UTC)


def product(sku: str, **fields: object) -> dict:
    return {
        "sku": sku,
        "title": f"Product {sku}",
        "description": "A plain product.",
        "style": "studio",
    } | fields


def statuses(result) -> dict[str, str]:
    return {entry.sku: str(entry.status) for entry in result.entries}


def test_only_what_changed_is_regenerated_and_the_manifest_says_why(store):
    rows = [product("INC-A"), product("INC-B"), product("INC-C"), product("INC-D", style="outdoor")]
    first = nightly_catalog(catalog_uri=upload_catalog(store, "catalogs/inc/catalog.parquet", rows, NOW))
    assert set(statuses(first).values()) == {"published"}
    ids = {e.sku: e.clip_id for e in first.entries}

    changed = [
        product("INC-A"),  # unchanged
        product("INC-B", description="A plain product, now in red."),  # the prompt after templating
        product("INC-C", seed=7),  # the seed
        product("INC-D", style="outdoor", postprocess_profile="social-30"),  # the post-production profile
        product("INC-E"),  # new
    ]
    second = nightly_catalog(catalog_uri=upload_catalog(store, "catalogs/inc/catalog.parquet", changed, NOW))
    assert statuses(second) == {
        "INC-A": "skipped",
        "INC-B": "published",
        "INC-C": "published",
        "INC-D": "published",
        "INC-E": "published",
    }
    (skipped,) = [e for e in second.entries if e.status == ClipStatus.SKIPPED]
    assert skipped.clip_id == ids["INC-A"] and skipped.reason == "already published with the same inputs"
    assert all(e.clip_id != ids[e.sku] for e in second.entries if e.sku in ids and e.sku != "INC-A")
    # A subset on demand: only INC-A is regenerated, the rest skipped.
    forced = nightly_catalog(catalog_uri=store.uri("catalogs/inc/catalog.parquet"), force_skus=["INC-A"])
    assert statuses(forced) == dict.fromkeys(("INC-B", "INC-C", "INC-D", "INC-E"), "skipped") | {
        "INC-A": "published"
    }


def test_a_run_killed_halfway_resumes_without_losing_or_duplicating_clips(store, settings, tmp_path):
    import ray

    skus = [f"RES-{n}" for n in range(8)]
    catalog = upload_catalog(store, "catalogs/resume/catalog.parquet", [product(sku) for sku in skus], NOW)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "WANFACTORY_RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "RAY_AUTH_MODE": "disabled",
        "PREFECT_API_URL": _api_url(),
    }
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        run = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from flows.cli import app; app()",
                "run",
                "nightly",
                "--catalog",
                catalog,
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
    _wait_for_some_published(store, skus, run, log, at_least=2)
    os.killpg(run.pid, signal.SIGKILL)  # the whole run dies: driver and everything it started
    run.wait(30)
    published_before = _published(store, skus)  # what made it before the kill
    assert 2 <= len(published_before) < len(skus), published_before

    resumed = nightly_catalog(catalog_uri=catalog)
    by_status: dict[str, set[str]] = {}
    for entry in resumed.entries:
        by_status.setdefault(str(entry.status), set()).add(entry.clip_key or "")
    assert set(by_status) <= {"skipped", "published"}, resumed.entries
    # Whatever the killed run published is skipped, everything else is made once: nothing lost or twice.
    assert by_status["skipped"] == published_before
    assert by_status.get("published", set()).isdisjoint(published_before)
    assert by_status["skipped"] | by_status.get("published", set()) == _published(store, skus)
    assert len(_published(store, skus)) == len(skus)


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def _published(store, skus: list[str]) -> set[str]:
    return {key for sku in skus for key in store.list_keys(f"clips/{sku}/") if key.endswith(".mp4")}


def _wait_for_some_published(
    store, skus: list[str], run: subprocess.Popen, log: Path, at_least: int
) -> set[str]:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert run.poll() is None, f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"
        published = _published(store, skus)
        if len(published) >= at_least:
            return published
        time.sleep(0.2)
    raise AssertionError(f"nothing published in time:\n{log.read_text()[-3000:]}")


def test_a_dry_run_makes_nothing_and_a_limit_makes_at_most_that_many(store):
    uri = upload_catalog(store, "catalogs/limits/catalog.parquet", [product(f"LIM-{n}") for n in "ABC"], NOW)
    dry = nightly_catalog(catalog_uri=uri, dry_run=True)
    assert statuses(dry) == dict.fromkeys(["LIM-A", "LIM-B", "LIM-C"], "planned")
    assert dry.manifest.counts == {"planned": 3} and store.exists(dry.manifest.json_key)
    assert all(e.estimated_gpu_seconds and e.reason == "dry run: would be generated" for e in dry.entries)
    assert not any(list(store.list_keys(f"clips/LIM-{n}/")) for n in "ABC")  # nothing generated or stored
    # The summary shows the estimate: the clips' estimated GPU time, priced as the estimate's GPU type.
    from tests.test_nightly_flow import flow_run_artifacts

    summary = flow_run_artifacts(dry.flow_run_id)["run-summary"].data
    estimate = r"^Cost: 3 planned clips estimated at ~[0-9.]+ GPU-hours, ~\$[0-9.]+ on H100$"
    assert re.search(estimate, summary, re.MULTILINE), summary
    assert "| **all** |  | 3 | " in summary and "## New clips" not in summary

    limited = nightly_catalog(catalog_uri=uri, limit=2)
    assert limited.manifest.counts == {"planned": 1, "published": 2}
    rest = nightly_catalog(catalog_uri=uri)
    assert rest.manifest.counts == {"published": 1, "skipped": 2}  # the third clip, made by the next run


def test_an_outage_of_the_store_mid_run_and_over_its_end_loses_nothing(store, s3_server, monkeypatch):
    """The real S3 server is stopped for 60 s twice: from the checkpoint after the run's first render
    batch, while the next batch is generated and finished (its models are loaded: a load lists the
    weights in the store), and from the moment the run writes its final manifest. Every clip is
    published once, and the run's manifest is in the store when the run has ended."""
    monkeypatch.setenv("WANFACTORY_UPLOAD_RETRY_SECONDS", "120")
    # Checkpoints at batch ends only, so that the outages begin where the test says.
    monkeypatch.setenv("WANFACTORY_MANIFEST_CHECKPOINT_SECONDS", "3600")
    skus = [f"OUT-{n}" for n in range(6)]
    uri = upload_catalog(store, "catalogs/outage/catalog.parquet", [product(sku) for sku in skus], NOW)
    outages: list[str] = []
    checkpoints: list[bool] = []
    restarts: list[threading.Timer] = []
    write_manifest = units.write_manifest

    def write_manifest_in_an_outage(*args, complete: bool = True, **kwargs):
        # The outages begin at two moments of the run itself, so the test does not race the run: the
        # checkpoints come before the first clip, after the first batch (5 clips here), after the second.
        checkpoints.append(complete)
        if (checkpoints == [False, False]) or (complete and "end" not in outages):
            outages.append("end" if complete else "mid-run")
            s3_server.stop()
            restarts.append(threading.Timer(60, s3_server.start))
            restarts[-1].start()
        return write_manifest(*args, complete=complete, **kwargs)

    monkeypatch.setattr(units, "write_manifest", write_manifest_in_an_outage)
    try:
        result = nightly_catalog(catalog_uri=uri)
    finally:
        for restart in restarts:
            restart.join()
        s3_server.start()  # a no-op when it runs
    assert outages == ["mid-run", "end"]
    assert sorted(e.sku for e in result.entries) == skus  # each clip once
    assert statuses(result) == dict.fromkeys(skus, "published"), [(e.sku, e.reason) for e in result.entries]
    assert all(e.attempts == 1 for e in result.entries)  # waited out, never generated again
    # Spooled while the store was away, delivered by the same run once it was back.
    assert not result.manifest.spooled
    manifest = json.loads(store.get_bytes(result.manifest.json_key))
    assert manifest["complete"] and manifest["counts"] == {"published": len(skus)}
