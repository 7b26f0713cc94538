"""Alerts (flows/automations.py): a run of ours that ends Failed or Crashed, or whose clips failed for the
infrastructure beyond the threshold, is announced through a Prefect notification block to a webhook.

End to end on a real ``prefect server start`` (its triggers and actions services deliver the
notifications), the session's S3 server and Ray: ``wanfactory automations apply`` with the webhook URL
pointing at an HTTP receiver on 127.0.0.1, then ``wanfactory run nightly`` on a catalog whose model does
not load, as a person or cron would start them. The rule of the infrastructure-failure share is also
checked on its own, on counts no real run can reach today (a run with such failures always ends Failed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit
from uuid import uuid4

import pytest
from pydantic import SecretStr

from flows.automations import (
    ALERT_BLOCK,
    ALERT_EVENTS,
    ALERTS_OFF,
    FAILED_RUN_ALERT,
    INFRA_FAILURE_ALERT,
    INFRA_FAILURE_SHARE_EVENT,
    ZOMBIE_AUTOMATION,
    alert_block,
    apply_automations,
    automations,
)
from flows.common import RunResult
from flows.runs import AB_DEPLOYMENT, NIGHTLY_DEPLOYMENT
from infra.processes import free_ports, http_ok, tail, wait_until
from infra.settings import Settings
from tasks.manifest import ManifestLocation, status_counts
from tasks.records import ClipStatus, ManifestEntry
from tests.catalog_upload import upload_catalog
from tests.cli_process import run_wanfactory

ROOT = Path(__file__).resolve().parents[1]
BLOCK = f"block {ALERT_BLOCK}"


# --- the rule and the declarations, no services ---------------------------------------------------


def _result(*outcomes: tuple[ClipStatus, str]) -> RunResult:
    entries = [
        ManifestEntry(run_id="run-1", row=row, sku=f"SKU-{row}", status=status, stage=stage)
        for row, (status, stage) in enumerate(outcomes)
    ]
    manifest = ManifestLocation(
        "runs/run-1/manifest.parquet", "runs/run-1/manifest.json", status_counts(entries)
    )
    return RunResult("run-1", str(uuid4()), manifest, entries, {})


def test_the_share_counts_only_the_clips_the_run_set_out_to_make():
    result = _result(
        (ClipStatus.PUBLISHED, "publish"),
        (ClipStatus.PUBLISHED, "publish"),
        (ClipStatus.QUARANTINED, "content_filter"),
        (ClipStatus.FAILED, "upload"),
        (ClipStatus.FAILED, "load"),
        # Not set out to make: rows rejected for their input, clips already published or held back.
        (ClipStatus.FAILED, "validate"),
        (ClipStatus.FAILED, "plan"),
        (ClipStatus.SKIPPED, "plan"),
        (ClipStatus.PLANNED, "plan"),
    )
    assert result.clips_set_out() == 5 and result.infrastructure_failure_share() == pytest.approx(0.4)
    # More than the threshold, not as much: 0.4 alerts at 0.39, not at 0.4.
    assert result.exceeds_infrastructure_failure_share(0.39)
    assert not result.exceeds_infrastructure_failure_share(0.4)
    assert result.summary() == (
        "2 published, 1 skipped, 1 quarantined, 4 failed, 1 planned; "
        "2 of the 5 clips it set out to make failed for the infrastructure (40%)"
    )
    # A run that set out to make nothing (everything skipped) never alerts, even at a threshold of 0.
    nothing = _result((ClipStatus.SKIPPED, "plan"), (ClipStatus.FAILED, "validate"))
    assert nothing.infrastructure_failure_share() == 0 and not nothing.exceeds_infrastructure_failure_share(0)
    assert Settings(_env_file=None).alert_infra_failure_share == 0.1


def test_the_alerts_are_declared_only_with_a_webhook_url_which_stays_secret():
    assert [a.name for a in automations(Settings(_env_file=None), uuid4())] == [ZOMBIE_AUTOMATION]

    url = "https://hooks.slack.com/services/T000/B000/token-in-the-url"
    settings = Settings(_env_file=None, alert_webhook_url=url)
    assert str(settings.alert_webhook_url) == "**********"
    block_id = uuid4()
    declared = {a.name: a for a in automations(settings, block_id)}
    assert list(declared) == [ZOMBIE_AUTOMATION, FAILED_RUN_ALERT, INFRA_FAILURE_ALERT]
    alerted_flows = sorted(d.split("/")[0] for d in (NIGHTLY_DEPLOYMENT, AB_DEPLOYMENT))
    for name, events in (
        (FAILED_RUN_ALERT, set(ALERT_EVENTS)),
        (INFRA_FAILURE_ALERT, {INFRA_FAILURE_SHARE_EVENT}),
    ):
        trigger = declared[name].trigger
        assert trigger.posture == "Reactive" and trigger.threshold == 1 and trigger.expect == events
        # Runs of the flows that make clips, not the intake watcher's polls.
        assert sorted(trigger.match_related.model_dump()["prefect.resource.name"]) == alerted_flows
        (action,) = declared[name].actions
        assert (action.type, action.block_document_id) == ("send-notification", block_id)
    # The URL is in no automation, and in the block only as a secret value.
    assert "token-in-the-url" not in json.dumps([a.model_dump(mode="json") for a in declared.values()])
    block = alert_block(SecretStr(url))
    assert "token-in-the-url" not in json.dumps(block.model_dump(mode="json"))
    assert block.secrets.get_secret_value() == {"url": url}


# --- end to end on a real Prefect server ----------------------------------------------------------


class _Receiver:
    """An HTTP server on 127.0.0.1 that records every POST it gets: the webhook the alerts go to."""

    def __init__(self) -> None:
        posts: list[tuple[str, dict]] = []
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    posts.append((self.path, body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:  # quiet: the test reports what it got
                pass

        self.posts, self._lock = posts, lock
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        # The secret part of a real webhook URL is its path (Slack: /services/T…/B…/<token>).
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/{uuid4().hex}"

    def received(self) -> list[tuple[str, dict]]:
        with self._lock:
            return list(self.posts)


@pytest.fixture(scope="module")
def receiver() -> Iterator[_Receiver]:
    receiver = _Receiver()
    yield receiver
    receiver.server.shutdown()


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory) -> Iterator[str]:
    """A real ``prefect server start`` with its services (triggers, actions), as production runs it."""
    home = tmp_path_factory.mktemp("prefect-alerts")
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_UI_URL": url,  # what the alerts' links to a run's page are made of
    }
    env.pop("PREFECT_API_URL", None)
    log = home / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            cwd=home,  # no prefect.toml or .env of the caller's
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        ready = wait_until(
            lambda: http_ok(f"{url}/api/health"), 120, 0.5, alive=lambda: server.poll() is None
        )
        assert ready, f"prefect server did not start:\n{tail(log)}"
        yield f"{url}/api"
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.mark.services  # starts its own Prefect server
@pytest.mark.usefixtures("ray_cluster")
def test_a_run_that_fails_for_the_infrastructure_is_announced_with_its_name_and_counts(
    store, prefect_api, receiver
):
    import ray
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    rows = [
        {"sku": f"ALR-{n}", "title": f"Product {n}", "description": "A mug.", "style": "studio"}
        for n in range(3)
    ]
    # A row rejected for its own input: failed, but no infrastructure failure, and not a clip set out to make.
    rows.append({"sku": "ALR-BAD", "title": "Bad", "description": "A mug.", "style": "no-such-style"})
    catalog = upload_catalog(
        store, "catalogs/alerts/catalog.parquet", rows, datetime(2026, 12, 1, tzinfo=UTC)
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PREFECT_API_URL": prefect_api,
        "WANFACTORY_ALERT_WEBHOOK_URL": receiver.url,
        # The run: the session's Ray, and a model root with no model in it (every clip fails at load).
        "WANFACTORY_RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "RAY_AUTH_MODE": "disabled",
        "WANFACTORY_MODEL_ROOT": store.uri("models/none-here"),
    }
    applied = run_wanfactory("automations", "apply", env=env, timeout=120)
    assert applied.returncode == 0, applied.stderr[-3000:]
    for name in (BLOCK, ZOMBIE_AUTOMATION, FAILED_RUN_ALERT, INFRA_FAILURE_ALERT):
        assert f"created   {name}" in applied.stdout, applied.stdout
    assert receiver.url.rsplit("/", 1)[1] not in applied.stdout + applied.stderr  # the URL's secret part

    run = run_wanfactory("run", "nightly", "--catalog", catalog, env=env, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 1 and "3 clips failed for the infrastructure" in output, output[-3000:]

    with temporary_settings(updates={PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        (flow_run,) = client.read_flow_runs()
    assert flow_run.state.is_failed()
    counts = "0 published, 0 skipped, 0 quarantined, 4 failed, 0 planned"
    share = "3 of the 3 clips it set out to make failed for the infrastructure (100%)"
    link = f"Prefect UI: {prefect_api.removesuffix('/api')}/runs/flow-run/{flow_run.id}"

    wait_until(lambda: len(receiver.received()) >= 2, 90, 0.5)
    posts = receiver.received()
    assert len(posts) == 2, f"{len(posts)} notifications:\n{posts}"
    assert {path for path, _ in posts} == {urlsplit(receiver.url).path}  # the URL from the secret
    by_subject = {body["subject"]: body for _, body in posts}
    failed = by_subject[f"wanfactory: nightly-catalog run {flow_run.name} ended Failed"]
    assert failed["body"].startswith(f"Run {flow_run.name} of nightly-catalog ended Failed: 3 clips failed")
    assert f"{counts}; {share}" in failed["body"] and failed["body"].endswith(link), failed["body"]
    assert failed["text"] == f"{failed['subject']}\n{failed['body']}"  # what Slack and Teams show

    reason = (
        "100% of the clips it set out to make failed for the infrastructure, "
        "more than the alert threshold of 10%"
    )
    infra = by_subject[f"wanfactory: nightly-catalog run {flow_run.name}: {reason}"]
    assert f"{reason}. {counts}; {share}. Manifest: s3://" in infra["body"], infra["body"]
    assert infra["body"].endswith(link), infra["body"]


@pytest.mark.services  # starts its own Prefect server
def test_applying_is_idempotent_and_no_url_means_no_alerts(prefect_api, receiver, caplog):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with_url = Settings(_env_file=None, alert_webhook_url=receiver.url)
    other_url = Settings(_env_file=None, alert_webhook_url=f"{receiver.url}-rotated")
    without = Settings(_env_file=None)
    alerts = (FAILED_RUN_ALERT, INFRA_FAILURE_ALERT)
    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        apply_automations(with_url)
        block_id = _alert_block_id()
        assert apply_automations(with_url) == dict.fromkeys((BLOCK, ZOMBIE_AUTOMATION, *alerts), "unchanged")
        # A new URL (a rotated token) rewrites the block in place: the alerts still name it.
        assert apply_automations(other_url) == {
            BLOCK: "updated",
            ZOMBIE_AUTOMATION: "unchanged",
        } | dict.fromkeys(alerts, "unchanged")
        assert _alert_block_id() == block_id
        assert _automation_names() == {ZOMBIE_AUTOMATION, *alerts}

        with caplog.at_level("INFO", logger="flows.automations"):
            assert apply_automations(without) == {ZOMBIE_AUTOMATION: "unchanged"} | dict.fromkeys(
                (*alerts, BLOCK), "deleted"
            )
        assert ALERTS_OFF in caplog.messages
        assert _automation_names() == {ZOMBIE_AUTOMATION} and _alert_block_id() is None
        assert apply_automations(without) == {ZOMBIE_AUTOMATION: "unchanged"}
    assert "-rotated" not in caplog.text and receiver.url not in caplog.text


def _automation_names() -> set[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {automation.name for automation in client.read_automations()}


def _alert_block_id():
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_block_document_by_name(ALERT_BLOCK, block_type_slug="custom-webhook").id
        except ObjectNotFound:
            return None
