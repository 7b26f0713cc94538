"""The served deployments on real Prefect servers, and the intake watcher on the real S3 server.

The scheduler: ``prefect_test_harness`` starts an *ephemeral* server, which runs only the services
marked to run there (the task-run recorder); the scheduler is not one of them, so no schedule ever
makes a run on it. The schedule tests therefore start a real ``prefect server start``, as the local
stack does, with its services on (the scheduler's loops shortened so that it acts within seconds).

The intake watcher runs as a flow on the session's Prefect test server against the session's S3
server; the A/B deployment it starts runs of is registered there but not served, so the run it
creates stays scheduled and its parameters can be read back.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
)
from prefect.client.schemas.objects import ConcurrencyLimitStrategy, StateType
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Cancelled, Pending

from flows.intake import ACCEPTED_PREFIX, INTAKE_PREFIX, REJECTED_PREFIX, intake_watcher
from flows.runs import AB_DEPLOYMENT, DEPLOYMENTS, INTAKE_DEPLOYMENT, NIGHTLY_DEPLOYMENT
from flows.serve import ab_deployment, deployments
from infra.processes import free_ports
from infra.settings import Settings

# Asia/Kathmandu is UTC+05:45: a cron minute there falls on another minute in UTC, so runs on the
# cron's times prove that the scheduler read the cron in the deployment's time zone.
TIMEZONE = "Asia/Kathmandu"
CRON = "*/10 * * * *"  # soon: within ten minutes; on :00, :10, ... there, :05, :15, ... in UTC


class _SchedulingServer:
    """A real ``prefect server start``, its services on, in a session of its own; its state in ``home``."""

    def __init__(self, home: Path) -> None:
        self.home = home
        (port,) = free_ports(1)
        self.api = f"http://127.0.0.1:{port}/api"
        env = {
            **os.environ,
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "false",
            # The defaults are 60 s and 5 s: the same scheduler service, acting sooner.
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
            "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
        }
        env.pop("PREFECT_API_URL", None)
        with (home / "server.log").open("wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "prefect",
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                env=env,
                cwd=home,  # no prefect.toml or .env of the caller's
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.api}/health", timeout=2).status_code == 200:
                    return self.api
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"prefect server did not start:\n{(self.home / 'server.log').read_text()[-3000:]}"
                )
            time.sleep(0.5)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module", autouse=True)
def scheduling_server(tmp_path_factory) -> Iterator[_SchedulingServer]:
    """Launched as the module starts, so that it boots (~15 s) while the intake tests run."""
    server = _SchedulingServer(tmp_path_factory.mktemp("prefect-scheduling"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def scheduling_api(scheduling_server) -> str:
    return scheduling_server.wait_ready()


@pytest.fixture(scope="module")
def served(scheduling_api, settings) -> dict[str, object]:
    """The nightly and intake deployments as ``wanfactory serve`` registers them, on the scheduling server."""
    built = {
        f"{d.flow_name}/{d.name}": d
        for d in deployments(Settings(nightly_cron=CRON, nightly_timezone=TIMEZONE))
    }
    assert tuple(built) == DEPLOYMENTS
    with temporary_settings(updates={PREFECT_API_URL: scheduling_api}):
        for name in (NIGHTLY_DEPLOYMENT, INTAKE_DEPLOYMENT):
            built[name].apply()
    return built


def _scheduled_runs(api: str, deployment_id) -> list:
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(state={"type": {"any_": [StateType.SCHEDULED]}}),
        )


# --- the intake watcher -----------------------------------------------------------------------------------

GOOD_SHEET = """\
Experiment ID,Variant ID,Prompt,Template,Subject,Samples,Aspect ratio,Notes
intake-mugs,A,"A speckled sea-blue mug on a sunlit kitchen counter, steam rising.",,,1,16:9,control
intake-mugs,B,,studio,Speckled stoneware mug in sea blue,1,16:9,catalog look
intake-mugs,C,,no-such-template,A mug,1,16:9,a bad row: reported but does not stop the sheet
"""


@pytest.fixture
def ab_served(prefect_server) -> str:
    """The A/B deployment registered on the session's Prefect server, not served: its runs stay scheduled."""
    return str(ab_deployment().apply())


def _ab_runs(deployment_id: str) -> list:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )


def test_the_intake_watcher_starts_an_ab_run_for_a_dropped_sheet_and_rejects_junk(
    store, settings, prefect_server, ab_served
):
    for key in store.list_keys(INTAKE_PREFIX):
        store.client.remove_object(store.bucket, key)
    good = GOOD_SHEET.encode()
    store.put_bytes(f"{INTAKE_PREFIX}spring mugs.csv", good, "text/csv")
    store.put_bytes(
        f"{INTAKE_PREFIX}junk.xlsx", b"PK\x03\x04 not really a workbook", "application/octet-stream"
    )
    store.put_bytes(
        f"{INTAKE_PREFIX}photo.csv",
        b"Experiment,Variant,Prompt,Model,Image\nphoto-mug,A,The mug turns,i2v-a14b,images/mug.png\n",
        "text/csv",
    )
    store.put_bytes(f"{INTAKE_PREFIX}images/mug.png", b"not read: sub-folders are not drops", "image/png")

    def stamp(key: str) -> str:
        return f"{store.client.stat_object(store.bucket, key).last_modified:%Y%m%dT%H%M%SZ}"

    accepted_key = f"{ACCEPTED_PREFIX}{stamp(f'{INTAKE_PREFIX}spring mugs.csv')}-spring mugs.csv"
    junk_key = f"{REJECTED_PREFIX}{stamp(f'{INTAKE_PREFIX}junk.xlsx')}-junk.xlsx"
    photo_key = f"{REJECTED_PREFIX}{stamp(f'{INTAKE_PREFIX}photo.csv')}-photo.csv"

    runs_before = {r.id for r in _ab_runs(ab_served)}
    state = intake_watcher(return_state=True)
    report = state.result()
    assert {o.source_key: o.outcome for o in report.outcomes} == {
        f"{INTAKE_PREFIX}spring mugs.csv": "accepted",
        f"{INTAKE_PREFIX}junk.xlsx": "rejected",
        f"{INTAKE_PREFIX}photo.csv": "rejected",
    }

    # Moved, byte for byte; what was not a drop stays where it is.
    assert sorted(store.list_keys(INTAKE_PREFIX)) == sorted(
        [
            accepted_key,
            junk_key,
            f"{junk_key}.error.txt",
            photo_key,
            f"{photo_key}.error.txt",
            f"{INTAKE_PREFIX}images/mug.png",
        ]
    )
    assert store.get_bytes(accepted_key) == good

    # One A/B run, for the accepted copy, named and tagged after the sheet's experiment.
    (run,) = [r for r in _ab_runs(ab_served) if r.id not in runs_before]
    (accepted,) = report.by_outcome("accepted")
    assert str(run.id) == accepted.flow_run_id
    assert run.parameters == {"sheet_uri": store.uri(accepted_key)}
    assert run.name == "ab-intake-mugs"
    assert set(run.tags) >= {"ab", "intake", "experiment:intake-mugs"}
    assert run.state.type == StateType.SCHEDULED  # created, not waited for (timeout=0)
    assert accepted.check.variants == 2 and accepted.check.experiments == ("intake-mugs",)
    assert len(accepted.check.row_problems) == 1 and "row 4" in accepted.check.row_problems[0]

    # Each rejected file has its reasons beside it.
    junk_error = store.get_bytes(f"{junk_key}.error.txt").decode()
    assert (
        "junk.xlsx was not started" in junk_error and "could not be read as an Excel workbook" in junk_error
    )
    photo_error = store.get_bytes(f"{photo_key}.error.txt").decode()
    assert f"write it as {store.uri(f'{INTAKE_PREFIX}images/mug.png')}" in photo_error

    # The poll's report, as an artifact of its flow run.
    with get_client(sync_client=True) as client:
        (report_artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["intake-report"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
            )
        )
    assert "spring mugs.csv" in report_artifact.data and "ab-intake-mugs" in report_artifact.data

    # A second poll finds nothing to do, and starts nothing.
    assert intake_watcher().outcomes == []
    assert {r.id for r in _ab_runs(ab_served)} == runs_before | {run.id}
    assert len(list(store.list_keys(INTAKE_PREFIX))) == 6


def test_starting_the_same_accepted_sheet_again_returns_the_same_run(store, prefect_server, ab_served):
    """What makes a retried or re-done poll safe: the run's idempotency key."""
    from flows.intake import start_ab_run_task

    uri = store.uri(f"{ACCEPTED_PREFIX}20260101T000000Z-again.csv")
    first = start_ab_run_task.fn(AB_DEPLOYMENT, uri, ("again",), f"intake:{uri}:etag")
    second = start_ab_run_task.fn(AB_DEPLOYMENT, uri, ("again",), f"intake:{uri}:etag")
    assert first == second
    assert [str(r.id) for r in _ab_runs(ab_served) if r.parameters["sheet_uri"] == uri] == [first[0]]


# --- the schedules ---------------------------------------------------------------------------------------


def test_the_scheduler_creates_nightly_runs_on_the_cron_in_its_timezone(scheduling_api, served):
    with (
        temporary_settings(updates={PREFECT_API_URL: scheduling_api}),
        get_client(sync_client=True) as client,
    ):
        deployment = client.read_deployment_by_name(NIGHTLY_DEPLOYMENT)
    (schedule,) = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == (CRON, TIMEZONE, True)
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    assert set(deployment.tags) == {"nightly", "catalog"}
    assert deployment.entrypoint == "flows.nightly.nightly_catalog"

    # The scheduler service, not the API call that registered the deployment, makes the runs.
    deadline = time.monotonic() + 45
    while len(runs := _scheduled_runs(scheduling_api, deployment.id)) < 3:
        assert time.monotonic() < deadline, f"the scheduler made {len(runs)} runs in 45 s"
        time.sleep(1)

    zone = ZoneInfo(TIMEZONE)
    starts = sorted(run.expected_start_time for run in runs)
    assert all(run.auto_scheduled and run.created_by.type == "SCHEDULE" for run in runs)
    assert all(set(run.tags) >= {"nightly", "catalog"} for run in runs)
    for start in starts:
        local = start.astimezone(zone)
        assert (local.minute % 10, local.second, local.microsecond) == (0, 0, 0), local
        assert start.astimezone(UTC).minute % 10 == 5, start  # the same cron read in UTC would give 0
    # Consecutive cron times, the first within the next ten minutes.
    assert all((b - a).total_seconds() == 600 for a, b in zip(starts, starts[1:], strict=False))
    assert 0 < (starts[0] - deployment.created).total_seconds() <= 600


def test_the_intake_watcher_is_scheduled_every_poll_interval(scheduling_api, served, settings):
    with (
        temporary_settings(updates={PREFECT_API_URL: scheduling_api}),
        get_client(sync_client=True) as client,
    ):
        deployment = client.read_deployment_by_name(INTAKE_DEPLOYMENT)
    (schedule,) = deployment.schedules
    assert schedule.schedule.interval.total_seconds() == settings.intake_poll_seconds
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
    deadline = time.monotonic() + 45
    while len(runs := _scheduled_runs(scheduling_api, deployment.id)) < 3:
        assert time.monotonic() < deadline, f"the scheduler made {len(runs)} runs in 45 s"
        time.sleep(1)
    starts = sorted(run.expected_start_time for run in runs)
    assert {(b - a).total_seconds() for a, b in zip(starts, starts[1:], strict=False)} == {
        float(settings.intake_poll_seconds)
    }


@pytest.mark.parametrize(
    ("deployment_name", "second_run_state"),
    [(NIGHTLY_DEPLOYMENT, "AwaitingConcurrencySlot"), (INTAKE_DEPLOYMENT, "Cancelled")],
)
def test_a_deployment_never_runs_twice_at_once(scheduling_api, served, deployment_name, second_run_state):
    """The server's own orchestration: a second run cannot start while one holds the deployment's slot."""
    with (
        temporary_settings(updates={PREFECT_API_URL: scheduling_api}),
        get_client(sync_client=True) as client,
    ):
        deployment = client.read_deployment_by_name(deployment_name)
        first = client.create_flow_run_from_deployment(deployment.id)
        second = client.create_flow_run_from_deployment(deployment.id)
        # What a runner asks before it starts a run: Pending.
        assert client.set_flow_run_state(first.id, Pending()).status.value == "ACCEPT"
        refused = client.set_flow_run_state(second.id, Pending())
        assert refused.status.value == "REJECT"
        assert refused.state.name == second_run_state
        if second_run_state == "AwaitingConcurrencySlot":
            # ENQUEUE: the second waits (Scheduled) and may start once the first leaves the slot.
            assert refused.state.type == StateType.SCHEDULED
            client.set_flow_run_state(first.id, Cancelled(), force=True)
            assert client.set_flow_run_state(second.id, Pending()).status.value == "ACCEPT"
            client.set_flow_run_state(second.id, Cancelled(), force=True)
        else:
            assert refused.state.type == StateType.CANCELLED
            client.set_flow_run_state(first.id, Cancelled(), force=True)


# --- prefect.yaml: the same deployments for a worker -------------------------------------------------------


def _schedules(schedules) -> list[tuple]:
    """What a schedule means (an interval's anchor is the time it was registered)."""
    return [
        (
            getattr(s.schedule, "cron", None),
            getattr(s.schedule, "interval", None),
            s.schedule.timezone,
            s.active,
        )
        for s in schedules
    ]


def test_prefect_yaml_deploys_what_wanfactory_serve_serves(scheduling_api, tmp_path):
    """`prefect deploy --all` from the repository root; each deployment compared with flows/serve.py's."""
    root = Path(__file__).resolve().parents[1]
    with (
        temporary_settings(updates={PREFECT_API_URL: scheduling_api}),
        get_client(sync_client=True) as client,
    ):
        client.create_work_pool(WorkPoolCreate(name="wanfactory", type="process"), overwrite=True)
    env = {
        **os.environ,
        "PREFECT_API_URL": scheduling_api,
        "PREFECT_HOME": str(tmp_path),
        "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p),
    }
    deployed = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

    expected = {f"{d.flow_name}/{d.name}": d for d in deployments(Settings())}
    with (
        temporary_settings(updates={PREFECT_API_URL: scheduling_api}),
        get_client(sync_client=True) as client,
    ):
        for name, spec in expected.items():
            got = client.read_deployment_by_name(name)
            assert (got.work_pool_name, got.pull_steps, got.paused) == ("wanfactory", [], False), name
            assert (got.entrypoint, set(got.tags), got.parameters) == (spec.entrypoint, set(spec.tags), {}), (
                name
            )
            assert got.description == spec.description, name
            assert _schedules(got.schedules) == _schedules(spec.schedules), name
            if spec.concurrency_limit is None:
                assert got.global_concurrency_limit is None, name
            else:
                assert got.global_concurrency_limit.limit == spec.concurrency_limit, name
                assert got.concurrency_options.collision_strategy == (
                    spec.concurrency_options.collision_strategy
                ), name


def test_ab_submit_reaches_the_configured_prefect_server_with_nothing_exported(
    scheduling_api, store, tmp_path
):
    """`wanfactory ab submit` with no PREFECT_* in its environment talks to the stack's server (the port
    from settings), not to a temporary server of its own."""
    with temporary_settings(updates={PREFECT_API_URL: scheduling_api}):
        deployment_id = ab_deployment().apply()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # no profile of this machine's either
    env["WANFACTORY_PREFECT_PORT"] = scheduling_api.rsplit(":", 1)[1].removesuffix("/api")
    sheet = Path(__file__).parent.parent / "catalogs" / "sample" / "ab_sheet.csv"
    submitted = subprocess.run(
        [sys.executable, "-c", "from flows.cli import app; app()", "ab", "submit", str(sheet)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr[-3000:]
    assert f"{scheduling_api.removesuffix('/api')}/runs/flow-run/" in submitted.stdout
    with (
        temporary_settings(updates={PREFECT_API_URL: scheduling_api}),
        get_client(sync_client=True) as client,
    ):
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )
    assert [run.name for run in runs] == ["ab-sneaker-social+spring-mug-launch"], [run.name for run in runs]
