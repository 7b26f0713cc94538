"""Where catalogs come from: a local Parquet file or an object in the S3 store.

Image references in a catalog may be relative; they are resolved against the
catalog's own location, so a catalog and its images can move together.
"""

from __future__ import annotations

import io
import posixpath
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
from minio.error import S3Error

from catalogs.schema import CatalogSchemaError, ValidatedCatalog, validate_catalog

if TYPE_CHECKING:
    from minio import Minio


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket or not key:
        raise ValueError(f"not an s3://bucket/key URI: {uri!r}")
    return bucket, key


def read_bytes(uri: str, client: Minio | None = None) -> bytes:
    """The bytes at a local path or ``s3://bucket/key``."""
    if uri.startswith("s3://"):
        if client is None:
            raise ValueError(f"{uri} is in an object store, but no S3 client was given")
        bucket, key = split_s3_uri(uri)
        try:
            response = client.get_object(bucket, key)
        except S3Error as err:
            if err.code in ("NoSuchKey", "NoSuchBucket"):
                raise FileNotFoundError(f"no object at {uri}") from None
            raise
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()
    return Path(uri).expanduser().read_bytes()


def read_parquet(uri: str, client: Minio | None = None) -> pa.Table:
    """A Parquet table from a local path or ``s3://bucket/key``; :class:`CatalogSchemaError` if it is none."""
    source = io.BytesIO(read_bytes(uri, client)) if uri.startswith("s3://") else Path(uri).expanduser()
    try:
        return pq.read_table(source)
    except pa.ArrowException as err:
        raise CatalogSchemaError(f"{uri} is not a Parquet file ({err})") from None


def resolve_reference(reference: str, catalog_uri: str) -> str:
    """An image reference made absolute: s3:// and absolute paths stay, others join the catalog's folder."""
    if reference.startswith("s3://") or Path(reference).is_absolute():
        return reference
    if catalog_uri.startswith("s3://"):
        bucket, key = split_s3_uri(catalog_uri)
        return f"s3://{bucket}/{posixpath.normpath(posixpath.join(posixpath.dirname(key), reference))}"
    return str((Path(catalog_uri).expanduser().resolve().parent / reference).resolve())


def load_catalog(uri: str, client: Minio | None = None) -> ValidatedCatalog:
    """Read and validate the catalog at ``uri``, with image references made absolute."""
    validated = validate_catalog(read_parquet(uri, client))
    rows = [
        row.model_copy(update={"image_uri": resolve_reference(row.image_uri, uri)}) if row.image_uri else row
        for row in validated.rows
    ]
    return ValidatedCatalog(rows, validated.problems)
