"""A spreadsheet dropped into the bucket becomes published clips, with nobody at a terminal.

The deployments are served by `python -m flows.serve` (what `wanfactory stack up` starts) against
the Prefect test server. The test server runs no scheduler service, so the test starts the intake
watcher's run itself, as the scheduler's interval tick would (tests/test_schedules_and_intake.py
shows the scheduler creating runs on a real server); everything after that is the served runner's.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openpyxl import Workbook

pytestmark = pytest.mark.usefixtures("tiny_models", "prefect_server", "ray_cluster")

ROOT = Path(__file__).resolve().parents[1]
SHEET = [
    ["Experiment", "Variant", "Prompt", "Seeds", "Aspect ratio"],
    ["drop-test", "warm", "A ceramic mug on a sunny kitchen table", "3", "16:9"],
    ["drop-test", "cool", "A ceramic mug in blue evening light", "3", "9:16"],
    ["drop-test", "broken", "A ceramic mug", "three", "16:9"],
]


def xlsx(rows: list[list[str]]) -> bytes:
    book = Workbook()
    for row in rows:
        book.active.append(row)
    buffer = io.BytesIO()
    book.save(buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The project's deployments served in a subprocess, as the stack runs them."""
    import ray
    from prefect.settings import PREFECT_API_URL

    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {
        **os.environ,
        # The test server lives in the harness's settings context, not in the environment.
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PYTHONPATH": str(ROOT),
        # The flow runs join the tests' Ray instead of starting a second one on 2 cores.
        "WANFACTORY_RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "RAY_AUTH_MODE": "disabled",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.serve"], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
        )
    try:
        _wait_for_deployments(("ab-batch/ab", "intake-watcher/intake"), process, log)
        yield process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def _wait_for_deployments(names: tuple[str, ...], process: subprocess.Popen, log: Path) -> None:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + 180
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                for name in names:
                    client.read_deployment_by_name(name)
                return
            except Exception:
                time.sleep(1)
    raise AssertionError(f"deployments not served in time:\n{log.read_text()[-3000:]}")


def _finished_ab_runs(timeout: float) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterTags

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["ab-batch"])),
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["experiment:drop-test"])),
            )
            if runs and all(run.state and run.state.is_final() for run in runs):
                return runs
            time.sleep(2)
    raise AssertionError(f"the A/B run did not finish in {timeout} s: {[(r.name, r.state) for r in runs]}")


def test_a_sheet_dropped_into_intake_is_published_without_a_terminal(served, store):
    from prefect.deployments import run_deployment

    store.put_bytes("intake/drop-test.xlsx", xlsx(SHEET), "application/octet-stream")
    watcher = run_deployment("intake-watcher/intake", timeout=120)  # the scheduler's tick
    assert watcher.state.is_completed(), watcher.state

    (ab_run,) = _finished_ab_runs(timeout=420)
    assert ab_run.state.is_completed(), ab_run.state
    assert ab_run.name == "ab-drop-test" and "intake" in ab_run.tags

    assert not list(store.list_keys("intake/drop-test.xlsx"))
    (accepted,) = [key for key in store.list_keys("intake/accepted/") if key.endswith("drop-test.xlsx")]
    (run_prefix,) = {key.rsplit("/", 1)[0] for key in store.list_keys("experiments/drop-test/runs/")}
    manifest = json.loads(store.get_bytes(f"{run_prefix}/manifest.json"))
    assert manifest["source"] == store.uri(accepted)
    assert manifest["counts"] == {"failed": 1, "published": 2}
    by_variant = {clip["variant_id"]: clip for clip in manifest["clips"]}
    for variant in ("warm", "cool"):
        clip = by_variant[variant]
        assert clip["status"] == "published" and store.exists(clip["clip_key"])
        assert clip["clip_key"].startswith(f"experiments/drop-test/{variant}/")
    (failed,) = [clip for clip in manifest["clips"] if clip["status"] == "failed"]
    assert failed["row"] == 4 and "column 'Seeds'" in failed["reason"], failed
    assert store.exists(f"{run_prefix}/contact-sheet.jpg")
