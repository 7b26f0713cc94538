"""A run whose driver is SIGKILLed does not stay Running: Prefect marks it Crashed (its heartbeats and the
project's zombie automation, flows/automations.py), its manifest checkpoint in the store says what it
published, and a plain rerun records every clip once, the killed run's clips as skipped.

On the real services: the session's Ceph S3 server, Prefect test server (whose triggers and actions
services evaluate automations as `prefect server start` does) and Ray. The run is `wanfactory run
nightly` in a subprocess, as a person or cron would start it, with the heartbeat (30 s, Prefect's
minimum) and the zombie window (60 s) shortened through the project's settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pydantic
import pytest

from flows.automations import (
    HEARTBEAT_EVENT,
    TERMINAL_EVENTS,
    apply_automations,
    delete_automations,
    zombie_automation,
    zombie_message,
)
from flows.runs import DEPLOYMENTS
from infra.settings import Settings
from tests.catalog_upload import upload_catalog
from tests.cli_process import ROOT, WANFACTORY

HEARTBEAT_S, WINDOW_S = 30, 60
CATALOG_TAG = "catalog:zombie"  # the run's tag, from the catalog's folder
SKUS = [f"ZMB-{n}" for n in range(6)]


def test_the_zombie_window_must_outlast_the_heartbeats():
    assert Settings().prefect_environment() == {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "60"}
    assert Settings().zombie_window_seconds == 300
    with pytest.raises(pydantic.ValidationError, match="at least 1.5 x WANFACTORY_FLOW_HEARTBEAT_SECONDS"):
        Settings(flow_heartbeat_seconds=60, zombie_window_seconds=80)
    with pytest.raises(pydantic.ValidationError, match="greater than or equal to 30"):
        Settings(flow_heartbeat_seconds=10)  # Prefect's own minimum


def test_the_automation_is_prefects_zombie_recipe_for_our_flows():
    automation = zombie_automation(Settings(flow_heartbeat_seconds=30, zombie_window_seconds=90))
    trigger = automation.trigger
    assert trigger.posture == "Proactive" and trigger.threshold == 1
    assert trigger.within.total_seconds() == 90
    assert trigger.after == {HEARTBEAT_EVENT} and trigger.expect == {HEARTBEAT_EVENT, *TERMINAL_EVENTS}
    assert trigger.for_each == {"prefect.resource.id"}  # one window per flow run
    assert set(trigger.match_related.model_dump()["prefect.resource.name"]) == {
        d.split("/")[0] for d in DEPLOYMENTS
    }
    (action,) = automation.actions
    assert (action.type, action.state, action.force) == ("change-flow-run-state", "CRASHED", False)


@pytest.fixture
def zombie_settings():
    """The zombie automation on the session's Prefect server with a short window, for this test only:
    the other tests' in-process runs keep Prefect's default heartbeat (180 s)."""
    settings = Settings(flow_heartbeat_seconds=HEARTBEAT_S, zombie_window_seconds=WINDOW_S)
    apply_automations(settings)
    yield settings
    delete_automations()


@pytest.mark.usefixtures("tiny_models", "prefect_server", "ray_cluster")
def test_a_killed_driver_is_marked_crashed_and_a_rerun_records_every_clip_once(
    store, settings, zombie_settings, tmp_path
):
    import ray
    from prefect.client.schemas.objects import StateType

    catalog = upload_catalog(
        store,
        "catalogs/zombie/catalog.parquet",
        [
            {"sku": s, "title": f"Product {s}", "description": "A plain product.", "style": "studio"}
            for s in SKUS
        ],
        datetime(2026, 12, 1, tzinfo=UTC),
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "WANFACTORY_RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "RAY_AUTH_MODE": "disabled",
        "PREFECT_API_URL": _api_url(),
        # The project's settings; the CLI hands the heartbeat to Prefect (PREFECT_FLOWS_HEARTBEAT_FREQUENCY).
        "WANFACTORY_FLOW_HEARTBEAT_SECONDS": str(HEARTBEAT_S),
        "WANFACTORY_ZOMBIE_WINDOW_SECONDS": str(WINDOW_S),
        # One render batch for all clips, checkpointed as each clip ends: the checkpoint, not the batch
        # boundary, is what records the killed run's clips.
        "WANFACTORY_CLIPS_PER_TASK": "64",
        "WANFACTORY_MANIFEST_CHECKPOINT_SECONDS": "0",
    }
    started = time.monotonic()
    driver, driver_log = _wanfactory_run(catalog, env, tmp_path / "killed.log")
    try:
        killed_id = _wait_for_flow_run(driver, driver_log)
        checkpoint_key, checkpoint = _wait_for_checkpoint(store, killed_id, driver, driver_log, published=2)
        os.kill(driver.pid, signal.SIGKILL)  # the driver only: Ray ends what it owned
        killed_at = time.monotonic()
        driver.wait(30)
    finally:
        _kill_group(driver)

    # A plain rerun, started at once (nothing waits for Prefect to notice the dead driver).
    rerun, rerun_log = _wanfactory_run(catalog, env, tmp_path / "rerun.log")
    try:
        # (a) Crashed by the automation, within the window after the driver's last heartbeat.
        crashed = _wait_for_state(killed_id, StateType.CRASHED, deadline=killed_at + WINDOW_S + 45)
        crashed_after = time.monotonic() - killed_at
        assert crashed.state.message == zombie_message(zombie_settings), crashed.state
        assert crashed_after <= WINDOW_S + 30, crashed_after
        rerun.wait(420)
    finally:
        _kill_group(rerun)
    output = rerun_log.read_text()
    assert rerun.returncode == 0, output[-4000:]

    # (b) The killed run's last checkpoint: incomplete, naming clips that are in the store, its own.
    killed_run_id = checkpoint["run_id"]
    checkpoint = json.loads(store.get_bytes(checkpoint_key))  # its latest version
    assert checkpoint["complete"] is False and checkpoint["source"] == catalog
    checkpointed = {c["clip_key"] for c in checkpoint["clips"] if c["status"] == "published"}
    assert len(checkpointed) >= 2, checkpoint["counts"]
    assert all(store.metadata(key)["run-id"] == killed_run_id for key in checkpointed)

    # (c) The rerun records every row once: the killed run's clips skipped (those after its last
    # checkpoint too), the rest published by the rerun; nothing lost, nothing made twice.
    manifest_key = next(
        line.split("s3://", 1)[1].split("/", 1)[1]
        for line in output.splitlines()
        if line.strip().startswith("s3://") and line.strip().endswith("/manifest.json")
    )
    manifest = json.loads(store.get_bytes(manifest_key))
    assert manifest["complete"] is True and manifest["run_id"] != killed_run_id
    clips = manifest["clips"]
    assert sorted(c["sku"] for c in clips) == SKUS, clips
    by_status: dict[str, set[str]] = {}
    for clip in clips:
        by_status.setdefault(clip["status"], set()).add(clip["clip_key"])
    assert set(by_status) <= {"skipped", "published"}, [(c["sku"], c["status"], c["reason"]) for c in clips]
    skipped, published = by_status.get("skipped", set()), by_status.get("published", set())
    assert checkpointed <= skipped and not (checkpointed & published)
    assert all(store.metadata(key)["run-id"] == killed_run_id for key in skipped)
    assert all(store.metadata(key)["run-id"] == manifest["run_id"] for key in published)
    assert {key for sku in SKUS for key in store.list_keys(f"clips/{sku}/") if key.endswith(".mp4")} == (
        skipped | published
    )
    # The rerun, alive and sending heartbeats, was left alone by the automation.
    (rerun_run,) = [r for r in _flow_runs() if r.id != killed_id]
    assert rerun_run.state.type == StateType.COMPLETED, rerun_run.state
    print(f"killed->crashed {crashed_after:.0f} s, test {time.monotonic() - started:.0f} s")


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def _wanfactory_run(catalog: str, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, Path]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*WANFACTORY, "run", "nightly", "--catalog", catalog],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
    return process, log


def _kill_group(process: subprocess.Popen) -> None:
    """Whatever the run's process group still holds, once the test is done with it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)


def _flow_runs() -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[CATALOG_TAG]))
        )


def _wait_for_flow_run(process: subprocess.Popen, log: Path):
    """The id of the run's flow run, once it has labelled itself with its catalog."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"
        runs = _flow_runs()
        if runs:
            (run,) = runs
            return run.id
        time.sleep(0.5)
    raise AssertionError(f"no flow run appeared:\n{log.read_text()[-3000:]}")


def _wait_for_checkpoint(store, flow_run_id, process: subprocess.Popen, log: Path, published: int):
    """The run's manifest checkpoint, once it records ``published`` clips (its run id ends with the
    flow run id's first 8 characters)."""
    suffix = f"-{str(flow_run_id)[:8]}/manifest.json"
    deadline = time.monotonic() + 360
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"
        for key in (k for k in store.list_keys("runs/") if k.endswith(suffix)):
            manifest = json.loads(store.get_bytes(key))
            if manifest["counts"].get("published", 0) >= published:
                return key, manifest
        time.sleep(0.5)
    raise AssertionError(f"no checkpoint with {published} published clips:\n{log.read_text()[-3000:]}")


def _wait_for_state(flow_run_id, state_type, deadline: float):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state.type == state_type or time.monotonic() > deadline:
                assert run.state.type == state_type, f"still {run.state} after the deadline"
                return run
            time.sleep(1)
