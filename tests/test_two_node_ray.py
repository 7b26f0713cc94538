"""`wanfactory run nightly` on a two-node Ray cluster on this machine: a model's actors on both nodes.

A head and a worker node are started with `ray start`, each with its own ports and temp dir and
one CPU, as an operator would start two machines. The flow runs in its own process against the head's
address with two CPU actors for its one model; scheduling them with SPREAD puts one on each node, so
clips come from both.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from infra.objectstore import ObjectStore
from tests.catalog_upload import upload_catalog
from tests.net import free_ports

pytestmark = pytest.mark.usefixtures("tiny_models", "prefect_server")

# Four clips: the dispatcher gives each of the two actors two at once, so both nodes make some.
SKUS = [f"SPREAD-{index:03d}" for index in range(4)]
# Every port a node listens on, so that two nodes on one machine (and other clusters on it) never collide.
NODE_PORT_FLAGS = (
    "--node-manager-port",
    "--object-manager-port",
    "--runtime-env-agent-port",
    "--dashboard-agent-grpc-port",
    "--dashboard-agent-listen-port",
    "--metrics-export-port",
)
# Waits for the nodes to register, then prints their ids (a driver of its own: ray.nodes() needs one).
WAIT_FOR_NODES = """
import json, sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.monotonic() + 60
while len(alive := [n["NodeID"] for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
    time.sleep(0.5)
print(json.dumps(alive))
"""


def ray_env() -> dict[str, str]:
    """This process's environment (with the session's WANFACTORY_* settings) for a local, token-less Ray."""
    return {**os.environ, "RAY_AUTH_MODE": "disabled"}


def start_node(temp_dir: Path, *flags: str) -> subprocess.Popen:
    """`ray start --block` in a process group of its own, which holds every process of the node."""
    ports = free_ports(len(NODE_PORT_FLAGS))
    return subprocess.Popen(
        [
            "ray",
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            "--object-store-memory=300000000",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            *flags,
            *(f"{flag}={port}" for flag, port in zip(NODE_PORT_FLAGS, ports, strict=True)),
        ],
        env=ray_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_node(node: subprocess.Popen) -> None:
    """Stop a node's process group (`ray stop` would stop every Ray on the machine, others' included).

    Some Ray processes ignore SIGTERM (NOTES), and a head's `ray start --block` at times waits on them
    for good: SIGKILL what is left after a short grace period.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        node.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.pid, signal.SIGKILL)
    node.wait(timeout=15)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> Iterator[tuple[str, set[str]]]:
    """The head's address and the ids of both nodes."""
    gcs_port, client_port = free_ports(2)
    address = f"127.0.0.1:{gcs_port}"
    head_flags = (
        "--head",
        f"--port={gcs_port}",
        f"--ray-client-server-port={client_port}",
        "--include-dashboard=false",
    )
    nodes = [start_node(tmp_path_factory.mktemp("ray-head"), *head_flags)]
    try:
        deadline = time.monotonic() + 90
        while subprocess.run(
            ["ray", "status", f"--address={address}"], env=ray_env(), capture_output=True
        ).returncode:
            assert nodes[0].poll() is None and time.monotonic() < deadline, "the ray head did not come up"
            time.sleep(1)
        nodes.append(start_node(tmp_path_factory.mktemp("ray-worker"), f"--address={address}"))
        listed = subprocess.run(
            [sys.executable, "-c", WAIT_FOR_NODES, address],
            env=ray_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert listed.returncode == 0, listed.stderr[-2000:]
        node_ids = set(json.loads(listed.stdout.strip().splitlines()[-1]))
        assert len(node_ids) == 2, "the worker node did not join the head"
        yield address, node_ids
    finally:
        for node in reversed(nodes):
            stop_node(node)


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
