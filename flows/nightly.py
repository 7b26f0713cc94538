"""The nightly catalog flow: a clip for every new or changed product.

load catalog -> validate and plan (deterministic clip ids, skip what is published)
-> generate on the Ray fleet, encoding and uploading each clip as it finishes
-> write the run manifest -> post the run's artifacts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

import ray
from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from infra.settings import Settings
from tasks.fleet import FleetStartError, connect_ray, plan_fleets
from tasks.manifest import ManifestLocation
from tasks.records import ManifestEntry, failed_entry
from tasks.units import (
    RunProgress,
    load_catalog_task,
    plan_task,
    render_batch_task,
    report_task,
    start_fleet_task,
    write_manifest_task,
)


@dataclass(frozen=True)
class RunResult:
    run_id: str
    flow_run_id: str
    manifest: ManifestLocation
    entries: list[ManifestEntry]


def _nightly_run_name() -> str:
    return f"nightly-{datetime.now(UTC):%Y-%m-%d}"


def _run_id() -> str:
    started = datetime.now(UTC)
    return f"{started:%Y%m%dT%H%M%SZ}-{str(flow_run.get_id() or 'local')[:8]}"


@flow(name="nightly-catalog", flow_run_name=_nightly_run_name, log_prints=True)
def nightly_catalog(catalog_uri: str | None = None, force: bool = False) -> RunResult:
    """Make, encode and publish a clip for every catalog row not already published.

    ``catalog_uri`` defaults to the configured catalog; ``force`` regenerates clips that
    are already published.
    """
    settings = Settings()
    catalog_uri = catalog_uri or settings.catalog_uri
    run_id = _run_id()
    logger = get_run_logger()
    logger.info("run %s catalog=%s", run_id, catalog_uri)

    catalog = load_catalog_task(catalog_uri, settings)
    plan = plan_task(catalog, run_id, settings, force)
    entries: list[ManifestEntry] = [*plan.rejected, *plan.skipped]

    progress = RunProgress(len(plan.clips), f"run {run_id}")
    if plan.clips:
        connect_ray(settings)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        clip_counts = Counter(clip.family for clip in plan.clips)
        for shape in plan_fleets(clip_counts, gpus, settings.cpu_actors_per_model, settings.actor_num_cpus):
            clips = [clip for clip in plan.clips if clip.family in shape.actors]
            try:
                fleet = start_fleet_task(shape, settings, run_id)
            except FleetStartError as err:
                logger.error("%s", err)
                entries += [failed_entry(clip, run_id, "load", str(err)) for clip in clips]
                progress.advance(len(clips))
                continue
            try:
                for start in range(0, len(clips), settings.clips_per_task):
                    batch = clips[start : start + settings.clips_per_task]
                    entries += render_batch_task(fleet, batch, progress)
            finally:
                fleet.shutdown()

    progress.close()
    manifest = write_manifest_task(run_id, catalog_uri, entries, settings)
    report_task(run_id, entries, manifest, settings)
    logger.info("run %s done counts=%s manifest=%s", run_id, manifest.counts, manifest.parquet_key)
    return RunResult(run_id, str(flow_run.get_id()), manifest, entries)
