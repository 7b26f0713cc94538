"""A/B outputs per experiment: the validated sheet, the manifest and a contact sheet, beside the clips.

experiments/<experiment>/<variant>/<clip_id>.mp4|.jpg|.webp      the clips (written as they finish)
experiments/<experiment>/runs/<run_id>/sheet.parquet            the experiment's rows of the sheet
experiments/<experiment>/runs/<run_id>/manifest.parquet|.json   one entry per planned sample
experiments/<experiment>/runs/<run_id>/contact-sheet.jpg        a labelled grid: a row per variant
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from catalogs.sheets import SheetReadResult
from infra.objectstore import ObjectStore
from tasks.contact_sheet import ContactRow, ContactSample, build_contact_sheet, contact_sheet_bytes
from tasks.manifest import ManifestLocation, write_manifest
from tasks.markdown import md_text
from tasks.records import ClipStatus, ManifestEntry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExperimentOutputs:
    experiment_id: str
    prefix: str
    manifest: ManifestLocation
    sheet_key: str
    contact_sheet_key: str


def stored_thumbnail(store: ObjectStore, entry: ManifestEntry) -> Image.Image | None:
    """A published (or skipped) clip's thumbnail from the store, for a contact sheet; None without one."""
    if entry.status not in (ClipStatus.PUBLISHED, ClipStatus.SKIPPED) or not entry.thumbnail_key:
        return None
    try:
        with Image.open(io.BytesIO(store.get_bytes(entry.thumbnail_key))) as image:
            image.load()
            return image.copy()
    except Exception as err:  # a missing thumbnail shows as a placeholder, not a failed report
        log.warning("no thumbnail key=%s error=%s", entry.thumbnail_key, err)
        return None


def contact_rows(
    store: ObjectStore, sheet: SheetReadResult, experiment_id: str, entries: Sequence[ManifestEntry]
) -> list[ContactRow]:
    """One row per variant of ``experiment_id``, in sheet order, with its samples in order."""
    rows = []
    for variant in (v for v in sheet.variants if v.experiment_id == experiment_id):
        samples = sorted(
            (e for e in entries if e.experiment_id == experiment_id and e.variant_id == variant.variant_id),
            key=lambda e: e.sample or 0,
        )
        rows.append(
            ContactRow(
                variant_id=variant.variant_id,
                prompt=variant.prompt,
                samples=[
                    ContactSample(f"seed {e.seed}", stored_thumbnail(store, e), str(e.status))
                    for e in samples
                ],
            )
        )
    return rows


def write_experiment_outputs(
    store: ObjectStore, run_id: str, sheet_uri: str, sheet: SheetReadResult, entries: Sequence[ManifestEntry]
) -> list[ExperimentOutputs]:
    """For each experiment of the sheet: its rows as Parquet, its manifest and its contact sheet."""
    outputs = []
    for experiment_id in sorted({v.experiment_id for v in sheet.variants}):
        prefix = f"experiments/{experiment_id}/runs/{run_id}"
        rows = sheet.table.filter(pc.equal(sheet.table["experiment_id"], experiment_id))
        buffer = io.BytesIO()
        pq.write_table(rows, buffer)
        sheet_key = f"{prefix}/sheet.parquet"
        store.put_bytes(sheet_key, buffer.getvalue(), "application/vnd.apache.parquet", {"run-id": run_id})
        mine = [e for e in entries if e.experiment_id == experiment_id]
        manifest = write_manifest(store, run_id, sheet_uri, mine, prefix=prefix)
        image = build_contact_sheet(
            contact_rows(store, sheet, experiment_id, mine), title=f"{experiment_id} - run {run_id}"
        )
        contact_key = f"{prefix}/contact-sheet.jpg"
        store.put_bytes(contact_key, contact_sheet_bytes(image, "JPEG"), "image/jpeg", {"run-id": run_id})
        outputs.append(ExperimentOutputs(experiment_id, prefix, manifest, sheet_key, contact_key))
    return outputs


def experiment_markdown(
    output: ExperimentOutputs,
    entries: Sequence[ManifestEntry],
    link: Callable[[str], str],
    uri: Callable[[str], str],
) -> str:
    """The UI's view of one experiment: its contact sheet, then every sample's preview or reason."""
    mine = sorted(
        (e for e in entries if e.experiment_id == output.experiment_id), key=lambda e: (e.row, e.sample or 0)
    )
    lines = [
        f"# {md_text(output.experiment_id)}",
        "",
        f"![contact sheet]({link(output.contact_sheet_key)})",
        "",
        f"Manifest `{uri(output.manifest.parquet_key)}`; sheet `{uri(output.sheet_key)}`",
        "",
        "| variant | sample | status | preview or reason |",
        "|---|---|---|---|",
    ]
    for entry in mine:
        variant = md_text(entry.variant_id)
        shown = f"![{variant}]({link(entry.preview_key)})" if entry.preview_key else md_text(entry.reason)
        lines.append(f"| {variant} | {entry.sample} | {entry.status} | {shown} |")
    return "\n".join(lines)
