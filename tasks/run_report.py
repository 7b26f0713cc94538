"""A run's summary for people: the markdown of the ``run-summary`` artifact every run posts.

Its counts, the cost line and where the manifest is; for a nightly run, the night's new clips as a
contact sheet of their thumbnails (the A/B runs' contact sheet, :mod:`tasks.contact_sheet`) and their
animated previews; the cost per model and recipe (:mod:`tasks.cost`); the failures grouped by reason with
an example each, then the first of them row by row. Its links are presigned and expire: it says when.
Text from catalogs and sheets (SKUs, reasons) is escaped (:func:`tasks.markdown.md_text`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from infra.objectstore import ObjectStore
from tasks.contact_sheet import ContactRow, ContactSample, build_contact_sheet, contact_sheet_bytes
from tasks.cost import RunCosts, cost_markdown, cost_sentence
from tasks.experiments import stored_thumbnail
from tasks.manifest import ManifestLocation, status_counts
from tasks.markdown import md_text
from tasks.records import ClipStatus, ManifestEntry

# New clips on the contact sheet and in the previews table (the first, by row), and failed rows listed one
# by one: a night of 10,000 clips stays a page a person opens. The clip-summary table has every clip.
NEW_CLIPS_SHOWN = 36
FAILURES_LISTED = 50
# A reason's kind is at most this long in the failures table.
_REASON_KIND_CHARS = 100


@dataclass(frozen=True)
class FailureGroup:
    """Failed or quarantined clips that stopped at one stage for one kind of reason."""

    status: str
    stage: str
    reason: str  # the kind: see :func:`reason_kind`
    entries: list[ManifestEntry]


def _without_row(entry: ManifestEntry) -> str:
    """The entry's reason less the row it names at its start ("row 3 (sku 'X'), "): the entry's own row."""
    for prefix in (f"row {entry.row} (sku {entry.sku!r}), ", f"row {entry.row}, "):
        if entry.reason.startswith(prefix):
            return entry.reason[len(prefix) :]
    return entry.reason


def reason_kind(entry: ManifestEntry) -> str:
    """What kind of reason stopped the entry, alike across rows: its first problem without the row, up to its
    first ': ' ("field 'model'", "RuntimeError", "blocked by the frame classifier")."""
    first = _without_row(entry).split("; ", 1)[0]
    return first.split(": ", 1)[0][:_REASON_KIND_CHARS]


def failure_groups(entries: Sequence[ManifestEntry]) -> list[FailureGroup]:
    """The failed and quarantined entries by status, stage and kind of reason; the largest group first, and
    each group's entries by row."""
    groups: dict[tuple[str, str, str], list[ManifestEntry]] = {}
    for entry in sorted(entries, key=lambda e: e.row):
        if entry.status in (ClipStatus.FAILED, ClipStatus.QUARANTINED):
            groups.setdefault((str(entry.status), entry.stage, reason_kind(entry)), []).append(entry)
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
    return [FailureGroup(status, stage, reason, members) for (status, stage, reason), members in ordered]


def new_clips(entries: Sequence[ManifestEntry]) -> list[ManifestEntry]:
    """The clips the run published, by row."""
    return sorted(
        (e for e in entries if e.status == ClipStatus.PUBLISHED), key=lambda e: (e.row, e.sample or 0)
    )


def write_new_clips_contact_sheet(
    store: ObjectStore, run_id: str, entries: Sequence[ManifestEntry]
) -> str | None:
    """The contact sheet of the run's new clips (the first :data:`NEW_CLIPS_SHOWN`): a row per model and
    recipe, each clip's thumbnail captioned by its SKU, stored as ``runs/<run_id>/contact-sheet.jpg``; its
    key, or None when the run published nothing."""
    shown = new_clips(entries)[:NEW_CLIPS_SHOWN]
    if not shown:
        return None
    groups: dict[tuple[str, str], list[ManifestEntry]] = {}
    for entry in shown:
        groups.setdefault((entry.model or "", entry.recipe or ""), []).append(entry)
    rows = [
        ContactRow(
            variant_id=f"{model} {recipe}",
            prompt=f"{len(clips)} new clip(s)",
            samples=[ContactSample(e.label, stored_thumbnail(store, e), str(e.status)) for e in clips],
        )
        for (model, recipe), clips in groups.items()
    ]
    image = build_contact_sheet(rows, title=f"New clips - run {run_id}", nouns=("model/recipe", "new clip"))
    key = f"runs/{run_id}/contact-sheet.jpg"
    store.put_bytes(key, contact_sheet_bytes(image, "JPEG"), "image/jpeg", {"run-id": run_id})
    return key


@dataclass(frozen=True)
class Links:
    """How the summary names objects: presigned links (which expire) and s3:// URIs."""

    presigned: Callable[[str], str]
    uri: Callable[[str], str]
    expiry_hours: int
    expires_at: datetime  # UTC: when the links made now stop working


def run_summary_markdown(
    run_id: str,
    entries: Sequence[ManifestEntry],
    manifest: ManifestLocation,
    costs: RunCosts,
    links: Links,
    contact_sheet_key: str | None = None,
) -> str:
    """The ``run-summary`` artifact: counts, the cost line, the manifest; the new clips when
    ``contact_sheet_key`` is given (the nightly run); the cost table; the failures by reason and by row."""
    lines = [
        f"# Run {run_id}",
        "",
        " | ".join(f"**{status}**: {count}" for status, count in status_counts(entries).items()),
        "",
        f"Cost: {cost_sentence(costs)}",
        "",
        f"Manifest: `{links.uri(manifest.parquet_key)}` and `{links.uri(manifest.json_key)}`",
        "",
        f"Links expire after {links.expiry_hours} h, at {links.expires_at:%Y-%m-%d %H:%M} UTC.",
    ]
    if contact_sheet_key is not None:
        lines += ["", *_new_clips_section(entries, contact_sheet_key, links)]
    lines += ["", "## Cost", "", *cost_markdown(costs)]
    groups = failure_groups(entries)
    if groups:
        lines += ["", *_failures_section(groups)]
    return "\n".join(lines)


def _new_clips_section(entries: Sequence[ManifestEntry], contact_sheet_key: str, links: Links) -> list[str]:
    clips = new_clips(entries)
    shown = clips[:NEW_CLIPS_SHOWN]
    lines = [
        "## New clips",
        "",
        f"![contact sheet of the new clips]({links.presigned(contact_sheet_key)})",
        "",
        "| sku | model | recipe | preview | clip |",
        "|---|---|---|---|---|",
    ]
    for entry in shown:
        label = md_text(entry.label)
        preview = f"![{label}]({links.presigned(entry.preview_key)})" if entry.preview_key else ""
        clip = f"[mp4]({links.presigned(entry.clip_key)})" if entry.clip_key else ""
        lines.append(f"| {label} | {entry.model} | {entry.recipe} | {preview} | {clip} |")
    if len(clips) > len(shown):
        lines += [
            "",
            f"The first {len(shown)} of {len(clips)} new clips; the clip-summary table has them all.",
        ]
    return lines


def _failures_section(groups: Sequence[FailureGroup]) -> list[str]:
    lines = [
        "## Failures by reason",
        "",
        "| status | stage | reason | clips | example |",
        "|---|---|---|---:|---|",
    ]
    for group in groups:
        example = group.entries[0]
        where = " ".join(filter(None, [f"row {example.row}", md_text(example.label)]))
        lines.append(
            f"| {group.status} | {group.stage} | {md_text(group.reason)} | {len(group.entries)} "
            f"| {where}: {md_text(_without_row(example))} |"
        )
    failures = sorted((e for group in groups for e in group.entries), key=lambda e: e.row)
    listed = failures[:FAILURES_LISTED]
    lines += ["", "## Failed and quarantined", "", "| row | sku or variant | status | stage | reason |"]
    lines += ["|---|---|---|---|---|"]
    lines += [
        f"| {e.row} | {md_text(e.label)} | {e.status} | {e.stage} | {md_text(e.reason)} |" for e in listed
    ]
    if len(failures) > len(listed):
        lines += ["", f"The first {len(listed)} of {len(failures)}; the clip-summary table has them all."]
    return lines
