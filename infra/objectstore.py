"""The S3 object store (MinIO in production), through the minio SDK.

One small wrapper over ``minio.Minio`` bound to the configured bucket: what the
pipeline stores, lists and links. It is built from an :class:`ObjectStoreConfig`,
which pickles, so Ray workers can open their own connection.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import certifi
import urllib3
from minio import Minio
from minio.error import S3Error

from infra.settings import ObjectStoreConfig

log = logging.getLogger(__name__)


# What an S3 server answers when the credential is wrong or not allowed.
_REFUSED_CREDENTIALS = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken"}
)


def _http_client(config: ObjectStoreConfig) -> urllib3.PoolManager:
    """minio's own connection pool, with the configured timeouts and retries instead of its defaults
    (300 s to connect and to read, 5 retries: an endpoint that never answers hangs for half an hour)."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=config.connect_timeout_s, read=config.read_timeout_s),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(
            total=config.retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
        ),
    )


def refused_credential(err: BaseException) -> bool:
    """Whether the store refused the credential: the same request fails the same way again, so it is
    never retried."""
    return isinstance(err, S3Error) and err.code in _REFUSED_CREDENTIALS


def unreachable(err: Exception, endpoint: str) -> str | None:
    """One line for a person when ``err`` says the object store at ``endpoint`` cannot be used (it does not
    answer, or it refuses the credential); None for any other error."""
    if refused_credential(err):
        return f"the object store at {endpoint} refused the credential ({err.code}): {err.message}"
    if isinstance(err, urllib3.exceptions.HTTPError):
        reason = getattr(err, "reason", None) or err
        return f"the object store at {endpoint} did not answer ({type(reason).__name__}: {reason})"
    return None


class ObjectStore:
    """The configured bucket of an S3 endpoint."""

    def __init__(self, config: ObjectStoreConfig) -> None:
        self.config = config
        self.bucket = config.bucket
        self.client = Minio(
            config.endpoint,
            access_key=config.access_key,
            secret_key=config.secret_key.get_secret_value(),
            secure=config.secure,
            region=config.region,
            http_client=_http_client(config),
        )

    def ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            self.client.make_bucket(self.bucket)
            log.info("bucket created bucket=%s endpoint=%s", self.bucket, self.config.endpoint)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def put_bytes(
        self, key: str, data: bytes, content_type: str, metadata: dict[str, str] | None = None
    ) -> str:
        """Store ``data`` at ``key``; returns the object's ETag."""
        self.client.put_object(
            self.bucket, key, io.BytesIO(data), len(data), content_type=content_type, metadata=metadata
        )
        # Multipart uploads return no ETag on some servers (minio SDK 7 against Ceph RGW); stat has it.
        return self.client.stat_object(self.bucket, key).etag

    def put_file(
        self, key: str, path: Path, content_type: str, metadata: dict[str, str] | None = None
    ) -> str:
        """Upload a local file to ``key``; returns the object's ETag."""
        self.client.fput_object(self.bucket, key, str(path), content_type=content_type, metadata=metadata)
        return self.client.stat_object(self.bucket, key).etag

    def get_bytes(self, key: str) -> bytes:
        response = self.client.get_object(self.bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, key)
        except S3Error as err:
            if err.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return False
            raise
        return True

    def metadata(self, key: str) -> dict[str, str]:
        """The object's user metadata, keys without the ``x-amz-meta-`` prefix."""
        stat = self.client.stat_object(self.bucket, key)
        prefix = "x-amz-meta-"
        return {k.lower()[len(prefix) :]: v for k, v in stat.metadata.items() if k.lower().startswith(prefix)}

    def list_keys(self, prefix: str) -> Iterator[str]:
        for obj in self.client.list_objects(self.bucket, prefix=prefix, recursive=True):
            yield obj.object_name

    def presigned_url(self, key: str, expires: timedelta) -> str:
        return self.client.presigned_get_object(self.bucket, key, expires=expires)

    def upload_folder(self, folder: Path, prefix: str) -> int:
        """Upload every file under ``folder`` to ``prefix/<relative path>``; returns the count."""
        count = 0
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            self.client.fput_object(
                self.bucket, f"{prefix.rstrip('/')}/{path.relative_to(folder).as_posix()}", str(path)
            )
            count += 1
        return count
