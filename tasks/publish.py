"""Finishing a generated clip: encode it and publish video and thumbnail to the object store.

:func:`finish_clip` never raises for a clip's own failure: it returns the manifest
entry that says where and why the clip stopped, so one bad clip never sinks a batch.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from infra.objectstore import ObjectStore
from infra.settings import ObjectStoreConfig
from tasks.encode import encode_clip
from tasks.records import ClipStatus, FinishedClip, GeneratedClip, ManifestEntry, failed_entry

log = logging.getLogger(__name__)


def clip_metadata(finished: FinishedClip, run_id: str) -> dict[str, str]:
    """The S3 user metadata that identifies a published clip without its manifest."""
    spec = finished.spec
    return {
        "clip-id": spec.clip_id,
        "sku": spec.sku,
        "model": spec.model,
        "seed": str(spec.seed),
        "prompt-sha256": spec.prompt_sha256,
        "run-id": run_id,
        "frames": str(finished.frame_count),
        "fps": str(finished.fps),
    }


def publish_clip(store: ObjectStore, finished: FinishedClip, run_id: str) -> ManifestEntry:
    """Upload thumbnail then video; the video's key is what marks the clip as done, so it goes last."""
    spec, metadata = finished.spec, clip_metadata(finished, run_id)
    store.put_file(spec.thumbnail_key, finished.thumbnail_path, "image/jpeg", metadata)
    store.put_file(spec.clip_key, finished.video_path, "video/mp4", metadata)
    generated = finished.generated
    return ManifestEntry.for_spec(
        spec,
        run_id,
        ClipStatus.PUBLISHED,
        stage="publish",
        clip_key=spec.clip_key,
        thumbnail_key=spec.thumbnail_key,
        video_bytes=finished.video_path.stat().st_size,
        generate_seconds=round(generated.seconds, 3),
        expert_calls=generated.expert_calls,
        worker=generated.worker,
        engine_mode=generated.engine_mode,
    )


def finish_clip(generated: GeneratedClip, store_config: ObjectStoreConfig, run_id: str) -> ManifestEntry:
    """Encode and publish one generated clip; any failure becomes a failed entry naming its stage."""
    spec = generated.spec

    def failed(stage: str, reason: str) -> ManifestEntry:
        log.warning("clip failed clip_id=%s sku=%s stage=%s reason=%s", spec.clip_id, spec.sku, stage, reason)
        return failed_entry(
            spec,
            run_id,
            stage,
            reason,
            generate_seconds=round(generated.seconds, 3),
            expert_calls=generated.expert_calls,
            worker=generated.worker,
            engine_mode=generated.engine_mode,
        )

    if generated.error is not None:
        return failed("generate", generated.error)
    with tempfile.TemporaryDirectory(prefix="wanfactory-") as tmp:
        try:
            finished = encode_clip(generated, Path(tmp))
        except Exception as err:
            return failed("encode", f"{type(err).__name__}: {err}")
        try:
            return publish_clip(ObjectStore(store_config), finished, run_id)
        except Exception as err:
            return failed("upload", f"{type(err).__name__}: {err}")
