"""Where a model's diffusers folder comes from: a local path, or an S3 prefix fetched once into a cache.

A model root is either a folder or ``s3://bucket/prefix``; each model is the
sub-folder named by its spec (``Wan2.2-T2V-A14B-Diffusers``, ...). Object-store
folders are downloaded once per host: a completion record of every object's ETag
makes later loads local, and a file lock keeps several actors on one host from
downloading the same weights at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from wan_engine.specs import ModelSpec

if TYPE_CHECKING:
    from minio import Minio

log = logging.getLogger(__name__)

_COMPLETE = ".wanfactory-complete.json"


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key.strip("/")


def model_location(model_root: str, spec: ModelSpec) -> str:
    """The folder or S3 prefix of ``spec``'s weights under ``model_root``."""
    return f"{model_root.rstrip('/')}/{spec.folder}"


def model_version(location: str, client: Minio | None = None) -> str | None:
    """A short digest that changes whenever the weights at ``location`` change; None if there are none.

    For an S3 prefix, every object's key and ETag (one listing, no download); for a folder, every
    file's path and size plus the contents of its JSON configs. Planning puts it in every clip id,
    so new weights under the same name regenerate the clips they make.
    """
    if location.startswith("s3://"):
        if client is None:
            raise ValueError(f"{location} is in an object store, but no S3 client was given")
        bucket, prefix = split_s3_uri(location)
        parts = sorted(
            f"{obj.object_name.removeprefix(prefix)}:{obj.etag}"
            for obj in client.list_objects(bucket, prefix=f"{prefix}/", recursive=True)
        )
    else:
        folder = Path(location).expanduser()
        files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
        parts = [
            f"{p.relative_to(folder)}:{p.stat().st_size}"
            + (f":{p.read_text()}" if p.suffix == ".json" else "")
            for p in files
            if p.name != _COMPLETE
        ]
    if not parts:
        return None
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def materialize(location: str, cache_dir: Path, client: Minio | None = None) -> Path:
    """A local diffusers folder for ``location`` (a path, or ``s3://`` fetched into ``cache_dir``)."""
    if not location.startswith("s3://"):
        path = Path(location).expanduser()
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"no diffusers pipeline (model_index.json) in {path}")
        return path
    if client is None:
        raise ValueError(f"{location} is in an object store, but no S3 client was given")
    bucket, prefix = split_s3_uri(location)
    local = Path(cache_dir) / bucket / prefix
    local.mkdir(parents=True, exist_ok=True)
    with open(local.parent / f".{local.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        objects = {
            obj.object_name: obj.etag
            for obj in client.list_objects(bucket, prefix=f"{prefix}/", recursive=True)
        }
        if f"{prefix}/model_index.json" not in objects:
            raise FileNotFoundError(f"no diffusers pipeline (model_index.json) under {location}")
        record = local / _COMPLETE
        if record.is_file() and json.loads(record.read_text()) == objects:
            return local
        log.info("fetching weights location=%s objects=%d cache=%s", location, len(objects), local)
        for key in objects:
            relative = PurePosixPath(key).relative_to(prefix)
            dest = local / relative
            dest.parent.mkdir(parents=True, exist_ok=True)
            # fget_object writes to a part file and renames it: no half-written weights.
            client.fget_object(bucket, key, str(dest))
        record.write_text(json.dumps(objects, sort_keys=True))
    return local


def materialize_file(uri: str, cache_dir: Path, client: Minio | None = None) -> Path:
    """A local path for one file (an adapter's): a path as given, or ``s3://`` fetched into ``cache_dir``
    once per host and fetched again only when its ETag changes."""
    if not uri.startswith("s3://"):
        path = Path(uri).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no file at {path}")
        return path
    if client is None:
        raise ValueError(f"{uri} is in an object store, but no S3 client was given")
    bucket, key = split_s3_uri(uri)
    local = Path(cache_dir) / bucket / key
    local.parent.mkdir(parents=True, exist_ok=True)
    record = local.parent / f".{local.name}.etag"
    with open(local.parent / f".{local.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        etag = client.stat_object(bucket, key).etag
        if local.is_file() and record.is_file() and record.read_text() == etag:
            return local
        log.info("fetching adapter uri=%s cache=%s", uri, local)
        client.fget_object(bucket, key, str(local))
        record.write_text(etag)
    return local
