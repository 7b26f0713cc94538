"""The nightly catalog flow: a clip for every new or changed product.

load post-production profiles and catalog -> validate and plan (deterministic clip ids,
skip what is published, refuse prompts the policy blocks) -> generate on the Ray fleet,
post-processing, encoding and publishing (or quarantining) each clip as it finishes
-> write the run manifest -> post the run's artifacts (a contact sheet of the night's new clips, the cost,
the failures by reason).
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import State

from flows.common import RunResult, final_state, label_flow_run, new_run_id, render_plan
from flows.runs import catalog_name, nightly_run_name
from infra.settings import Settings
from tasks.planning import hold_back
from tasks.units import (
    flush_spool_task,
    load_catalog_task,
    new_clips_contact_sheet_task,
    plan_task,
    prepare_postproduction_task,
    report_task,
    write_manifest_task,
)


@flow(name="nightly-catalog", flow_run_name=nightly_run_name, log_prints=True)
def nightly_catalog(
    catalog_uri: str | None = None,
    force: bool = False,
    force_skus: list[str] | None = None,
    dry_run: bool = False,
    limit: int | None = None,
) -> RunResult | State:
    """Make, post-process and publish a clip for every catalog row not already published.

    ``catalog_uri`` defaults to the configured catalog; ``force`` regenerates every clip,
    ``force_skus`` only those of these products, even when they are already published.
    ``dry_run`` plans and writes the manifest (with each clip's estimated GPU time) but makes nothing;
    ``limit`` makes at most that many clips, the others ``planned`` for a later run.
    """
    settings = Settings()
    catalog_uri = catalog_uri or settings.catalog_uri
    run_id = new_run_id()
    logger = get_run_logger()
    label_flow_run(tags=["nightly", f"catalog:{catalog_name(catalog_uri)}"])
    logger.info("run %s catalog=%s", run_id, catalog_uri)

    flush_spool_task(settings)  # manifests an earlier run could not store
    postproduction = prepare_postproduction_task(settings)
    catalog = load_catalog_task(catalog_uri, settings)
    plan = plan_task(catalog, catalog_uri, run_id, settings, postproduction, force, force_skus or [])
    plan = hold_back(plan, run_id, dry_run=dry_run, limit=limit)
    rendering = render_plan(plan, settings, run_id, catalog_uri, postproduction.finishing, logger)
    entries = rendering.entries
    manifest = write_manifest_task(run_id, catalog_uri, entries, settings)
    contact_sheet_key = new_clips_contact_sheet_task(run_id, entries, settings)
    report_task(run_id, entries, manifest, settings, contact_sheet_key)
    logger.info("run %s done counts=%s manifest=%s", run_id, manifest.counts, manifest.parquet_key)
    result = RunResult(run_id, str(flow_run.get_id()), manifest, entries, rendering.load_seconds)
    return final_state(result, settings)
