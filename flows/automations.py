"""The Prefect automations wanfactory declares, and deploying them idempotently.

``crash-zombie-runs`` (Prefect's "detect zombie flows" recipe): every run of our flows emits a
``prefect.flow-run.heartbeat`` event every ``flow_heartbeat_seconds`` (settings; the wanfactory commands
pass it to Prefect as ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``). A proactive trigger expects, after each
heartbeat, another heartbeat or a terminal state within ``zombie_window_seconds``, per flow run; when
none comes (the driver was SIGKILLed, its machine lost, its container evicted), the run is set to
Crashed with a message that says so. Prefect's server evaluates it (its triggers and actions services,
on in ``prefect server start`` and in the ephemeral test server alike); no timer of ours is involved. A
run that already ended is never changed: Prefect refuses Crashed after a terminal state.

Deployed by ``wanfactory serve`` as it starts (so ``wanfactory stack up`` has it), and by
``wanfactory automations apply`` where a Prefect worker runs the deployments of ``prefect.yaml``.
Applying is idempotent: an automation of the same name that already says the same is left alone (its
pending windows too), one that differs is updated in place, duplicates are removed.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

from flows.runs import DEPLOYMENTS
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


AUTOMATIONS = (ZOMBIE_AUTOMATION,)


def automations(settings: Settings) -> list[AutomationCore]:
    """Every automation the project declares, by the names of :data:`AUTOMATIONS`."""
    return [zombie_automation(settings)]


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


def apply_automations(settings: Settings | None = None) -> dict[str, str]:
    """Create or update the declared automations on the Prefect server at ``PREFECT_API_URL``.

    Returns what was done, by name: ``created``, ``updated`` or ``unchanged``. An unchanged automation
    is not written, so the windows it has open (runs whose next heartbeat is awaited) stay open. An
    update (a new window, say) starts them afresh: a live run's next heartbeat opens a new one, but a
    run that had already died before it stays Running (mark it by hand in the UI).
    """
    settings = settings or Settings()
    done: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        for wanted in automations(settings):
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
            log.info("automation %s name=%r", done[wanted.name], wanted.name)
    return done


def delete_automations() -> int:
    """Remove the declared automations (by name) from the Prefect server; returns how many went."""
    removed = 0
    with get_client(sync_client=True) as client:
        for name in AUTOMATIONS:
            for found in client.read_automations_by_name(name):
                client.delete_automation(found.id)
                removed += 1
    return removed
