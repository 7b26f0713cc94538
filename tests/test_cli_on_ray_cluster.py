"""`wanfactory run nightly` in its own process, against an existing Ray cluster given by address."""

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

import pytest

from catalogs.sample import SAMPLE_DIR
from infra.objectstore import ObjectStore
from tests.net import free_ports

pytestmark = pytest.mark.usefixtures("tiny_models", "prefect_server")


def ray_env() -> dict[str, str]:
    """This process's environment (with the session's WANFACTORY_* settings) for a local, token-less Ray."""
    return {**os.environ, "RAY_AUTH_MODE": "disabled"}


def _cluster_node_ids(address: str) -> set[str]:
    script = "import json, ray; ray.init(address=%r); print(json.dumps([n['NodeID'] for n in ray.nodes()]))"
    out = subprocess.run(
        [sys.executable, "-c", script % address], env=ray_env(), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory) -> Iterator[str]:
    """A Ray head started with `ray start`, as an operator would; stopped by killing its process group."""
    (port,) = free_ports(1)
    temp_dir = tmp_path_factory.mktemp("ray")
    head = subprocess.Popen(
        [
            "ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
            "--num-cpus=2", "--include-dashboard=false", "--object-store-memory=500000000",
            f"--temp-dir={temp_dir}", "--disable-usage-stats",
        ],
        env=ray_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    status = ["ray", "status", f"--address={address}"]
    while subprocess.run(status, env=ray_env(), capture_output=True).returncode:
        assert head.poll() is None and time.monotonic() < deadline, "ray head did not come up"
        time.sleep(1)
    yield address
    # Some Ray processes ignore SIGTERM (NOTES): the whole group, then SIGKILL.
    os.killpg(head.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)


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
    run_id = done.stdout.split("run ", 1)[1].split(":", 1)[0]
    manifest = json.loads(bucket.get_bytes(f"runs/{run_id}/manifest.json"))
    assert manifest["counts"] == {"published": 12}
    cluster_nodes = {node[:8] for node in _cluster_node_ids(ray_head)}
    workers = {clip["worker"].split("/")[0] for clip in manifest["clips"]}
    assert workers <= cluster_nodes, (workers, cluster_nodes)
