"""`wanfactory run nightly` in its own process, against an existing Ray cluster given by address."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import replace

import pytest

from catalogs.sample import SAMPLE_DIR
from infra.objectstore import ObjectStore
from tests.ray_nodes import live_node_ids, ray_env, short_temp_dir, start_head

pytestmark = pytest.mark.usefixtures("tiny_models", "prefect_server")


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A Ray head started with `ray start`, as an operator would; stopped by killing its process group."""
    with short_temp_dir() as temp_root:
        address, head = start_head(temp_root, num_cpus=2, object_store_bytes=500_000_000)
        try:
            yield address
        finally:
            head.stop()


def test_cli_runs_the_nightly_flow_on_the_cluster(ray_head, settings):
    from prefect.settings import PREFECT_API_URL

    # A bucket of its own, so this run's clips do not count as published for the other tests.
    bucket = ObjectStore(replace(settings.object_store(), bucket="wanfactory-cli-test"))
    bucket.ensure_bucket()
    bucket.upload_folder(SAMPLE_DIR, "catalogs/cluster")
    env = {
        **ray_env(),
        "WANFACTORY_RAY_ADDRESS": ray_head,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "WANFACTORY_S3_BUCKET": bucket.bucket,
        "WANFACTORY_CATALOG_URI": bucket.uri("catalogs/cluster/catalog.parquet"),
    }
    done = subprocess.run(
        ["wanfactory", "run", "nightly"], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "12 published" in done.stdout, done.stdout[-3000:]
    # What the run's GPU time cost: on CPU actors, priced at nothing.
    assert "GPU time:   $0.00 for 12 published clips ($0.00 a clip), " in done.stdout, done.stdout[-3000:]
    run_id = done.stdout.split("run ", 1)[1].split(":", 1)[0]
    manifest = json.loads(bucket.get_bytes(f"runs/{run_id}/manifest.json"))
    assert manifest["counts"] == {"published": 12}
    cluster_nodes = {node[:8] for node in live_node_ids(ray_head)}
    workers = {clip["worker"].split("/")[0] for clip in manifest["clips"]}
    assert workers <= cluster_nodes, (workers, cluster_nodes)
