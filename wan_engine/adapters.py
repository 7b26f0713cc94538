"""Adapters (LoRAs) as the engine sees them: files per expert, a scale, and a digest of their bytes.

An A14B LoRA is a pair of files, one per expert (``high_noise`` for ``transformer``,
``low_noise`` for ``transformer_2``); a TI2V-5B LoRA is one file (``dense``). Files are in
any layout diffusers' Wan loader reads (PEFT/diffusers, LightX2V/Lightning and ComfyUI
``diffusion_model.`` keys, kohya/musubi ``lora_unet_`` keys): diffusers converts them.

This module is light (no torch): planning digests adapters to put them in clip ids, and
the generator (``wan_engine.generator``) loads them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from wan_engine.specs import ModelSpec
from wan_engine.weights import materialize_file, split_s3_uri

if TYPE_CHECKING:
    from minio import Minio


def expert_names(spec: ModelSpec) -> tuple[str, ...]:
    """The experts an adapter file can be for, in the order the generator runs them."""
    return ("high_noise", "low_noise") if spec.is_moe else ("dense",)


@dataclass(frozen=True)
class AdapterWeights:
    """One adapter to apply: its files by expert, the scale to apply it at, and its bytes' digest."""

    name: str
    files: tuple[tuple[str, str], ...]  # (expert, local path or s3:// URI), experts in run order
    scale: float = 1.0
    digest: str | None = None  # adapter_digest() of the files; what clip ids and swaps compare

    def file_for(self, expert: str) -> str | None:
        return dict(self.files).get(expert)

    @property
    def key(self) -> tuple[str, str | None, float]:
        """What makes two uses of an adapter the same: name, bytes and scale."""
        return self.name, self.digest, self.scale


def adapter_cache(model_cache_dir: Path) -> Path:
    """Where adapter files fetched from an object store are kept, beside the weights."""
    return Path(model_cache_dir) / "adapters"


def local_adapter(adapter: AdapterWeights, cache_dir: Path, client: Minio | None = None) -> AdapterWeights:
    """``adapter`` with every file a local path: ``s3://`` files fetched into ``cache_dir`` once per host
    (again only when their ETag changes)."""
    files = tuple((expert, str(materialize_file(uri, cache_dir, client))) for expert, uri in adapter.files)
    return AdapterWeights(name=adapter.name, files=files, scale=adapter.scale, digest=adapter.digest)


# Local files already hashed in this process, by (path, size, mtime): a nightly run digests each
# adapter once, not once per row.
_local_digests: dict[tuple[str, int, int], str] = {}


def _file_digest(uri: str, client: Minio | None) -> str:
    if uri.startswith("s3://"):
        if client is None:
            raise ValueError(f"{uri} is in an object store, but no S3 client was given")
        bucket, key = split_s3_uri(uri)
        # The ETag changes with the bytes (an MD5, or a digest of part MD5s for multipart uploads).
        return client.stat_object(bucket, key).etag
    path = Path(uri).expanduser()
    stat = path.stat()
    cache_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if cache_key not in _local_digests:
        digest = hashlib.sha256()
        with path.open("rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
        _local_digests[cache_key] = digest.hexdigest()
    return _local_digests[cache_key]


def adapter_digest(files: tuple[tuple[str, str], ...], client: Minio | None = None) -> str:
    """A short digest of an adapter's files' bytes (per expert): new bytes, new clip ids.

    Raises ``FileNotFoundError`` (local) or minio's ``S3Error`` (object store) for a missing file.
    """
    parts = [f"{expert}:{_file_digest(uri, client)}" for expert, uri in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
