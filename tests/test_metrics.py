"""Prometheus metrics: a nightly run on the session's local Ray, scraped over HTTP from Ray's own metrics
export port, adds up to its manifest; the Grafana dashboard queries only metrics the scrape saw.

The run's clips are of a size no other test's catalog uses (64x64), so their series are this run's alone
in a Ray that other tests' runs share; an actor killed mid-clip and an adapter row make the restart and
adapter-swap counters appear too.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flows.nightly import nightly_catalog
from infra.processes import wait_until
from tasks.metrics import (
    ACTOR_RESTARTS,
    ADAPTER_SWAPS,
    CLIPS,
    CLIPS_FINISHING,
    CLIPS_GENERATING,
    GPU_COST_USD,
    GPU_SECONDS,
    STAGE_SECONDS,
)
from tasks.records import ClipStatus
from tests.catalog_upload import upload_catalog
from tests.test_lost_actor import an_actor_killed_mid_clip

pytestmark = pytest.mark.usefixtures("tiny_models", "prefect_server", "ray_cluster")

DASHBOARD = Path(__file__).resolve().parents[1] / "infra" / "grafana" / "wanfactory.json"
RESOLUTION = "64x64"
# Every stage a published clip passes through, as STAGE_SECONDS labels it.
CLIP_STAGES = {"queue_wait", "prepare", "denoise", "decode", "handback", "upload", "post_encode"}
# Ray's agent exports what its workers report every few seconds.
SCRAPE_DEADLINE_S = 60.0


def scrape(url: str) -> dict[str, list]:
    """The endpoint's samples by sample name (``..._total``, ``..._bucket``)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def ours(samples: dict[str, list], name: str) -> list:
    """This run's samples of ``name``: those of its clips' resolution."""
    return [s for s in samples.get(name, []) if s.labels.get("resolution") == RESOLUTION]


@pytest.fixture(scope="module")
def metrics_run(store, settings, ray_cluster):
    """The run, and the endpoint's samples once they account for every clip of its manifest."""
    import ray

    rows = [
        {
            "sku": sku,
            "title": f"Mug {sku}",
            "description": "A blue mug.",
            "style": "studio",
            "size": RESOLUTION,
        }
        for sku in ("MET-A", "MET-B", "MET-C")
    ]
    rows[2]["adapters"] = "acme-style:0.5"
    rows.append(
        {
            "sku": "MET-GORE",
            "title": "Mug",
            "description": "A mug.",
            "style": "studio",
            "size": RESOLUTION,
            "prompt": "A mug covered in Gore and blood, beheaded figurine",
        }
    )
    catalog = upload_catalog(store, "catalogs/metrics/catalog.parquet", rows, datetime.now(UTC))
    # A price for CPU time, so the run's GPU-seconds have a cost to export.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANFACTORY_GPU_PRICE_PER_HOUR", json.dumps({"cpu": 3.6}))
        with an_actor_killed_mid_clip():
            result = nightly_catalog(catalog_uri=catalog, force=True)

    (port,) = {node["MetricsExportPort"] for node in ray.nodes() if node["Alive"]}
    url = f"http://127.0.0.1:{port}/metrics"
    expected = Counter(str(entry.status) for entry in result.entries)

    def complete() -> dict[str, list] | None:
        """The samples, once Ray's agent has every clip, stage and restart the run's workers recorded."""
        samples = scrape(url)
        counted = Counter()
        for sample in ours(samples, CLIPS.exported_name):
            counted[sample.labels["status"]] += int(sample.value)
        stages = {s.labels["stage"] for s in ours(samples, STAGE_SECONDS.exported_name + "_count")}
        done = counted == expected and stages >= CLIP_STAGES and ACTOR_RESTARTS.exported_name in samples
        return samples if done else None

    # On a timeout, the tests compare what was exported by then and say what is missing.
    return result, wait_until(complete, SCRAPE_DEADLINE_S, interval=1.0) or scrape(url)


def test_the_clip_counters_equal_the_manifest(metrics_run):
    result, samples = metrics_run
    assert {str(e.status) for e in result.entries} == {"published", "quarantined"}, [
        (e.sku, e.status, e.stage, e.reason) for e in result.entries
    ]
    counted = Counter()
    for sample in ours(samples, CLIPS.exported_name):
        labels = sample.labels
        counted[labels["status"], labels["stage"], labels["reason_class"], labels["model"]] += int(
            sample.value
        )
        assert "sku" not in labels and "clip_id" not in labels and "run_id" not in labels
    expected = Counter((str(e.status), e.stage, str(e.reason_class), e.model) for e in result.entries)
    assert counted == expected


def test_gpu_seconds_and_cost_add_up_to_the_manifest(metrics_run):
    result, samples = metrics_run
    gpu_seconds = sum(s.value for s in ours(samples, GPU_SECONDS.exported_name))
    cost = sum(s.value for s in ours(samples, GPU_COST_USD.exported_name))
    assert gpu_seconds > 0
    assert gpu_seconds == pytest.approx(sum(e.gpu_seconds or 0 for e in result.entries), rel=1e-6)
    assert cost == pytest.approx(sum(e.cost_usd or 0 for e in result.entries), rel=1e-6)
    assert {s.labels["gpu_type"] for s in ours(samples, GPU_SECONDS.exported_name)} == {"cpu"}


def test_every_stage_has_latency_samples(metrics_run):
    result, samples = metrics_run
    counts = Counter()  # by stage, summed over the workers (each process exports its own series)
    for sample in ours(samples, STAGE_SECONDS.exported_name + "_count"):
        counts[sample.labels["stage"]] += sample.value
    assert set(counts) >= CLIP_STAGES, sorted(counts)
    assert "adapter_swap" in counts  # MET-C's adapters were swapped in
    assert all(value > 0 for value in counts.values())
    published = sum(1 for e in result.entries if e.status == ClipStatus.PUBLISHED)
    assert counts["upload"] == published  # one upload per published clip
    buckets = ours(samples, STAGE_SECONDS.exported_name + "_bucket")
    assert {s.labels["le"] for s in buckets} >= {"0.01", "+Inf"}


def test_fleet_events_and_in_flight_gauges_are_exported(metrics_run):
    _, samples = metrics_run
    restarts = samples[ACTOR_RESTARTS.exported_name]
    assert sum(s.value for s in restarts) >= 1
    assert {s.labels["model"] for s in restarts} >= {"t2v-a14b-tiny"}
    assert sum(s.value for s in samples[ADAPTER_SWAPS.exported_name]) >= 1
    for gauge in (CLIPS_GENERATING, CLIPS_FINISHING):
        assert gauge.exported_name in samples


def test_every_dashboard_query_names_a_metric_the_scrape_saw(metrics_run):
    _, samples = metrics_run
    dashboard = json.loads(DASHBOARD.read_text())
    targets = [target for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(targets) >= 5
    for target in targets:
        names = set(re.findall(r"\bray_wanfactory_[a-z_]+", target["expr"]))
        assert names, target["expr"]
        assert names <= set(samples), (target["expr"], names - set(samples))
