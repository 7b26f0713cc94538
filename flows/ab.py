"""The A/B creative flow: a prompt sheet's variants, side by side, grouped by experiment.

read and validate the sheet (row and column errors a marketer can act on) -> plan every
sample (deterministic clip ids; skip what is published) -> generate on the Ray fleet with the
same post-production as the nightly run -> per experiment: sheet as Parquet, manifest and a
contact sheet under experiments/<experiment>/ -> the run's artifacts.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import State

from flows.common import RunResult, final_state, label_flow_run, new_run_id, render_plan
from flows.runs import ab_run_name, ab_tags
from infra.settings import Settings
from tasks.planning import hold_back
from tasks.units import (
    experiment_outputs_task,
    flush_spool_task,
    load_sheet_task,
    plan_sheet_task,
    prepare_postproduction_task,
    report_task,
    write_manifest_task,
)


@flow(name="ab-batch", log_prints=True)
def ab_batch(
    sheet_uri: str, force: bool = False, dry_run: bool = False, limit: int | None = None
) -> RunResult | State:
    """Make, post-process and publish every sample of every valid variant in the prompt sheet.

    ``sheet_uri`` is an .xlsx or .csv file: a local path or ``s3://bucket/key``. ``force``
    regenerates samples that are already published; ``dry_run`` and ``limit`` as for the nightly run.
    """
    settings = Settings()
    run_id = new_run_id()
    logger = get_run_logger()
    flush_spool_task(settings)  # manifests an earlier run could not store
    postproduction = prepare_postproduction_task(settings)
    sheet = load_sheet_task(sheet_uri, settings)
    experiments = sorted({variant.experiment_id for variant in sheet.variants})
    # The run's name and tags come from the sheet's contents, known only now.
    label_flow_run(ab_run_name(experiments), ["ab", *ab_tags(experiments)])
    logger.info("run %s sheet=%s experiments=%s", run_id, sheet_uri, ",".join(experiments))

    plan = plan_sheet_task(sheet, sheet_uri, run_id, settings, postproduction, force)
    plan = hold_back(plan, run_id, dry_run=dry_run, limit=limit)
    rendering = render_plan(plan, settings, run_id, sheet_uri, postproduction.finishing, logger)
    entries = rendering.entries

    manifest = write_manifest_task(run_id, sheet_uri, entries, settings)
    experiment_outputs_task(run_id, sheet_uri, sheet, entries, settings)
    report_task(run_id, entries, manifest, settings)
    logger.info("run %s done counts=%s manifest=%s", run_id, manifest.counts, manifest.parquet_key)
    result = RunResult(run_id, str(flow_run.get_id()), manifest, entries, rendering.load_seconds)
    return final_state(result, settings)
