"""The Prefect tasks of a run: thin units over catalogs, planning, the fleet and the manifest.

Granularity is chosen for big catalogs: one task loads, one plans, one renders each
batch of ``clips_per_task`` clips (a 10,000-row catalog is ~160 render tasks, not
10,000), and one writes the manifest. Per-clip status lives in the artifacts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

from catalogs.schema import ValidatedCatalog
from catalogs.sheets import SheetReadResult, load_prompt_sheet
from catalogs.sources import load_catalog
from infra.objectstore import ObjectStore
from infra.processes import wait_until
from infra.settings import Settings
from tasks import metrics
from tasks.cost import run_costs
from tasks.experiments import ExperimentOutputs, experiment_markdown, write_experiment_outputs
from tasks.fleet import ActorGroup, FleetShape, GenerationFleet
from tasks.inputs import check_images, local_image_roots, planning_rules
from tasks.manifest import ManifestLocation, flush_spool, write_manifest
from tasks.planning import Plan, plan_clips, plan_sheet, sheet_rules
from tasks.postproduction import Postproduction, prepare_postproduction
from tasks.publish import FinishingContext
from tasks.records import ClipSpec, ClipStatus, ManifestEntry
from tasks.retries import transient
from tasks.run_report import Links, run_summary_markdown, write_new_clips_contact_sheet


class RunProgress:
    """A Prefect progress artifact, and a terminal progress bar, that advance as clips end."""

    def __init__(self, total: int, description: str) -> None:
        self.total, self.done, self.description = total, 0, description
        self.artifact_id: UUID = create_progress_artifact(
            progress=100.0 if total == 0 else 0.0, key="clip-progress", description=description
        )
        # disable=None: a bar on a terminal, nothing in logs and CI.
        self.bar = tqdm(total=total, desc=description, unit="clip", disable=None)

    def close(self) -> None:
        self.bar.close()

    def advance(self, count: int = 1) -> None:
        self.done += count
        self.bar.update(count)
        update_progress_artifact(
            self.artifact_id,
            progress=100.0 * self.done / max(self.total, 1),
            description=f"{self.description}: {self.done}/{self.total} clips",
        )


# Catalog reads are cheap and must see the latest catalog: never cached, retried on storage hiccups.
@task(retries=2, retry_delay_seconds=5, retry_condition_fn=transient, cache_policy=NO_CACHE)
def load_catalog_task(catalog_uri: str, settings: Settings) -> ValidatedCatalog:
    catalog = load_catalog(catalog_uri, ObjectStore(settings.object_store()).client)
    get_run_logger().info(
        "catalog loaded uri=%s valid_rows=%d problems=%d",
        catalog_uri,
        len(catalog.rows),
        len(catalog.problems),
    )
    return catalog


def _log_plan(plan: Plan) -> Plan:
    get_run_logger().info(
        "plan to_generate=%d skipped=%d rejected=%d refused_by_prompt_policy=%d",
        len(plan.clips),
        len(plan.skipped),
        len(plan.rejected),
        len(plan.refused),
    )
    return plan


# A sheet is read fresh every run (it may have been re-uploaded under the same name).
@task(retries=2, retry_delay_seconds=5, retry_condition_fn=transient, cache_policy=NO_CACHE)
def load_sheet_task(sheet_uri: str, settings: Settings) -> SheetReadResult:
    sheet = load_prompt_sheet(sheet_uri, sheet_rules(settings), ObjectStore(settings.object_store()).client)
    get_run_logger().info(
        "sheet loaded uri=%s variants=%d problems=%d", sheet_uri, len(sheet.variants), len(sheet.problems)
    )
    return sheet


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=transient, cache_policy=NO_CACHE)
def plan_sheet_task(
    sheet: SheetReadResult,
    sheet_uri: str,
    run_id: str,
    settings: Settings,
    postproduction: Postproduction,
    force: bool = False,
) -> Plan:
    store = ObjectStore(settings.object_store())
    roots = local_image_roots(settings, sheet_uri)
    images = check_images((v.image_uri for v in sheet.variants), store, roots)
    published = set() if force else set(store.list_keys("experiments/"))
    rules = planning_rules(settings, postproduction, store)
    return _log_plan(plan_sheet(sheet, rules, run_id, images, published))


@task(retries=3, retry_delay_seconds=5, retry_condition_fn=transient, cache_policy=NO_CACHE)
def experiment_outputs_task(
    run_id: str, sheet_uri: str, sheet: SheetReadResult, entries: Sequence[ManifestEntry], settings: Settings
) -> list[ExperimentOutputs]:
    """Per experiment: sheet, manifest and contact sheet in the store, and the contact sheet in the UI."""
    store = ObjectStore(settings.object_store())
    outputs = write_experiment_outputs(store, run_id, sheet_uri, sheet, entries)
    expiry = timedelta(hours=settings.link_expiry_hours)
    for output in outputs:
        create_markdown_artifact(
            key=f"contact-sheet-{_artifact_key(output.experiment_id)}",
            markdown=experiment_markdown(
                output, entries, lambda key: store.presigned_url(key, expiry), store.uri
            ),
            description=f"Variants of {output.experiment_id} side by side; links expire after "
            f"{settings.link_expiry_hours} h",
        )
    return outputs


def _artifact_key(name: str) -> str:
    # Artifact keys allow lowercase letters, digits and dashes only.
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "experiment"


# Profiles, logos and certificates may change between runs: read fresh, retried on storage hiccups.
@task(retries=2, retry_delay_seconds=5, retry_condition_fn=transient, cache_policy=NO_CACHE)
def prepare_postproduction_task(settings: Settings) -> Postproduction:
    postproduction = prepare_postproduction(settings)
    get_run_logger().info(
        "post-production profiles=%s default=%s",
        ",".join(sorted(postproduction.profiles)),
        postproduction.default_profile,
    )
    return postproduction


# Planning lists what is already published, which changes every run: never cached.
@task(retries=2, retry_delay_seconds=5, retry_condition_fn=transient, cache_policy=NO_CACHE)
def plan_task(
    catalog: ValidatedCatalog,
    catalog_uri: str,
    run_id: str,
    settings: Settings,
    postproduction: Postproduction,
    force: bool = False,
    force_skus: Sequence[str] = (),
) -> Plan:
    store = ObjectStore(settings.object_store())
    roots = local_image_roots(settings, catalog_uri)
    images = check_images((row.image_uri for row in catalog.rows), store, roots)
    published = set() if force else set(store.list_keys("clips/"))
    # clips/<sku>/<clip_id>.mp4: forcing a product forgets that its clips are published.
    published = {key for key in published if key.split("/")[1] not in set(force_skus)}
    rules = planning_rules(settings, postproduction, store)
    return _log_plan(plan_clips(catalog, rules, run_id, images, published))


# Loading models takes minutes at real size: its own task, so the UI shows where the time goes.
@task(cache_policy=NO_CACHE)
def start_fleet_task(
    shape: FleetShape,
    groups: Mapping[str, ActorGroup],
    settings: Settings,
    run_id: str,
    finishing: FinishingContext,
) -> GenerationFleet:
    fleet = GenerationFleet(shape, groups, settings, run_id, finishing)
    get_run_logger().info(
        "generator actors ready: %s",
        ", ".join(f"{worker} (loaded in {seconds:.1f} s)" for worker, seconds in fleet.load_seconds.items()),
    )
    return fleet


# A render batch is not retried as a whole: clip failures are manifest entries, and a rerun of
# the flow skips every clip already published, so it resumes where a crash left off.
@task(cache_policy=NO_CACHE)
def render_batch_task(
    fleet: GenerationFleet,
    clips: Sequence[ClipSpec],
    progress: RunProgress,
    clip_ended: Callable[[Sequence[ManifestEntry]], None] | None = None,
) -> list[ManifestEntry]:
    """The batch's clips on the fleet, an entry each as they end; ``clip_ended`` gets the batch's entries
    so far after each (the flow checkpoints its manifest from it)."""
    logger = get_run_logger()
    entries = []
    for entry in fleet.run(clips):
        entries.append(entry)
        metrics.clip_ended(entry)
        progress.advance()
        logger.info(
            "clip %s of=%s clip_id=%s model=%s%s",
            entry.status,
            entry.label,
            entry.clip_id,
            entry.model,
            f" stage={entry.stage} reason={entry.reason}" if entry.status != ClipStatus.PUBLISHED else "",
        )
        if clip_ended is not None:
            clip_ended(entries)
    return entries


@task(retries=3, retry_delay_seconds=5, retry_condition_fn=transient, cache_policy=NO_CACHE)
def write_manifest_task(
    run_id: str,
    source_uri: str,
    entries: Sequence[ManifestEntry],
    settings: Settings,
    complete: bool = True,
) -> ManifestLocation:
    """The run's manifest in the store, or, while the store is away, in the local spool: the run's record
    is never lost. A complete manifest that had to be spooled is delivered by this run if the store comes
    back within ``upload_retry_seconds``, else by the next run (:func:`flush_spool_task`)."""
    store, logger = ObjectStore(settings.object_store()), get_run_logger()
    spool = settings.manifest_spool_dir
    location = write_manifest(store, run_id, source_uri, entries, complete=complete, spool_dir=spool)
    if location.spooled and complete:
        delivered = wait_until(lambda: _flushed(store, spool), settings.upload_retry_seconds, interval=5.0)
        location = replace(location, spooled=not delivered)
    logger.info(
        "manifest %s key=%s complete=%s counts=%s",
        "spooled" if location.spooled else "written",
        location.parquet_key,
        complete,
        location.counts,
    )
    return location


def _flushed(store: ObjectStore, spool: Path) -> bool:
    try:
        flush_spool(store, spool)
    except Exception:
        return False
    return True


@task(cache_policy=NO_CACHE)
def flush_spool_task(settings: Settings) -> list[str]:
    """Deliver manifests an earlier run had to spool while the store was away (a run's first step)."""
    try:
        delivered = flush_spool(ObjectStore(settings.object_store()), settings.manifest_spool_dir)
    except Exception as err:
        get_run_logger().warning("spooled manifests not delivered yet error=%s", type(err).__name__)
        return []
    if delivered:
        get_run_logger().info("spooled manifests delivered keys=%s", ",".join(delivered))
    return delivered


@task(retries=3, retry_delay_seconds=5, retry_condition_fn=transient, cache_policy=NO_CACHE)
def new_clips_contact_sheet_task(
    run_id: str, entries: Sequence[ManifestEntry], settings: Settings
) -> str | None:
    """The contact sheet of the clips the run published, beside its manifest; its key (None: no new clips)."""
    return write_new_clips_contact_sheet(ObjectStore(settings.object_store()), run_id, entries)


@task(cache_policy=NO_CACHE)
def report_task(
    run_id: str,
    entries: Sequence[ManifestEntry],
    manifest: ManifestLocation,
    settings: Settings,
    contact_sheet_key: str | None = None,
) -> None:
    """The run's table artifact (every clip) and its markdown summary (:mod:`tasks.run_report`): the cost,
    the new clips on ``contact_sheet_key`` when given, the failures by reason."""
    store = ObjectStore(settings.object_store())
    expiry = timedelta(hours=settings.link_expiry_hours)
    links = Links(
        presigned=lambda key: store.presigned_url(key, expiry),
        uri=store.uri,
        expiry_hours=settings.link_expiry_hours,
        expires_at=datetime.now(UTC) + expiry,
    )
    ordered = sorted(entries, key=lambda e: e.row)
    create_table_artifact(
        key="clip-summary",
        table=[
            {
                "row": e.row,
                "sku": e.label,
                "status": str(e.status),
                "model": e.model or "",
                "seconds": e.generate_seconds,
                "clip": store.presigned_url(e.clip_key, expiry) if e.clip_key else "",
                "reason": e.reason,
            }
            for e in ordered
        ],
        description=f"Every clip of run {run_id}; links expire after {settings.link_expiry_hours} h",
    )
    costs = run_costs(entries, settings.gpu_price_per_hour, settings.estimate_gpu_type)
    markdown = run_summary_markdown(run_id, entries, manifest, costs, links, contact_sheet_key)
    create_markdown_artifact(key="run-summary", markdown=markdown, description=f"Summary of {run_id}")
