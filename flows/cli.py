"""The ``wanfactory`` command: every job a user runs.

wanfactory demo                      stack up, tiny models, sample catalog, one nightly run
wanfactory stack up|down|status      the local object store and Prefect server
wanfactory serve                     serve the nightly (cron), A/B and intake-watcher deployments
wanfactory run nightly [--catalog]   one nightly catalog run
wanfactory run ab SHEET             one A/B run of a prompt sheet, in this process
wanfactory ab submit SHEET           start a run of the served A/B deployment; prints its UI link
wanfactory outputs [--run RUN_ID]    what a run published (latest run by default)
wanfactory models build-tiny         build the offline test models into the model root
wanfactory catalog validate|synth|upload
wanfactory verify FILE|s3://KEY      a clip's C2PA provenance and invisible watermark
wanfactory automations apply|show    the Prefect automations (zombie runs crashed, alerts), for workers

Every command that reaches the object store first delivers the manifests runs had to spool locally
while the store was away (:func:`_object_store`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import httpx
import pydantic
import typer
import urllib3
from minio.error import S3Error
from pydantic_settings import SettingsError

from catalogs.problems import InputError
from catalogs.sample import SAMPLE_DIR
from catalogs.sources import load_catalog, read_bytes
from flows.runs import AB_DEPLOYMENT, DEPLOYMENTS, ab_run_name, ab_tags
from infra import stack
from infra.objectstore import ObjectStore, unreachable
from infra.settings import Settings
from tasks.cost import cost_sentence, cost_text, run_costs
from tasks.manifest import flush_spool
from wan_engine import MODEL_FAMILIES, get_model_spec, model_location, split_s3_uri

# Commands import what only they need (Prefect, Ray and the engine, ffmpeg, the content filter's
# onnxruntime) when they run, so that `wanfactory --help` and `stack status` answer at once.

# Plain tracebacks: typer's pretty ones set attributes on the exception, which minio's frozen S3Error refuses.
app = typer.Typer(
    help="wanfactory: Wan2.2 video production from catalogs and prompt sheets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
stack_app = typer.Typer(help="The local stack: S3 object store and Prefect server.", no_args_is_help=True)
run_app = typer.Typer(help="Run a flow now, in this process.", no_args_is_help=True)
models_app = typer.Typer(help="Model weights.", no_args_is_help=True)
catalog_app = typer.Typer(help="Product catalogs.", no_args_is_help=True)
ab_app = typer.Typer(help="A/B creative batches from prompt sheets.", no_args_is_help=True)
automations_app = typer.Typer(
    help="The Prefect automations wanfactory declares (flows/automations.py).", no_args_is_help=True
)
app.add_typer(stack_app, name="stack")
app.add_typer(run_app, name="run")
app.add_typer(models_app, name="models")
app.add_typer(catalog_app, name="catalog")
app.add_typer(ab_app, name="ab")
app.add_typer(automations_app, name="automations")

SAMPLE_CATALOG_PREFIX = "catalogs/sample"
DRY_RUN_HELP = "plan and write the manifest with each clip's estimated GPU time; generate nothing"
LIMIT_HELP = "make at most this many clips; the rest stay planned for a later run"


def _use_local_prefect(settings: Settings) -> None:
    """Send runs to the local stack's Prefect server unless PREFECT_API_URL points elsewhere, and give the
    flow runs this process starts (in it, or served) their heartbeat (``settings.prefect_environment``).

    Before Prefect is imported: its client reads the URL then, and without one starts a server of its own.
    """
    os.environ.setdefault("PREFECT_API_URL", f"http://127.0.0.1:{settings.prefect_port}/api")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.update(settings.prefect_environment())


def _object_store(settings: Settings) -> ObjectStore:
    """The object store, for every command that uses it; first the manifests that runs had to spool
    locally while it was away (``settings.manifest_spool_dir``) are delivered, so a run's record reaches
    the store with whatever command comes next, not only with the next run. If the store still cannot
    take them they stay spooled, with one line saying so, and the command goes on."""
    store = ObjectStore(settings.object_store())
    try:
        delivered = flush_spool(store, settings.manifest_spool_dir)
    except (S3Error, urllib3.exceptions.HTTPError) as err:
        reason = unreachable(err, settings.s3_endpoint) or f"{type(err).__name__}: {err}"
        typer.echo(f"warning: spooled manifests not delivered yet: {reason}", err=True)
        return store
    if delivered:
        typer.echo(
            f"delivered {len(delivered)} manifest files spooled during an outage: {', '.join(delivered)}",
            err=True,
        )
    return store


def _ui_url() -> str:
    return os.environ["PREFECT_API_URL"].removesuffix("/api")


@stack_app.command("up")
def stack_up() -> None:
    """Start the local object store and Prefect server (idempotent)."""
    settings = Settings()
    status = stack.stack_up(settings, DEPLOYMENTS)
    _object_store(settings)  # the store is back: manifests spooled while it was away go in now
    typer.echo(status.describe())


@stack_app.command("down")
def stack_down() -> None:
    """Stop the local stack; its data stays for the next `stack up`."""
    stack.stack_down(Settings())
    typer.echo("local stack stopped")


@stack_app.command("status")
def stack_status() -> None:
    """Say what of the local stack is running."""
    typer.echo(stack.stack_status(Settings(), DEPLOYMENTS).describe())


@app.command()
def serve() -> None:
    """Serve the nightly (on its cron), A/B and intake-watcher deployments in this process, until stopped."""
    settings = Settings()
    _use_local_prefect(settings)
    from flows.serve import serve_all

    serve_all(settings)


@automations_app.command("apply")
def automations_apply() -> None:
    """Create or update the automations on the Prefect server (idempotent): `wanfactory serve` does this
    as it starts; run it where a Prefect worker runs the deployments of prefect.yaml instead."""
    settings = Settings()
    _use_local_prefect(settings)
    from flows.automations import ALERTS_OFF, apply_automations

    for name, done in apply_automations(settings).items():
        typer.echo(f"{done:<9} {name}")
    if settings.alert_webhook_url is None:
        typer.echo(ALERTS_OFF)
    typer.echo(f"  on {_ui_url()}/automations")


@automations_app.command("show")
def automations_show() -> None:
    """Print the automations as JSON, as `apply` would send them to Prefect (with these settings)."""
    from uuid import UUID

    from flows.automations import ALERT_BLOCK, automations

    settings = Settings()
    # The alerts name their notification block by the id the server gives it when `apply` saves it.
    block_id = None if settings.alert_webhook_url is None else UUID(int=0)
    typer.echo(json.dumps([a.model_dump(mode="json") for a in automations(settings, block_id)], indent=1))
    if block_id is not None:
        typer.echo(
            f"(block_document_id {block_id} stands for the id block {ALERT_BLOCK} gets when apply saves it)",
            err=True,
        )


@models_app.command("build-tiny")
def build_tiny(
    rebuild: Annotated[bool, typer.Option(help="rebuild even if the model root already has them")] = False,
) -> None:
    """Build the tiny random-weight Wan2.2 models (offline) into the configured model root, and tiny random
    files for the registered adapters under the adapter root."""
    settings = Settings()
    for folder in ensure_tiny_models(settings, rebuild):
        typer.echo(f"tiny model ready: {folder}")
    for file in ensure_tiny_adapters(settings, rebuild):
        typer.echo(f"tiny adapter written: {file}")


def ensure_tiny_models(settings: Settings, rebuild: bool = False) -> list[str]:
    """Make sure the model root holds the tiny models; returns their locations."""
    from wan_engine import save_random_pipeline  # diffusers and torch

    locations = []
    store = _object_store(settings)
    for family in MODEL_FAMILIES:
        spec = get_model_spec(family, "tiny")
        location = model_location(settings.model_root, spec)
        if location.startswith("s3://"):
            bucket, prefix = split_s3_uri(location)
            if bucket != store.bucket:
                raise typer.BadParameter(
                    f"model root bucket {bucket} is not the configured bucket {store.bucket}"
                )
            if rebuild or not store.exists(f"{prefix}/model_index.json"):
                with tempfile.TemporaryDirectory() as tmp:
                    store.upload_folder(save_random_pipeline(spec, Path(tmp)), prefix)
        elif rebuild or not (Path(location) / "model_index.json").is_file():
            save_random_pipeline(spec, Path(location).parent)
        locations.append(location)
    return locations


def ensure_tiny_adapters(settings: Settings, rebuild: bool = False) -> list[str]:
    """Make sure every registered adapter's files exist under the adapter root, as tiny random LoRAs of the
    tiny models (what the demo and tests run offline); returns the files written."""
    from tasks.planning import adapter_registry
    from wan_engine import save_random_lora  # torch

    registry, written = adapter_registry(settings), []
    store = _object_store(settings)
    for entry in registry.entries.values():
        spec = get_model_spec(entry.family, "tiny")
        for _, uri in entry.files(registry.root):
            if not uri.startswith(registry.root.rstrip("/") + "/"):
                continue  # an absolute file of the operator's: never written over
            seed = int(hashlib.sha256(uri.encode()).hexdigest()[:8], 16)  # each file its own weights
            if uri.startswith("s3://"):
                bucket, key = split_s3_uri(uri)
                if bucket != store.bucket:
                    raise typer.BadParameter(
                        f"adapter root bucket {bucket} is not the configured bucket {store.bucket}"
                    )
                if rebuild or not store.exists(key):
                    with tempfile.TemporaryDirectory() as tmp:
                        path = save_random_lora(spec, Path(tmp) / "lora.safetensors", seed=seed)
                        store.put_file(key, path, "application/octet-stream")
                    written.append(uri)
            elif rebuild or not Path(uri).is_file():
                save_random_lora(spec, Path(uri), seed=seed)
                written.append(uri)
    return written


@catalog_app.command("validate")
def catalog_validate(uri: str) -> None:
    """Check a catalog (path or s3://) as a run would, before any GPU is used, and list every problem by
    row and field: each cell, the model, size, frames, steps, profile, the image (there and decodable)
    and the prompt policy. Exits 1 when any row would not make a clip."""
    from tasks.inputs import check_images, local_image_roots, planning_rules
    from tasks.planning import plan_clips
    from tasks.postproduction import prepare_postproduction

    settings = Settings()
    store = _object_store(settings)
    catalog = load_catalog(uri, store.client)
    rules = planning_rules(settings, prepare_postproduction(settings), store)
    images = check_images((row.image_uri for row in catalog.rows), store, local_image_roots(settings, uri))
    plan = plan_clips(catalog, rules, "validate", images, published_keys=())
    for problem in plan.problems:
        typer.echo(str(problem))
    bad_rows = len(plan.rejected) + len(plan.refused)
    typer.echo(f"{len(plan.clips)} rows make clips, {bad_rows} rows do not ({len(plan.problems)} problems)")
    raise typer.Exit(1 if bad_rows else 0)


@catalog_app.command("synth")
def catalog_synth(
    out: Path,
    rows: Annotated[int, typer.Option(min=1)] = 10_000,
    seed: int = 0,
) -> None:
    """Write a synthetic catalog of ROWS made-up products to OUT (Parquet)."""
    import pyarrow.parquet as pq

    from catalogs.sample import synthetic_catalog

    pq.write_table(synthetic_catalog(rows, seed), out)
    typer.echo(f"wrote {rows} rows to {out}")


@catalog_app.command("upload")
def catalog_upload(
    folder: Annotated[Path, typer.Argument(help="a folder with catalog.parquet and its images")],
    prefix: Annotated[str, typer.Option(help="key prefix in the bucket")] = SAMPLE_CATALOG_PREFIX,
) -> None:
    """Upload a catalog folder (catalog.parquet and the images it refers to) to the object store."""
    store = _object_store(Settings())
    store.ensure_bucket()
    count = store.upload_folder(folder, prefix)
    typer.echo(f"uploaded {count} files to {store.uri(prefix)}/")


@run_app.command("nightly")
def run_nightly(
    catalog: Annotated[str | None, typer.Option(help="catalog path or s3:// URI (default: settings)")] = None,
    force: Annotated[bool, typer.Option(help="regenerate every clip, even those already published")] = False,
    force_sku: Annotated[
        list[str] | None, typer.Option(help="regenerate this product's clips (repeatable)")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help=DRY_RUN_HELP)] = False,
    limit: Annotated[int | None, typer.Option(min=1, help=LIMIT_HELP)] = None,
) -> None:
    """Run the nightly catalog flow now; the run shows in the Prefect UI."""
    settings = Settings()
    _use_local_prefect(settings)
    from flows.nightly import nightly_catalog

    state = nightly_catalog(
        catalog_uri=catalog,
        force=force,
        force_skus=force_sku or [],
        dry_run=dry_run,
        limit=limit,
        return_state=True,
    )
    _print_result(state, settings)


@run_app.command("ab")
def run_ab(
    sheet: Annotated[str, typer.Argument(help="prompt sheet (.xlsx or .csv): a path or s3:// URI")],
    force: Annotated[bool, typer.Option(help="regenerate samples that are already published")] = False,
    dry_run: Annotated[bool, typer.Option(help=DRY_RUN_HELP)] = False,
    limit: Annotated[int | None, typer.Option(min=1, help=LIMIT_HELP)] = None,
) -> None:
    """Run the A/B flow on a prompt sheet now, in this process."""
    settings = Settings()
    _use_local_prefect(settings)
    from flows.ab import ab_batch

    uri = _sheet_in_store(sheet, settings)
    state = ab_batch(sheet_uri=uri, force=force, dry_run=dry_run, limit=limit, return_state=True)
    _print_result(state, settings)


def _sheet_in_store(sheet: str, settings: Settings) -> str:
    """A local sheet is uploaded under sheets/ first, so that any worker can read it."""
    if sheet.startswith("s3://"):
        return sheet
    path = Path(sheet)
    if not path.is_file():
        raise typer.BadParameter(f"no such file: {sheet}")
    store = _object_store(settings)
    key = f"sheets/{path.name}"
    store.put_file(key, path, "application/octet-stream")
    return store.uri(key)


@ab_app.command("submit")
def ab_submit(
    sheet: Annotated[str, typer.Argument(help="prompt sheet (.xlsx or .csv): a path or s3:// URI")],
    force: Annotated[bool, typer.Option(help="regenerate samples that are already published")] = False,
) -> None:
    """Start a run of the A/B deployment (served by `wanfactory serve`) and print its Prefect UI link."""
    settings = Settings()
    _use_local_prefect(settings)
    from prefect.deployments import run_deployment

    from catalogs.sheets import load_prompt_sheet
    from tasks.planning import sheet_rules

    uri = _sheet_in_store(sheet, settings)
    # Check the sheet here, as the run will, so a marketer sees row and column errors at once.
    checked = load_prompt_sheet(uri, sheet_rules(settings), _object_store(settings).client)
    for problem in checked.problems:
        typer.echo(f"  {problem}", err=True)
    experiments = sorted({v.experiment_id for v in checked.variants})
    if not experiments:
        raise typer.BadParameter(f"{sheet}: no valid variant to make")
    run = run_deployment(
        AB_DEPLOYMENT,
        parameters={"sheet_uri": uri, "force": force},
        flow_run_name=ab_run_name(experiments),
        tags=["ab", *ab_tags(experiments)],
        timeout=0,
    )
    typer.echo(f"{len(checked.variants)} variants, {len(checked.problems)} rows with problems (above)")
    typer.echo(f"flow run {run.name}: {_ui_url()}/runs/flow-run/{run.id}")


def _print_result(state, settings: Settings) -> None:
    """A run's outcome for the terminal; exits 1 when the run failed (its message says why)."""
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        raise result  # the run stopped before it had a result (an unusable catalog, say)
    bucket = settings.s3_bucket
    typer.echo("")
    typer.echo(
        f"run {result.run_id}: " + ", ".join(f"{n} {status}" for status, n in result.manifest.counts.items())
    )
    costs = run_costs(result.entries, settings.gpu_price_per_hour, settings.estimate_gpu_type)
    typer.echo(f"  GPU time:   {cost_sentence(costs)}")
    for line in cost_text(costs):
        typer.echo(f"              {line}")
    typer.echo(f"  Prefect UI: {_ui_url()}/runs/flow-run/{result.flow_run_id}")
    typer.echo(f"  manifest:   s3://{bucket}/{result.manifest.parquet_key}")
    typer.echo(f"              s3://{bucket}/{result.manifest.json_key}")
    typer.echo(
        f"  clips:      s3://{bucket}/clips/<sku>/ or experiments/<experiment>/<variant>/ "
        "(list them: wanfactory outputs)"
    )
    if state.is_failed():
        typer.echo(f"  run failed: {state.message}", err=True)
        raise typer.Exit(1)


@app.command()
def outputs(run: Annotated[str | None, typer.Option(help="run id (default: the latest run)")] = None) -> None:
    """List what a run did, clip by clip, from its manifest in the object store."""
    store = _object_store(Settings())
    if run is None:
        runs = sorted({key.split("/")[1] for key in store.list_keys("runs/")})
        if not runs:
            raise typer.BadParameter("no runs in the object store yet")
        run = runs[-1]
    manifest = json.loads(store.get_bytes(f"runs/{run}/manifest.json"))
    typer.echo(f"run {run} ({manifest['source']}): {manifest['counts']}")
    for clip in manifest["clips"]:
        where = store.uri(clip["clip_key"]) if clip["clip_key"] else clip["reason"]
        experiment = clip["experiment_id"] and f"{clip['experiment_id']}/{clip['variant_id']}"
        label = clip["sku"] or experiment or "-"
        typer.echo(f"  row {clip['row']:>4}  {label:<12} {clip['status']:<11} {where}")


@app.command()
def verify(
    clip: Annotated[str, typer.Argument(help="an MP4 file, or s3://bucket/key of a published clip")],
    trust: Annotated[
        Path | None, typer.Option(help="trust anchor PEM (default: this deployment's signing root)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Read a clip's C2PA manifest (is it signed, by whom, does it validate) and its invisible watermark."""
    from tasks.postprod.verify import verify_clip
    from tasks.postproduction import trust_anchor

    settings = Settings()
    with tempfile.TemporaryDirectory(prefix="wanfactory-verify-") as tmp:
        path = Path(clip)
        if clip.startswith("s3://"):
            path = Path(tmp) / "clip.mp4"
            path.write_bytes(read_bytes(clip, _object_store(settings).client))
        report = verify_clip(path, trust or trust_anchor(settings))
    typer.echo(json.dumps(report.to_dict(), indent=1) if as_json else report.describe())
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def demo() -> None:
    """Start the local stack, build the tiny models, upload the sample catalog and run it once."""
    settings = Settings()
    typer.echo(stack.stack_up(settings, DEPLOYMENTS).describe())
    ensure_tiny_models(settings)
    ensure_tiny_adapters(settings)
    catalog_upload(SAMPLE_DIR, SAMPLE_CATALOG_PREFIX)
    run_nightly(catalog=f"s3://{settings.s3_bucket}/{SAMPLE_CATALOG_PREFIX}/catalog.parquet", force=False)
    outputs(run=None)


@app.command()
def config() -> None:
    """Show the effective settings (from WANFACTORY_* and .env), secrets masked."""
    settings = Settings()
    for name, field in Settings.model_fields.items():
        typer.echo(f"WANFACTORY_{name.upper():<30} {getattr(settings, name)!s:<45} {field.description or ''}")


def _settings_problem(err: Exception) -> str:
    """A settings error as the variables to fix, in one line; a secret's value is never shown."""
    if isinstance(err, pydantic.ValidationError) and err.title == Settings.__name__:
        return "; ".join(_setting_problem(e) for e in err.errors())
    # pydantic-settings fails this way on a complex setting (a table) whose value is not JSON.
    unparsed = re.search(r'error parsing value for field "(\w+)"', str(err))
    if unparsed:
        return f"WANFACTORY_{unparsed[1].upper()}: not valid JSON (this setting is a JSON object)"
    return " ".join(str(err).split())


def _setting_problem(error: Mapping[str, Any]) -> str:
    name, *keys = error["loc"]
    variable = f"WANFACTORY_{str(name).upper()}" + "".join(f"[{key!r}]" for key in keys)
    field = Settings.model_fields.get(str(name))
    secret = field is not None and "SecretStr" in str(field.annotation)
    shown = " (its value is not shown: a secret)" if secret else f"={error.get('input')!r}"
    return f"{variable}{shown}: {error['msg'].removeprefix('Value error, ')}"


def main() -> None:
    """The ``wanfactory`` command: what a user's input or setup gets wrong is one line, not a traceback."""
    try:
        # The click command itself: typer's wrapper would set an attribute on the error, which minio's
        # frozen S3Error refuses (an AttributeError instead of the error).
        typer.main.get_command(app)(prog_name="wanfactory")
    except (InputError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise SystemExit(2) from None
    except (pydantic.ValidationError, SettingsError) as err:
        typer.echo(f"error: {_settings_problem(err)}", err=True)
        raise SystemExit(2) from None
    except httpx.TransportError as err:  # the Prefect client's: the object store's client is urllib3
        server = os.environ.get("PREFECT_API_URL", "the configured Prefect server")
        typer.echo(
            f"error: the Prefect server at {server} did not answer ({type(err).__name__}: {err}); "
            "start it (wanfactory stack up) or point PREFECT_API_URL at a running one",
            err=True,
        )
        raise SystemExit(2) from None
    except (S3Error, urllib3.exceptions.HTTPError) as err:
        line = unreachable(err, Settings().s3_endpoint)
        if line is None:
            raise
        typer.echo(f"error: {line}", err=True)
        raise SystemExit(2) from None
