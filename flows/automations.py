"""The Prefect automations wanfactory declares, and deploying them idempotently.

``crash-zombie-runs`` (Prefect's "detect zombie flows" recipe): every run of our flows emits a
``prefect.flow-run.heartbeat`` event every ``flow_heartbeat_seconds`` (settings; the wanfactory commands
pass it to Prefect as ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``). A proactive trigger expects, after each
heartbeat, another heartbeat or a terminal state within ``zombie_window_seconds``, per flow run; when
none comes (the driver was SIGKILLed, its machine lost, its container evicted), the run is set to
Crashed with a message that says so. Prefect's server evaluates it (its triggers and actions services,
on in ``prefect server start`` and in the ephemeral test server alike); no timer of ours is involved. A
run that already ended is never changed: Prefect refuses Crashed after a terminal state.

The alerts, when ``alert_webhook_url`` is set: both send a notification through one Prefect notification
block (``wanfactory-alerts``, a Custom Webhook block that POSTs JSON ``{"text", "subject", "body"}`` to the
URL, which it keeps as a secret value) for runs of the flows that make clips (nightly-catalog, ab-batch):

* :data:`FAILED_RUN_ALERT`: a run ends Failed or Crashed (Prefect's own state events). The message is the
  run's state message: for clips that failed for the infrastructure, the counts (flows.common.final_state);
  for a zombie, the zombie automation's message; otherwise the error.
* :data:`INFRA_FAILURE_ALERT`: a run ends with more than ``alert_infra_failure_share`` of the clips
  it set out to make failed for the infrastructure. The run itself applies that rule where its counts are
  (flows.common.RunResult) and emits :data:`INFRA_FAILURE_SHARE_EVENT` with them; Prefect's triggers match
  events by name and resource, never by a number in a payload, so the rule cannot live in the trigger.
  Today any clip that fails for the infrastructure also fails its run, so such a run sends both alerts;
  this one names the share and the threshold.

Deployed by ``wanfactory serve`` as it starts (so ``wanfactory stack up`` has it), and by
``wanfactory automations apply`` where a Prefect worker runs the deployments of ``prefect.yaml``.
Applying is idempotent: an automation of the same name that already says the same is left alone (its
pending windows too), one that differs is updated in place, duplicates are removed; the notification
block is written only when its URL or body changed, in place (its id, which the alerts name, stays).
Without ``alert_webhook_url`` the alert automations and their block are deleted.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Any
from uuid import UUID

from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState, SendNotification
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.exceptions import ObjectNotFound
from pydantic import SecretStr

from flows.runs import AB_DEPLOYMENT, DEPLOYMENTS, NIGHTLY_DEPLOYMENT
from infra.settings import Settings

log = logging.getLogger(__name__)

ZOMBIE_AUTOMATION = "wanfactory: crash runs whose heartbeats stopped"
HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
# What ends a run's heartbeats legitimately: a final state (each is an event the server emits).
TERMINAL_EVENTS = tuple(
    f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")
)
# Our flows only, by name ("nightly-catalog", "ab-batch", "intake-watcher"): a Prefect server shared with
# other teams keeps their runs to their own rules.
FLOW_NAMES = tuple(sorted({deployment.split("/", 1)[0] for deployment in DEPLOYMENTS}))

FAILED_RUN_ALERT = "wanfactory: alert when a run ends Failed or Crashed"
INFRA_FAILURE_ALERT = "wanfactory: alert when a run's infrastructure failures pass the threshold"
ALERT_BLOCK = "wanfactory-alerts"  # the notification block's name
# What a run emits when more than alert_infra_failure_share of its clips failed for the infrastructure.
INFRA_FAILURE_SHARE_EVENT = "wanfactory.run.infra-failure-share-exceeded"
ALERT_EVENTS = ("prefect.flow-run.Failed", "prefect.flow-run.Crashed")
# The flows that make clips; the intake watcher runs every intake_poll_seconds and makes none.
ALERTED_FLOW_NAMES = tuple(sorted(d.split("/", 1)[0] for d in (NIGHTLY_DEPLOYMENT, AB_DEPLOYMENT)))
# The run's page, where the Prefect server knows its UI's address (PREFECT_UI_URL on the server).
_RUN_LINK = "{% set link = flow_run|ui_url %}{% if link %}\nPrefect UI: {{ link }}{% endif %}"
ALERTS_OFF = "alerts off: WANFACTORY_ALERT_WEBHOOK_URL is not set, so no alert automations"


def zombie_message(settings: Settings) -> str:
    return (
        f"no heartbeat for {settings.zombie_window_seconds} s (a run sends one every "
        f"{settings.flow_heartbeat_seconds} s): its process died (killed, out of memory, machine lost). "
        "Clips it published are skipped by the next run, which makes the rest; its last manifest "
        "checkpoint (complete: false) is under runs/<run_id>/"
    )


def zombie_automation(settings: Settings) -> AutomationCore:
    """The automation that marks a run of our flows Crashed once its heartbeats stop."""
    trigger = EventTrigger(
        match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
        match_related=ResourceSpecification(
            {"prefect.resource.role": "flow", "prefect.resource.name": list(FLOW_NAMES)}
        ),
        after={HEARTBEAT_EVENT},
        expect={HEARTBEAT_EVENT, *TERMINAL_EVENTS},
        for_each={"prefect.resource.id"},  # one window per flow run
        posture=Posture.Proactive,
        threshold=1,
        within=timedelta(seconds=settings.zombie_window_seconds),
    )
    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description=(
            f"Marks a run of {', '.join(FLOW_NAMES)} Crashed when no heartbeat or final state follows its "
            f"last heartbeat within {settings.zombie_window_seconds} s (declared in flows/automations.py)."
        ),
        enabled=True,
        trigger=trigger,
        # Not forced: Prefect then refuses to turn a run that already ended into a Crashed one.
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=zombie_message(settings))],
    )


def alert_block(url: SecretStr) -> CustomWebhookNotificationBlock:
    """The notification block the alerts send through: a POST of JSON that Slack's, Mattermost's and Teams'
    incoming webhooks read as ``text``, and any other receiver as ``subject`` and ``body``."""
    return CustomWebhookNotificationBlock(
        name=ALERT_BLOCK,
        # The URL only as a secret value, put in at send time: Prefect shows the block's secrets to no
        # one (its API and UI mask them), and a Slack or Teams webhook URL is its own credential.
        url="{{url}}",
        secrets={"url": url.get_secret_value()},
        json_data={"text": "{{subject}}\n{{body}}", "subject": "{{subject}}", "body": "{{body}}"},
    )


def _our_runs(events: set[str]) -> EventTrigger:
    """A trigger that fires once for each of ``events`` about a run of :data:`ALERTED_FLOW_NAMES`."""
    return EventTrigger(
        match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
        match_related=ResourceSpecification(
            {"prefect.resource.role": "flow", "prefect.resource.name": list(ALERTED_FLOW_NAMES)}
        ),
        expect=events,
        for_each={"prefect.resource.id"},
        posture=Posture.Reactive,
        threshold=1,
        within=timedelta(0),
    )


def failed_run_alert(block_id: UUID) -> AutomationCore:
    """Notify when a run of ours ends Failed or Crashed, with its state message (which has the counts)."""
    return AutomationCore(
        name=FAILED_RUN_ALERT,
        description=(
            f"Notifies through the block {ALERT_BLOCK!r} when a run of {', '.join(ALERTED_FLOW_NAMES)} ends "
            "Failed or Crashed (declared in flows/automations.py)."
        ),
        enabled=True,
        trigger=_our_runs(set(ALERT_EVENTS)),
        actions=[
            SendNotification(
                block_document_id=block_id,
                subject="wanfactory: {{ flow.name }} run {{ flow_run.name }} ended {{ flow_run.state.name }}",
                body=(
                    "Run {{ flow_run.name }} of {{ flow.name }} ended {{ flow_run.state.name }}: "
                    "{{ flow_run.state.message }}" + _RUN_LINK
                ),
            )
        ],
    )


def infra_failure_alert(block_id: UUID) -> AutomationCore:
    """Notify when a run of ours says too many of its clips failed for the infrastructure (its event's
    payload has the counts, the share and the threshold: flows.common.final_state)."""
    return AutomationCore(
        name=INFRA_FAILURE_ALERT,
        description=(
            f"Notifies through the block {ALERT_BLOCK!r} when a run of {', '.join(ALERTED_FLOW_NAMES)} emits "
            f"{INFRA_FAILURE_SHARE_EVENT}: more than WANFACTORY_ALERT_INFRA_FAILURE_SHARE of its clips "
            "failed for the infrastructure (declared in flows/automations.py)."
        ),
        enabled=True,
        trigger=_our_runs({INFRA_FAILURE_SHARE_EVENT}),
        actions=[
            SendNotification(
                block_document_id=block_id,
                subject="wanfactory: {{ flow.name }} run {{ flow_run.name }}: {{ event.payload.reason }}",
                body=(
                    "Run {{ flow_run.name }} of {{ flow.name }} (run id {{ event.payload.run_id }}): "
                    "{{ event.payload.reason }}. {{ event.payload.summary }}. "
                    "Manifest: {{ event.payload.manifest }}" + _RUN_LINK
                ),
            )
        ],
    )


AUTOMATIONS = (ZOMBIE_AUTOMATION, FAILED_RUN_ALERT, INFRA_FAILURE_ALERT)


def automations(settings: Settings, alert_block_id: UUID | None = None) -> list[AutomationCore]:
    """Every automation the project declares with these settings, by the names of :data:`AUTOMATIONS`: the
    alerts when ``alert_webhook_url`` is set and their notification block's id is given."""
    declared = [zombie_automation(settings)]
    if settings.alert_webhook_url is not None and alert_block_id is not None:
        declared += [failed_run_alert(alert_block_id), infra_failure_alert(alert_block_id)]
    return declared


def _comparable(automation: AutomationCore) -> str:
    """What an automation says, without what the server adds (its id, timestamps), as canonical JSON."""
    fields = set(AutomationCore.model_fields)
    data = AutomationCore.model_validate(automation.model_dump(include=fields)).model_dump(mode="json")
    return json.dumps(_canonical(data), sort_keys=True)


def _canonical(value: Any) -> Any:
    """Sets (``after``, ``expect``, ``for_each``) come back as lists in any order: sort every list."""
    if isinstance(value, dict):
        return {key: _canonical(item) for key, item in value.items()}
    if isinstance(value, list):
        return sorted((_canonical(item) for item in value), key=lambda item: json.dumps(item, sort_keys=True))
    return value


def _saved_alert_block(client: SyncPrefectClient, url: SecretStr) -> tuple[UUID, str]:
    """The notification block's id, written only when it differs from what it should hold; and what was
    done. Never logs or returns the URL."""
    wanted = alert_block(url)
    try:
        found = client.read_block_document_by_name(
            ALERT_BLOCK, block_type_slug=wanted.get_block_type_slug(), include_secrets=True
        )
    except ObjectNotFound:
        return wanted.save(ALERT_BLOCK), "created"
    data = wanted.model_dump(mode="json", context={"include_secrets": True}, exclude={"block_type_slug"})
    if found.data == data:
        return found.id, "unchanged"
    return wanted.save(ALERT_BLOCK, overwrite=True), "updated"


def _delete_alert_block(client: SyncPrefectClient) -> bool:
    try:
        found = client.read_block_document_by_name(
            ALERT_BLOCK, block_type_slug=CustomWebhookNotificationBlock.get_block_type_slug()
        )
    except ObjectNotFound:
        return False
    client.delete_block_document(found.id)
    return True


def apply_automations(settings: Settings | None = None) -> dict[str, str]:
    """Create, update or delete the declared automations on the Prefect server at ``PREFECT_API_URL``.

    Returns what was done, by name: ``created``, ``updated``, ``unchanged`` or ``deleted`` (the alerts,
    once ``alert_webhook_url`` is unset), and the same for the notification block. An unchanged
    automation is not written, so the windows it has open (runs whose next heartbeat is awaited) stay
    open. An update (a new window, say) starts them afresh: a live run's next heartbeat opens a new one,
    but a run that had already died before it stays Running (mark it by hand in the UI).
    """
    settings = settings or Settings()
    done: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        block_id = None
        if settings.alert_webhook_url is not None:
            block_id, done[f"block {ALERT_BLOCK}"] = _saved_alert_block(client, settings.alert_webhook_url)
        else:
            log.info(ALERTS_OFF)
        declared = automations(settings, block_id)
        for wanted in declared:
            found = client.read_automations_by_name(wanted.name)  # newest first
            for duplicate in found[1:]:
                client.delete_automation(duplicate.id)
            if not found:
                client.create_automation(wanted)
                done[wanted.name] = "created"
            elif _comparable(found[0]) != _comparable(wanted):
                client.update_automation(found[0].id, wanted)
                done[wanted.name] = "updated"
            else:
                done[wanted.name] = "unchanged"
        for name in sorted(set(AUTOMATIONS) - {wanted.name for wanted in declared}):
            for found in client.read_automations_by_name(name):
                client.delete_automation(found.id)
                done[name] = "deleted"
        if block_id is None and _delete_alert_block(client):
            done[f"block {ALERT_BLOCK}"] = "deleted"
    for name, action in done.items():
        log.info("automation %s name=%r", action, name)
    return done


def delete_automations() -> int:
    """Remove the declared automations (by name) and the alerts' notification block from the Prefect
    server; returns how many automations went."""
    removed = 0
    with get_client(sync_client=True) as client:
        for name in AUTOMATIONS:
            for found in client.read_automations_by_name(name):
                client.delete_automation(found.id)
                removed += 1
        _delete_alert_block(client)
    return removed
