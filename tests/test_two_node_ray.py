"""`wanfactory run nightly` on a two-node Ray cluster on this machine: a model's actors on both nodes.

A head and a worker node are started with `ray start`, each with its own ports and temp dir and
one CPU, as an operator would start two machines. The flow runs in its own process against the head's
address with two CPU actors for its one model; scheduling them with SPREAD puts one on each node, so
clips come from both.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from infra.objectstore import ObjectStore
from tests.catalog_upload import upload_catalog
from tests.ray_nodes import join_worker, live_node_ids, ray_env, short_temp_dir, start_head

pytestmark = pytest.mark.usefixtures("tiny_models", "prefect_server")

# Four clips: the dispatcher gives each of the two actors two at once, so both nodes make some.
SKUS = [f"SPREAD-{index:03d}" for index in range(4)]


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[tuple[str, set[str]]]:
    """The head's address and the ids of both nodes."""
    with short_temp_dir() as temp_root:
        address, head = start_head(temp_root)
        nodes = [head]
        try:
            nodes.append(join_worker(temp_root, address))
            node_ids = live_node_ids(address)
            assert len(node_ids) == 2, node_ids
            yield address, node_ids
        finally:
            for node in reversed(nodes):
                node.stop()


def test_actors_of_a_model_spread_over_both_nodes(two_nodes, settings):
    from prefect.settings import PREFECT_API_URL

    address, node_ids = two_nodes
    # A bucket of its own, so this run's clips do not count as published for the other tests.
    bucket = ObjectStore(replace(settings.object_store(), bucket="wanfactory-two-node-test"))
    bucket.ensure_bucket()
    rows = [
        {
            "sku": sku,
            "title": f"Linen throw pillow {index}",
            "description": "A sand linen pillow on a grey sofa.",
            "style": "lifestyle",
        }
        for index, sku in enumerate(SKUS)
    ]
    catalog_uri = upload_catalog(bucket, "catalogs/two-node/catalog.parquet", rows, datetime.now(UTC))
    env = {
        **ray_env(),
        "WANFACTORY_RAY_ADDRESS": address,
        "WANFACTORY_CPU_ACTORS_PER_MODEL": "2",
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "WANFACTORY_S3_BUCKET": bucket.bucket,
        "WANFACTORY_CATALOG_URI": catalog_uri,
    }
    done = subprocess.run(
        ["wanfactory", "run", "nightly", "--force"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_id = done.stdout.split("run ", 1)[1].split(":", 1)[0]
    manifest = json.loads(bucket.get_bytes(f"runs/{run_id}/manifest.json"))
    assert manifest["counts"] == {"published": len(SKUS)}, manifest["counts"]

    # Two actors of the one model, one on each node, and each made some of the clips.
    workers = {clip["worker"] for clip in manifest["clips"]}
    assert len(workers) == 2, workers
    assert {worker.split("/")[0] for worker in workers} == {node[:8] for node in node_ids}, (
        workers,
        node_ids,
    )
