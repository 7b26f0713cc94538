"""``wanfactory serve``: the project's deployments, served by one process with ``prefect.serve``.

=========================  ==========================================================================
deployment                 runs
=========================  ==========================================================================
nightly-catalog/nightly    on ``nightly_cron`` in ``nightly_timezone`` (settings); one run at a time
ab-batch/ab                when asked: ``wanfactory ab submit`` and the intake watcher start its runs
intake-watcher/intake      every ``intake_poll_seconds``: prompt sheets dropped into intake/ -> A/B runs
=========================  ==========================================================================

The process polls the Prefect server at ``PREFECT_API_URL`` for due runs of these deployments and
runs each in a subprocess of its own. Prefect's scheduler service (on in ``prefect server start``, off
in the ephemeral test server) creates the scheduled runs. Stopped (SIGTERM, Ctrl-C), Prefect's runner
pauses the deployments, so that no runs pile up while nothing serves them (best effort: on SIGTERM
Prefect 3.8.8 may exit before it paused them all); serving again registers them unpaused.
``prefect.yaml`` at the repository root declares the same deployments for a worker and work pool.
``wanfactory stack up`` starts this as a background process (``python -m flows.serve``).

Before serving, it applies the project's Prefect automations (flows/automations.py: a run whose
heartbeats stop is marked Crashed; the alerts, when ``alert_webhook_url`` is set), and the flow-run
subprocesses it starts inherit the heartbeat setting (``Settings.prefect_environment``) and the alert
threshold from its environment.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron, Interval

from flows.automations import apply_automations
from flows.intake import intake_watcher
from flows.runs import AB_DEPLOYMENT, DEPLOYMENTS, INTAKE_DEPLOYMENT, NIGHTLY_DEPLOYMENT
from infra.settings import Settings

log = logging.getLogger(__name__)


# Runs import the flows by module path ("flows.nightly.nightly_catalog"), not by file path: the flow
# subprocesses then find them wherever the process was started, as long as the package imports.
_ENTRYPOINT = EntrypointType.MODULE_PATH

# ENQUEUE, not CANCEL_NEW: a night whose run starts while the previous one still renders (a big
# catalog, a slow GPU pool) waits for it and then starts; its planning skips what the first run
# published, so it makes only what changed since, and a change never waits a full extra day.
# Two runs never render the same clips at once (the fleet's GPUs, the same clip keys).
NIGHTLY_CONCURRENCY = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
# CANCEL_NEW: a poll holds no state; the next one, seconds later, sees whatever a cancelled one would
# have, so queueing polls behind a slow one would only pile them up. Limit 1 keeps two polls from
# taking the same sheet at once.
INTAKE_CONCURRENCY = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)


def _name(deployment: str) -> str:
    return deployment.split("/", 1)[1]


def nightly_deployment(settings: Settings) -> RunnerDeployment:
    """The nightly catalog run on the configured cron and time zone; the catalog comes from settings."""
    from flows.nightly import nightly_catalog  # Ray and the engine: imported only by those who serve it

    return nightly_catalog.to_deployment(
        name=_name(NIGHTLY_DEPLOYMENT),
        schedules=[Cron(settings.nightly_cron, timezone=settings.nightly_timezone)],
        concurrency_limit=NIGHTLY_CONCURRENCY,
        tags=["nightly", "catalog"],
        description="A clip for every new or changed product of the configured catalog, every night.",
        entrypoint_type=_ENTRYPOINT,
    )


def ab_deployment() -> RunnerDeployment:
    """The A/B batch for one prompt sheet (parameter ``sheet_uri``); no schedule."""
    from flows.ab import ab_batch

    return ab_batch.to_deployment(
        name=_name(AB_DEPLOYMENT),
        tags=["ab"],
        description="Clips for every variant of an A/B prompt sheet (sheet_uri: a path or s3://bucket/key).",
        entrypoint_type=_ENTRYPOINT,
    )


def intake_deployment(settings: Settings) -> RunnerDeployment:
    """The intake watcher every ``intake_poll_seconds``, never two polls at once."""
    return intake_watcher.to_deployment(
        name=_name(INTAKE_DEPLOYMENT),
        schedules=[Interval(timedelta(seconds=settings.intake_poll_seconds))],
        concurrency_limit=INTAKE_CONCURRENCY,
        tags=["intake"],
        description="Starts an A/B run for each prompt sheet dropped into the bucket's intake/ folder.",
        entrypoint_type=_ENTRYPOINT,
    )


def deployments(settings: Settings) -> list[RunnerDeployment]:
    """Every deployment ``wanfactory serve`` serves, built from ``settings``."""
    return [nightly_deployment(settings), ab_deployment(), intake_deployment(settings)]


def serve_all(settings: Settings | None = None) -> None:
    """Apply the automations, register the deployments with the Prefect server and run their runs until
    stopped (SIGTERM, Ctrl-C)."""
    settings = settings or Settings()
    # Prefect's runner starts each flow run as a subprocess with this process's environment.
    os.environ.update(settings.prefect_environment())
    apply_automations(settings)
    log.info(
        "serving deployments=%s nightly_cron=%r nightly_timezone=%s intake_poll_seconds=%d "
        "flow_heartbeat_seconds=%d zombie_window_seconds=%d",
        ",".join(DEPLOYMENTS),
        settings.nightly_cron,
        settings.nightly_timezone,
        settings.intake_poll_seconds,
        settings.flow_heartbeat_seconds,
        settings.zombie_window_seconds,
    )
    serve(*deployments(settings))


if __name__ == "__main__":
    # What `wanfactory stack up` starts: the same interpreter as its caller, whatever PATH holds.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    serve_all()
