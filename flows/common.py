"""What every flow shares: run ids, the run's name and tags in the UI, and rendering a plan on the fleet."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial

import ray
from prefect.client.orchestration import get_client
from prefect.events import emit_event
from prefect.runtime import flow_run
from prefect.states import Failed, State

from flows.automations import INFRA_FAILURE_SHARE_EVENT
from infra.settings import Settings
from tasks import metrics
from tasks.fleet import FleetStartError, actor_groups, connect_ray, plan_fleets
from tasks.manifest import ManifestLocation
from tasks.planning import Plan
from tasks.publish import FinishingContext
from tasks.records import ClipSpec, ClipStatus, ManifestEntry, ReasonClass, failed_entry
from tasks.units import RunProgress, render_batch_task, start_fleet_task, write_manifest_task


@dataclass(frozen=True)
class Rendering:
    """What rendering a plan produced: an entry per planned row (made, skipped, rejected or refused),
    and what each generator actor cost to start."""

    entries: list[ManifestEntry]
    load_seconds: dict[str, float]  # worker -> seconds to load and warm up its model


@dataclass(frozen=True)
class RunResult:
    run_id: str
    flow_run_id: str
    manifest: ManifestLocation
    entries: list[ManifestEntry]
    load_seconds: dict[str, float]  # worker -> seconds to load and warm up its model

    def infrastructure_failures(self) -> Counter[str]:
        """Clips that failed for the infrastructure, not their input, by the stage they stopped at."""
        return Counter(e.stage for e in self.entries if e.reason_class == ReasonClass.INFRASTRUCTURE)

    def clips_set_out(self) -> int:
        """The clips the run set out to make: every entry but rows rejected for their input, clips already
        published (skipped) and clips held back for a later run (planned)."""
        return sum(
            1
            for e in self.entries
            if e.status not in (ClipStatus.SKIPPED, ClipStatus.PLANNED)
            and e.reason_class != ReasonClass.INPUT
        )

    def infrastructure_failure_share(self) -> float:
        """The share of :meth:`clips_set_out` that failed for the infrastructure (0 when there were none)."""
        set_out = self.clips_set_out()
        return sum(self.infrastructure_failures().values()) / set_out if set_out else 0.0

    def exceeds_infrastructure_failure_share(self, threshold: float) -> bool:
        """The alert rule (``alert_infra_failure_share``): more than ``threshold`` of the clips it set out
        to make failed for the infrastructure."""
        return self.infrastructure_failure_share() > threshold

    def summary(self) -> str:
        """Every count of the run in one line, for people: its state message and its alerts."""
        counts = self.manifest.counts
        statuses = ", ".join(f"{counts.get(status, 0)} {status}" for status in ClipStatus)
        failures = sum(self.infrastructure_failures().values())
        return (
            f"{statuses}; {failures} of the {self.clips_set_out()} clips it set out to make failed for the "
            f"infrastructure ({self.infrastructure_failure_share():.0%})"
        )


def final_state(result: RunResult, settings: Settings) -> RunResult | State:
    """What a run flow returns: its result, or, when clips failed for the infrastructure (a model that
    would not load, generation, post-production, storage), a Failed state that says so with the counts
    and still carries the result. Rows rejected for their own input never fail the run.

    When more than ``alert_infra_failure_share`` of its clips failed for the infrastructure, the run also
    emits :data:`~flows.automations.INFRA_FAILURE_SHARE_EVENT` with its counts, for the alert automation.
    """
    if result.exceeds_infrastructure_failure_share(settings.alert_infra_failure_share):
        _emit_infrastructure_failure_share_event(result, settings)
    failures = result.infrastructure_failures()
    if not failures:
        return result
    stages = ", ".join(f"{count} at {stage}" for stage, count in sorted(failures.items()))
    message = (
        f"{sum(failures.values())} clips failed for the infrastructure, not their input ({stages}); "
        f"run {result.run_id}: {result.summary()}"
    )
    return Failed(message=message, data=result)


def _emit_infrastructure_failure_share_event(result: RunResult, settings: Settings) -> None:
    """The event the infrastructure-failure alert fires on: about the flow run (Prefect adds its flow,
    deployment and tags as related resources), with the counts in its payload."""
    share, threshold = result.infrastructure_failure_share(), settings.alert_infra_failure_share
    emit_event(
        INFRA_FAILURE_SHARE_EVENT,
        resource={"prefect.resource.id": f"prefect.flow-run.{result.flow_run_id}"},
        payload={
            "run_id": result.run_id,
            "counts": {status.value: result.manifest.counts.get(status, 0) for status in ClipStatus},
            "infrastructure_failures": dict(result.infrastructure_failures()),
            "clips_set_out": result.clips_set_out(),
            "infrastructure_failure_share": share,
            "threshold": threshold,
            "reason": (
                f"{share:.0%} of the clips it set out to make failed for the infrastructure, more than the "
                f"alert threshold of {threshold:.0%}"
            ),
            "summary": result.summary(),
            "manifest": f"s3://{settings.s3_bucket}/{result.manifest.json_key}",
        },
    )


def new_run_id() -> str:
    """Sortable and unique: the start time and the flow run's id."""
    started = datetime.now(UTC)
    return f"{started:%Y%m%dT%H%M%SZ}-{str(flow_run.get_id() or 'local')[:8]}"


def label_flow_run(name: str | None = None, tags: Sequence[str] = ()) -> None:
    """Rename the running flow run and add tags, once the flow knows what it is about (a sheet's
    experiments are known only after reading it), so people find it in the UI."""
    run_id = flow_run.get_id()
    if run_id is None:
        return
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(run_id)
        client.update_flow_run(run_id, name=name or current.name, tags=sorted({*current.tags, *tags}))


def render_plan(
    plan: Plan,
    settings: Settings,
    run_id: str,
    source_uri: str,
    finishing: FinishingContext,
    logger: logging.Logger | logging.LoggerAdapter,
) -> Rendering:
    """Generate, post-process and publish the plan's clips, with a progress bar and artifact as they
    end; one manifest entry per planned row, whatever happens.

    A checkpoint of the manifest (``complete: false``) is written before the first clip, after each
    render batch, and within a batch as a clip ends once ``manifest_checkpoint_seconds`` have passed
    since the last one, so a run that dies (its driver killed) leaves a record of what it planned and
    published up to a minute or so before.
    """
    checkpoint = _Checkpoints(run_id, source_uri, plan.entries, settings)
    progress = RunProgress(len(plan.clips), f"run {run_id}")
    try:
        if plan.clips:
            checkpoint.write([])
        made = _render_clips(plan.clips, settings, run_id, finishing, progress, logger, checkpoint)
    finally:
        progress.close()
    # The rows that never reached a fleet (render_batch_task counts the clips that did).
    for entry in plan.entries:
        metrics.clip_ended(entry)
    return Rendering([*plan.entries, *made.entries], made.load_seconds)


class _Checkpoints:
    """The run's manifest checkpoints: what was planned, and every clip ended so far."""

    def __init__(self, run_id: str, source_uri: str, planned: Sequence[ManifestEntry], settings: Settings):
        self.run_id, self.source_uri, self.planned, self.settings = run_id, source_uri, planned, settings
        self.last = time.monotonic()

    def write(self, made: Sequence[ManifestEntry]) -> None:
        entries = [*self.planned, *made]
        write_manifest_task(self.run_id, self.source_uri, entries, self.settings, complete=False)
        self.last = time.monotonic()

    def clip_ended(self, before: Sequence[ManifestEntry], batch: Sequence[ManifestEntry]) -> None:
        """As a clip of a batch ends: a checkpoint of the clips ``before`` the batch and the ``batch``'s so
        far, once ``manifest_checkpoint_seconds`` have passed since the last one."""
        if time.monotonic() - self.last >= self.settings.manifest_checkpoint_seconds:
            self.write([*before, *batch])


def _render_clips(
    clips: Sequence[ClipSpec],
    settings: Settings,
    run_id: str,
    finishing: FinishingContext,
    progress: RunProgress,
    logger: logging.Logger | logging.LoggerAdapter,
    checkpoint: _Checkpoints,
) -> Rendering:
    """An entry per clip, and the load time of every actor that made them."""
    rendering = Rendering([], {})
    if not clips:
        return rendering
    connect_ray(settings)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    entries = rendering.entries
    # One group of actors per loadout: a model, and the adapters its recipe fuses into the weights.
    groups = actor_groups(clips, settings.adapter_slot_rank)
    clip_counts = Counter(clip.loadout.name for clip in clips)
    for shape in plan_fleets(clip_counts, gpus, settings.cpu_actors_per_model, settings.actor_num_cpus):
        batch_clips = [clip for clip in clips if clip.loadout.name in shape.actors]
        try:
            fleet = start_fleet_task(shape, groups, settings, run_id, finishing)
        except FleetStartError as err:
            logger.error("%s", err)
            failed = [failed_entry(clip, run_id, "load", str(err)) for clip in batch_clips]
            for entry in failed:
                metrics.clip_ended(entry)
            entries += failed
            progress.advance(len(batch_clips))
            continue
        rendering.load_seconds.update(fleet.load_seconds)
        try:
            for start in range(0, len(batch_clips), settings.clips_per_task):
                clip_ended = partial(checkpoint.clip_ended, list(entries))
                entries += render_batch_task(
                    fleet, batch_clips[start : start + settings.clips_per_task], progress, clip_ended
                )
                checkpoint.write(entries)
        finally:
            fleet.shutdown()
    return rendering
