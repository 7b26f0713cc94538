"""The run manifest: one row per planned clip or rejected catalog row, as Parquet and JSON."""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq

from infra.objectstore import ObjectStore
from tasks.records import ManifestEntry

MANIFEST_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("row", pa.int64()),
        ("sku", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("stage", pa.string()),
        ("clip_id", pa.string()),
        ("model", pa.string()),
        ("seed", pa.int64()),
        ("prompt", pa.string()),
        ("prompt_sha256", pa.string()),
        ("image_uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("num_frames", pa.int32()),
        ("fps", pa.int32()),
        ("clip_key", pa.string()),
        ("thumbnail_key", pa.string()),
        ("video_bytes", pa.int64()),
        ("generate_started_at", pa.timestamp("us", tz="UTC")),  # when the clip took its GPU
        ("generate_seconds", pa.float64()),
        ("expert_calls", pa.string()),  # JSON: transformer forward passes per expert
        ("worker", pa.string()),
        ("engine_mode", pa.string()),  # "exact", or the opt-in approximations that made the clip
        ("profile", pa.string()),  # the post-production profile
        ("experiment_id", pa.string()),  # A/B runs: experiment, variant and sample of the clip
        ("variant_id", pa.string()),
        ("sample", pa.int32()),
        ("delivered_width", pa.int32()),
        ("delivered_height", pa.int32()),
        ("delivered_fps", pa.int32()),
        ("delivered_frames", pa.int32()),
        ("preview_key", pa.string()),
        ("quarantine_key", pa.string()),  # a blocked clip, under the prefix normal readers cannot list
        ("watermark_payload", pa.string()),  # hex; `wanfactory verify FILE` reads it back
        ("filter_scores", pa.string()),  # JSON: the frame classifier's highest score per label
        ("postprocess", pa.string()),  # JSON: each stage's parameters, outcome and CPU seconds
        ("attempts", pa.int32()),  # generation attempts; more than one when an actor died during the clip
        ("retried_after", pa.string()),  # JSON: the errors that lost the earlier attempts
    ]
)


@dataclass(frozen=True)
class ManifestLocation:
    parquet_key: str
    json_key: str
    counts: dict[str, int]


def manifest_table(entries: Sequence[ManifestEntry]) -> pa.Table:
    ordered = sorted(entries, key=lambda e: (e.row, e.clip_id or ""))
    return pa.Table.from_pylist([e.to_record() for e in ordered], schema=MANIFEST_SCHEMA)


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

    ``source_uri`` is the catalog or prompt sheet the run read.
    """
    table = manifest_table(entries)
    counts = status_counts(entries)
    prefix = prefix or f"runs/{run_id}"
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
        "counts": counts,
        "clips": table.to_pylist(),
    }
    store.put_bytes(
        f"{prefix}/manifest.json",
        json.dumps(document, indent=1, ensure_ascii=False, default=_iso_time).encode(),
        "application/json",
        metadata,
    )
    return ManifestLocation(f"{prefix}/manifest.parquet", f"{prefix}/manifest.json", counts)


def _iso_time(value: object) -> str:
    """Timestamps in the JSON manifest as ISO 8601, as people and tools read them."""
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
