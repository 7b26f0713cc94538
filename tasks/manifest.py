"""The run manifest: one row per planned clip or rejected catalog row, as Parquet and JSON."""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from infra.access import QUARANTINE_PREFIX
from infra.objectstore import ObjectStore
from tasks.records import ClipStatus, ManifestEntry, manifest_schema

log = logging.getLogger(__name__)

# Beside each spooled object: its content type and metadata, for the upload that delivers it.
_SPOOL_META = ".spool-meta.json"


@dataclass(frozen=True)
class ManifestLocation:
    parquet_key: str  # what readers see: quarantined clips' prompts left out
    json_key: str
    counts: dict[str, int]
    review_prefix: str | None = None  # the whole manifest, with those prompts, where only writers read
    spooled: bool = False  # the store did not take it: kept in the local spool until it does


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
    *,
    complete: bool = True,
    spool_dir: Path | None = None,
) -> ManifestLocation:
    """Store the manifest as ``manifest.parquet`` and ``manifest.json`` under ``prefix`` (``runs/<run_id>``).

    ``source_uri`` is the catalog or prompt sheet the run read; ``complete=False`` marks a checkpoint
    written while the run goes on. Readers (people, the website) may read ``prefix``, so there a
    quarantined clip's prompt is left out (its ``prompt_sha256`` stays): a refused prompt is the text
    the content policy exists to keep from them. The whole manifest then also goes under the quarantine
    prefix, for reviewers.

    With ``spool_dir``, a manifest the store cannot take is kept there (:func:`flush_spool` delivers it
    later) instead of being lost with the run's record: ``spooled`` in the location says so.
    """
    prefix = prefix or f"runs/{run_id}"
    counts = status_counts(entries)
    redacted = [replace(e, prompt=None) if e.status == ClipStatus.QUARANTINED else e for e in entries]
    review_prefix = None
    documents = _manifest_objects(run_id, source_uri, redacted, prefix, complete)
    if redacted != list(entries):
        review_prefix = QUARANTINE_PREFIX + prefix
        documents += _manifest_objects(run_id, source_uri, entries, review_prefix, complete)
    spooled = _deliver(store, documents, spool_dir)
    return ManifestLocation(
        f"{prefix}/manifest.parquet", f"{prefix}/manifest.json", counts, review_prefix, spooled
    )


@dataclass(frozen=True)
class _StoredObject:
    key: str
    data: bytes
    content_type: str
    metadata: dict[str, str]


def _manifest_objects(
    run_id: str, source_uri: str, entries: Sequence[ManifestEntry], prefix: str, complete: bool
) -> list[_StoredObject]:
    table = manifest_table(entries)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    metadata = {"run-id": run_id, "complete": str(complete).lower()}
    document = {
        "run_id": run_id,
        "source": source_uri,
        "written_at": datetime.now(UTC).isoformat(),
        "complete": complete,  # False: a checkpoint of a run still going (or one that died)
        "counts": status_counts(entries),
        "clips": table.to_pylist(),
    }
    text = json.dumps(document, indent=1, ensure_ascii=False, default=_iso_time).encode()
    return [
        _StoredObject(
            f"{prefix}/manifest.parquet", buffer.getvalue(), "application/vnd.apache.parquet", metadata
        ),
        _StoredObject(f"{prefix}/manifest.json", text, "application/json", metadata),
    ]


def _deliver(store: ObjectStore, objects: list[_StoredObject], spool_dir: Path | None) -> bool:
    """Put ``objects``; True when the store could not take them and they were spooled instead."""
    try:
        for obj in objects:
            store.put_bytes(obj.key, obj.data, obj.content_type, obj.metadata)
            if spool_dir is not None:
                # An older version of this object waiting in the spool (a checkpoint written during an
                # outage) must not overwrite this one when the spool is delivered later.
                stale = spool_dir / store.bucket / obj.key
                stale.unlink(missing_ok=True)
                stale.with_name(stale.name + _SPOOL_META).unlink(missing_ok=True)
    except Exception as err:
        if spool_dir is None:
            raise
        for obj in objects:
            path = spool_dir / store.bucket / obj.key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(obj.data)
            path.with_name(path.name + _SPOOL_META).write_text(
                json.dumps({"content_type": obj.content_type, "metadata": obj.metadata})
            )
        log.warning(
            "manifest spooled, the object store did not take it dir=%s error=%s",
            spool_dir,
            type(err).__name__,
        )
        return True
    return False


def flush_spool(store: ObjectStore, spool_dir: Path) -> list[str]:
    """Deliver the manifests spooled for ``store``'s bucket (oldest first) and forget them; returns their
    keys. Raises what the store raises when it still cannot take them; what was delivered is gone from
    the spool."""
    root = spool_dir / store.bucket
    delivered = []
    meta_files = sorted(root.rglob(f"*{_SPOOL_META}"), key=lambda path: path.stat().st_mtime)
    for meta in meta_files:
        path = meta.with_name(meta.name.removesuffix(_SPOOL_META))
        facts = json.loads(meta.read_text())
        key = path.relative_to(root).as_posix()
        store.put_bytes(key, path.read_bytes(), facts["content_type"], facts["metadata"])
        path.unlink()
        meta.unlink()
        delivered.append(key)
    if delivered:
        log.info("spooled manifests delivered count=%d", len(delivered))
    return delivered


def _iso_time(value: object) -> str:
    """Timestamps in the JSON manifest as ISO 8601, as people and tools read them."""
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
