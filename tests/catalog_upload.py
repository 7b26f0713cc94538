"""Putting a test's catalog into the object store, as a person uploading one would."""

from __future__ import annotations

import io
from datetime import datetime

import pyarrow as pa
import pyarrow.parquet as pq

from catalogs.schema import CATALOG_SCHEMA
from infra.objectstore import ObjectStore


def upload_catalog(store: ObjectStore, key: str, rows: list[dict], updated_at: datetime) -> str:
    """Store ``rows``, each stamped ``updated_at``, as a Parquet catalog at ``key``; return its URI."""
    buffer = io.BytesIO()
    table = pa.Table.from_pylist([{**row, "updated_at": updated_at} for row in rows], schema=CATALOG_SCHEMA)
    pq.write_table(table, buffer)
    store.put_bytes(key, buffer.getvalue(), "application/vnd.apache.parquet")
    return store.uri(key)
