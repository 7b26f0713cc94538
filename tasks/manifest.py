"""The run manifest: one row per planned clip or rejected catalog row, as Parquet and JSON."""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq

from infra.access import QUARANTINE_PREFIX
from infra.objectstore import ObjectStore
from tasks.records import ClipStatus, ManifestEntry, manifest_schema


@dataclass(frozen=True)
class ManifestLocation:
    parquet_key: str  # what readers see: quarantined clips' prompts left out
    json_key: str
    counts: dict[str, int]
    review_prefix: str | None = None  # the whole manifest, with those prompts, where only writers read


def manifest_table(entries: Sequence[ManifestEntry]) -> pa.Table:
    """The entries as one table, ordered by row, with the schema of their class.

    Entries of a subclass with more fields (a fixture, an extension) get those columns too; a record
    whose keys are not exactly the schema's columns is refused, never silently cut down.
    """
    entry_class = _common_class(entries)
    schema = manifest_schema(entry_class)
    ordered = sorted(entries, key=lambda e: (e.row, e.clip_id or ""))
    records = [e.to_record() for e in ordered]
    for record in records:
        if list(record) != schema.names:
            unknown = sorted(set(record) - set(schema.names))
            raise ValueError(
                f"manifest record does not match {entry_class.__name__}'s columns: "
                f"unknown {unknown}, missing {sorted(set(schema.names) - set(record))}"
            )
    return pa.Table.from_pylist(records, schema=schema)


def _common_class(entries: Sequence[ManifestEntry]) -> type[ManifestEntry]:
    """The most derived entry class, when every entry is an instance of it."""
    classes = {type(e) for e in entries} or {ManifestEntry}
    for candidate in classes:
        if all(issubclass(candidate, other) for other in classes):
            return candidate
    raise TypeError(f"manifest entries of unrelated classes: {sorted(c.__name__ for c in classes)}")


def status_counts(entries: Sequence[ManifestEntry]) -> dict[str, int]:
    return dict(sorted(Counter(str(e.status) for e in entries).items()))


def write_manifest(
    store: ObjectStore,
    run_id: str,
    source_uri: str,
    entries: Sequence[ManifestEntry],
    prefix: str | None = None,
) -> ManifestLocation:
    """Store the manifest as ``manifest.parquet`` and ``manifest.json`` under ``prefix`` (``runs/<run_id>``).

    ``source_uri`` is the catalog or prompt sheet the run read. Readers (people, the website) may read
    ``prefix``, so there a quarantined clip's prompt is left out (its ``prompt_sha256`` stays): a refused
    prompt is the text the content policy exists to keep from them. The whole manifest then also goes
    under the quarantine prefix, for reviewers.
    """
    prefix = prefix or f"runs/{run_id}"
    counts = status_counts(entries)
    redacted = [replace(e, prompt=None) if e.status == ClipStatus.QUARANTINED else e for e in entries]
    review_prefix = None
    if redacted != list(entries):
        review_prefix = QUARANTINE_PREFIX + prefix
        _put_manifest(store, run_id, source_uri, entries, review_prefix)
    _put_manifest(store, run_id, source_uri, redacted, prefix)
    return ManifestLocation(f"{prefix}/manifest.parquet", f"{prefix}/manifest.json", counts, review_prefix)


def _put_manifest(
    store: ObjectStore, run_id: str, source_uri: str, entries: Sequence[ManifestEntry], prefix: str
) -> None:
    table = manifest_table(entries)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    metadata = {"run-id": run_id}
    store.put_bytes(
        f"{prefix}/manifest.parquet", buffer.getvalue(), "application/vnd.apache.parquet", metadata
    )
    document = {
        "run_id": run_id,
        "source": source_uri,
        "written_at": datetime.now(UTC).isoformat(),
        "counts": status_counts(entries),
        "clips": table.to_pylist(),
    }
    store.put_bytes(
        f"{prefix}/manifest.json",
        json.dumps(document, indent=1, ensure_ascii=False, default=_iso_time).encode(),
        "application/json",
        metadata,
    )


def _iso_time(value: object) -> str:
    """Timestamps in the JSON manifest as ISO 8601, as people and tools read them."""
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
