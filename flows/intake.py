"""The intake watcher: a prompt sheet dropped into the bucket's ``intake/`` folder starts an A/B run.

Each poll (the ``intake-watcher/intake`` deployment runs it every ``intake_poll_seconds``):

list the objects directly under ``intake/`` -> read each as a prompt sheet ->
  usable:   copy to ``intake/accepted/<UTC timestamp>-<name>``, start an ``ab-batch/ab`` run for that copy
            (tagged with the sheet's experiment ids), delete the original
  unusable: write ``intake/rejected/<UTC timestamp>-<name>.error.txt`` naming the problems, copy the
            file beside it, delete the original
-> log every sheet and post an ``intake-report`` markdown artifact.

A sheet is unusable when it is not an .xlsx/.csv file, cannot be read as a prompt sheet
(:class:`catalogs.sheets.SheetFormatError`), has no valid variant, or refers to images by a relative
path (they resolve against the sheet's folder, which it leaves). A usable sheet with some bad rows is
accepted: the A/B run reports those rows, and the intake report lists them too.

Never twice: the timestamp is the object's Last-Modified (when it was dropped), not the poll's time,
so every step of a poll that died half way is redone under the same keys on the next poll: the copy
overwrites itself, the A/B run is found again by its idempotency key instead of being started twice,
and the delete finishes the move. The original is deleted last, so a sheet whose run could not be
started (Prefect down) stays in ``intake/`` and is tried again. Objects in sub-folders (``accepted/``,
``rejected/``, images a sheet refers to) are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import PurePosixPath

from minio.commonconfig import CopySource
from minio.error import S3Error
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment

from catalogs.sheets import SheetFormatError, read_prompt_sheet
from catalogs.sources import resolve_reference
from flows.runs import AB_DEPLOYMENT, ab_run_name, ab_tags
from infra.objectstore import ObjectStore
from infra.settings import Settings
from tasks.markdown import md_text
from tasks.planning import sheet_rules
from tasks.retries import transient

INTAKE_PREFIX = "intake/"
ACCEPTED_PREFIX = "intake/accepted/"
REJECTED_PREFIX = "intake/rejected/"
SHEET_SUFFIXES = (".xlsx", ".csv")
# A prompt sheet is a few rows; anything bigger is a wrong drop, rejected without being downloaded.
MAX_SHEET_BYTES = 20 * 1024 * 1024
# Not drops: folder placeholders some S3 consoles create, and Excel's "~$name.xlsx" lock files that
# folder-sync tools upload beside an open workbook.
_IGNORED_NAME_PREFIXES = (".", "~$")


@dataclass(frozen=True)
class IntakeObject:
    """An object found directly under intake/."""

    key: str
    etag: str
    size: int
    last_modified: datetime

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def stamped_name(self) -> str:
        """``<UTC drop time>-<name>``: the same every poll, so a half-done move is finished, not repeated."""
        return f"{self.last_modified.astimezone(UTC):%Y%m%dT%H%M%SZ}-{self.name}"


@dataclass(frozen=True)
class SheetCheck:
    """What reading an intake object as a prompt sheet found."""

    usable: bool
    experiments: tuple[str, ...] = ()
    variants: int = 0
    reasons: tuple[str, ...] = ()  # why it is rejected
    row_problems: tuple[str, ...] = ()  # bad rows of an accepted sheet, reported by its A/B run too
    warnings: tuple[str, ...] = ()  # ignored columns


@dataclass(frozen=True)
class IntakeOutcome:
    """What a poll did with one object."""

    source_key: str
    outcome: str  # "accepted", "rejected" or "error" (left in intake/ for the next poll)
    key: str | None = None  # where the sheet went
    sheet_uri: str | None = None
    error_key: str | None = None
    flow_run_id: str | None = None
    flow_run_name: str | None = None
    check: SheetCheck | None = None
    error: str | None = None


@dataclass(frozen=True)
class IntakeReport:
    outcomes: list[IntakeOutcome] = field(default_factory=list)

    def by_outcome(self, outcome: str) -> list[IntakeOutcome]:
        return [o for o in self.outcomes if o.outcome == outcome]


class IntakeError(RuntimeError):
    """Some intake objects could not be handled; they stay in intake/ for the next poll."""


def check_sheet(name: str, data: bytes, sheet_uri: str, settings: Settings) -> SheetCheck:
    """Read ``data`` (the object ``name`` at ``sheet_uri``) as a prompt sheet and say whether it is usable.

    Rows are validated as the A/B run will validate them: the configured model variant, default
    models and post-production profiles.
    """
    if not name.lower().endswith(SHEET_SUFFIXES):
        return SheetCheck(
            False,
            reasons=(
                f"{name} is not a prompt sheet: only {' and '.join(SHEET_SUFFIXES)} files are read; "
                "save or export the sheet as one of those",
            ),
        )
    try:
        read = read_prompt_sheet(data, name, rules=sheet_rules(settings))
    except SheetFormatError as err:
        return SheetCheck(False, reasons=(str(err),))
    row_problems = tuple(str(problem) for problem in read.problems)
    warnings = tuple(str(warning) for warning in read.warnings)
    if not read.variants:
        return SheetCheck(
            False,
            reasons=("the sheet has no valid variant row, so there is nothing to make", *row_problems),
            warnings=warnings,
        )
    # The A/B run reads the accepted copy, so a relative image reference would resolve against
    # intake/accepted/ instead of where its writer put the image: ask for the full address instead.
    relative = [
        f"row {v.row}, image {v.image_uri!r}: a relative path resolves against the sheet's folder, which "
        f"the sheet leaves when it is accepted; write it as {resolve_reference(v.image_uri, sheet_uri)}"
        for v in read.variants
        if v.image_uri
        and not v.image_uri.startswith("s3://")
        and not PurePosixPath(v.image_uri).is_absolute()
    ]
    if relative:
        return SheetCheck(False, reasons=tuple(relative), row_problems=row_problems, warnings=warnings)
    return SheetCheck(
        True,
        experiments=tuple(sorted({v.experiment_id for v in read.variants})),
        variants=len(read.variants),
        row_problems=row_problems,
        warnings=warnings,
    )


def error_text(item: IntakeObject, check: SheetCheck, source_uri: str) -> str:
    """The .error.txt written beside a rejected file: for the person who dropped it."""
    lines = [
        f"{item.name} was not started: it is not a usable prompt sheet.",
        f"dropped at {item.last_modified.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC as {source_uri}",
        "",
        "problems:",
        *(f"- {reason}" for reason in check.reasons),
    ]
    if check.warnings:
        lines += ["", "also:", *(f"- {warning}" for warning in check.warnings)]
    lines += ["", f"Fix the sheet and drop it into {INTAKE_PREFIX} again."]
    return "\n".join(lines) + "\n"


# --- tasks: each is idempotent (fixed keys, an idempotency key for the run), so retrying one is safe ---


# Listing must see the bucket as it is now: never cached; retried on storage hiccups.
@task(retries=2, retry_delay_seconds=5, retry_condition_fn=transient, cache_policy=NO_CACHE)
def list_intake_task(settings: Settings) -> list[IntakeObject]:
    store = ObjectStore(settings.object_store())
    found = [
        IntakeObject(obj.object_name, obj.etag.strip('"'), obj.size, obj.last_modified)
        # Not recursive: only drops directly under intake/, never accepted/, rejected/ or image folders.
        for obj in store.client.list_objects(store.bucket, prefix=INTAKE_PREFIX, recursive=False)
        if not obj.is_dir and not PurePosixPath(obj.object_name).name.startswith(_IGNORED_NAME_PREFIXES)
    ]
    return sorted(found, key=lambda item: (item.last_modified, item.key))


# A sheet may be replaced under the same name between polls: read fresh, never cached.
@task(retries=2, retry_delay_seconds=5, retry_condition_fn=transient, cache_policy=NO_CACHE)
def check_sheet_task(item: IntakeObject, settings: Settings) -> SheetCheck | None:
    """The object read as a prompt sheet; None if it is gone (another poll took it)."""
    if item.size > MAX_SHEET_BYTES:
        return SheetCheck(
            False,
            reasons=(f"{item.name} is {item.size} bytes; a prompt sheet is at most {MAX_SHEET_BYTES} bytes",),
        )
    store = ObjectStore(settings.object_store())
    try:
        data = store.get_bytes(item.key)
    except S3Error as err:
        if err.code == "NoSuchKey":
            return None
        raise
    return check_sheet(item.name, data, store.uri(item.key), settings)


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=transient, cache_policy=NO_CACHE)
def copy_object_task(item: IntakeObject, destination: str, settings: Settings) -> None:
    store = ObjectStore(settings.object_store())
    # match_etag: the copy is the very object that was checked, not one uploaded over it since.
    store.client.copy_object(
        store.bucket, destination, CopySource(store.bucket, item.key, match_etag=item.etag)
    )


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=transient, cache_policy=NO_CACHE)
def put_error_task(key: str, text: str, settings: Settings) -> None:
    ObjectStore(settings.object_store()).put_bytes(key, text.encode(), "text/plain; charset=utf-8")


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=transient, cache_policy=NO_CACHE)
def delete_object_task(key: str, settings: Settings) -> None:
    store = ObjectStore(settings.object_store())
    store.client.remove_object(store.bucket, key)


# Retrying is safe: the idempotency key makes Prefect return the run a failed attempt already created.
@task(retries=2, retry_delay_seconds=5, retry_condition_fn=transient, cache_policy=NO_CACHE)
def start_ab_run_task(
    deployment: str, sheet_uri: str, experiments: tuple[str, ...], idempotency_key: str
) -> tuple[str, str]:
    """Create an A/B run for the sheet without waiting for it; returns its id and name.

    Named and tagged as ``wanfactory ab submit`` and the A/B flow itself do (``ab-<experiment>``,
    ``experiment:<id>``), plus ``intake``; the deployment adds its ``ab`` tag.
    """
    run = run_deployment(
        deployment,
        parameters={"sheet_uri": sheet_uri},
        timeout=0,
        tags=[*ab_tags(experiments), "intake"],
        idempotency_key=idempotency_key,
        # A run of its own, not a subflow of this poll: Prefect cancels the subflows of a cancelled
        # run, and cancelling a poll from the UI must not cancel the A/B batches it started.
        as_subflow=False,
        flow_run_name=ab_run_name(experiments),
    )
    return str(run.id), run.name


@task(cache_policy=NO_CACHE)
def report_intake_task(outcomes: list[IntakeOutcome]) -> None:
    """The poll's markdown artifact: one row per object, then the problems of each sheet."""
    lines = [
        f"# Intake: {len(outcomes)} file(s)",
        "",
        "| file | outcome | experiments | variants | moved to | A/B run |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        check = o.check or SheetCheck(False)
        cells = [
            o.source_key,
            o.outcome,
            ", ".join(check.experiments),
            str(check.variants or ""),
            o.key or "",
            o.flow_run_name or "",
        ]
        # File names come from whoever uploaded them: literal text, never markup.
        lines.append("| " + " | ".join(md_text(cell) for cell in cells) + " |")
    for o in outcomes:
        check = o.check or SheetCheck(False)
        notes = [*check.reasons, *check.row_problems, *check.warnings, *([o.error] if o.error else [])]
        if notes:
            lines += [
                "",
                f"## {md_text(o.source_key)} ({o.outcome})",
                "",
                *(f"- {md_text(n)}" for n in notes),
            ]
    create_markdown_artifact(
        key="intake-report", markdown="\n".join(lines), description="What the intake watcher did"
    )


# --- the flow -----------------------------------------------------------------------------------------


def _intake_run_name() -> str:
    return f"intake-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"


@flow(name="intake-watcher", flow_run_name=_intake_run_name)
def intake_watcher(ab_deployment: str = AB_DEPLOYMENT) -> IntakeReport:
    """Start an A/B run (deployment ``ab_deployment``) for each prompt sheet dropped into intake/.

    Unusable files go to intake/rejected/ with an .error.txt beside them. Raises IntakeError, after
    handling every other file, if a file could not be handled (it stays in intake/ for the next poll).
    """
    settings = Settings()
    logger = get_run_logger()
    found = list_intake_task(settings)
    if not found:
        # No artifact: a poll every 30 s that found nothing would bury the ones that did something.
        logger.info("intake empty prefix=%s", INTAKE_PREFIX)
        return IntakeReport()

    store = ObjectStore(settings.object_store())
    outcomes = []
    for item in found:
        try:
            outcome = _take_in(item, settings, store, ab_deployment)
        except Exception as err:  # storage or Prefect still failing after the task's retries
            logger.error("intake error key=%s error=%s: left for the next poll", item.key, err)
            outcome = IntakeOutcome(item.key, "error", error=f"{type(err).__name__}: {err}")
        if outcome is not None:
            outcomes.append(outcome)
    report_intake_task(outcomes)
    report = IntakeReport(outcomes)
    logger.info(
        "intake done accepted=%d rejected=%d errors=%d",
        len(report.by_outcome("accepted")),
        len(report.by_outcome("rejected")),
        len(report.by_outcome("error")),
    )
    if report.by_outcome("error"):
        raise IntakeError("could not handle " + ", ".join(o.source_key for o in report.by_outcome("error")))
    return report


def _take_in(
    item: IntakeObject, settings: Settings, store: ObjectStore, ab_deployment: str
) -> IntakeOutcome | None:
    logger = get_run_logger()
    check = check_sheet_task(item, settings)
    if check is None:
        logger.info("intake object gone key=%s: another poll took it", item.key)
        return None
    if not check.usable:
        key = f"{REJECTED_PREFIX}{item.stamped_name}"
        error_key = f"{key}.error.txt"
        # The explanation first: whoever finds the rejected file finds why beside it.
        put_error_task(error_key, error_text(item, check, store.uri(item.key)), settings)
        copy_object_task(item, key, settings)
        delete_object_task(item.key, settings)
        logger.warning("sheet rejected key=%s to=%s problems=%s", item.key, key, " | ".join(check.reasons))
        return IntakeOutcome(item.key, "rejected", key=key, error_key=error_key, check=check)

    key = f"{ACCEPTED_PREFIX}{item.stamped_name}"
    sheet_uri = store.uri(key)
    copy_object_task(item, key, settings)
    run_id, run_name = start_ab_run_task(
        ab_deployment, sheet_uri, check.experiments, f"intake:{key}:{item.etag}"
    )
    # Last: until the run exists the original stays, and the next poll finishes the job.
    delete_object_task(item.key, settings)
    logger.info(
        "sheet accepted key=%s sheet_uri=%s experiments=%s variants=%d row_problems=%d flow_run=%s (%s)",
        item.key,
        sheet_uri,
        ",".join(check.experiments),
        check.variants,
        len(check.row_problems),
        run_name,
        run_id,
    )
    return IntakeOutcome(
        item.key,
        "accepted",
        key=key,
        sheet_uri=sheet_uri,
        flow_run_id=run_id,
        flow_run_name=run_name,
        check=check,
    )
