"""Finishing a generated clip: post-production, then publish (or quarantine) it in the object store.

:class:`Finisher` runs as a CPU Ray actor, never on a GPU actor, so a GPU moves on to its
next clip while this one is post-processed. Ray's batch-inference pattern: what is costly to load
(the frame classifier's model, the profiles' logos) is loaded once in ``__init__`` and serves every
clip. It never raises for a clip's own failure: it returns the manifest entry that says where and
why the clip stopped, so one bad clip never sinks a batch.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from PIL import Image

from catalogs.sources import read_bytes
from infra.access import QUARANTINE_PREFIX
from infra.objectstore import ObjectStore, refused_credential
from infra.settings import ObjectStoreConfig
from tasks import metrics
from tasks.postprod.chain import ChainTools, StageError, finish_frames
from tasks.postprod.content_filter import FrameClassifier
from tasks.postprod.overlay import WatermarkStamps
from tasks.postprod.profile import PostprocessProfile
from tasks.postprod.provenance import ProvenanceParams
from tasks.records import ClipStatus, FinishedClip, GeneratedClip, ManifestEntry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinishingContext:
    """What every finishing task of a run needs; small and picklable, built once by the driver."""

    store: ObjectStoreConfig
    profiles: Mapping[str, PostprocessProfile]
    provenance: ProvenanceParams
    threads: int = 1  # ffmpeg and classifier threads per clip: clips in parallel use the other cores
    upload_retry_seconds: float = 600.0  # how long a finished clip waits out an outage of the store


def _read_logo(location: str, store: ObjectStore) -> Image.Image:
    with Image.open(io.BytesIO(read_bytes(location, store.client))) as image:
        image.load()
        return image.copy()


def clip_metadata(finished: FinishedClip, run_id: str) -> dict[str, str]:
    """The S3 user metadata that identifies a published clip without its manifest."""
    clip = finished.clip
    metadata = {
        "clip-id": clip.clip_id,
        "model": clip.model.name,
        "seed": str(clip.request.seed),
        "prompt-sha256": clip.prompt_sha256,
        "run-id": run_id,
        "frames": str(finished.frame_count),
        "fps": str(finished.fps),
        "profile": clip.profile,
    }
    if clip.sku is not None:
        metadata["sku"] = clip.sku
    else:
        metadata["experiment-id"] = clip.experiment_id or ""
        metadata["variant-id"] = clip.variant_id or ""
        metadata["sample"] = str(clip.sample)
    if finished.watermark_payload:
        metadata["watermark"] = finished.watermark_payload
    return metadata


def _entry(finished: FinishedClip, run_id: str, status: ClipStatus, **details: object) -> ManifestEntry:
    return ManifestEntry.of_generated(
        finished.generated,
        run_id,
        status,
        delivered_width=finished.width,
        delivered_height=finished.height,
        delivered_fps=finished.fps,
        delivered_frames=finished.frame_count,
        watermark_payload=finished.watermark_payload,
        filter_scores=finished.filter_scores,
        postprocess=[asdict(report) for report in finished.stages],
        **details,
    )


def publish_clip(store: ObjectStore, finished: FinishedClip, run_id: str) -> ManifestEntry:
    """Upload thumbnail, preview, then video; the video's key marks the clip as done, so it goes last."""
    clip, metadata = finished.clip, clip_metadata(finished, run_id)
    store.put_file(clip.thumbnail_key, finished.thumbnail_path, "image/jpeg", metadata)
    if finished.preview_path is not None:
        store.put_file(clip.preview_key, finished.preview_path, "image/webp", metadata)
    store.put_file(clip.clip_key, finished.video_path, "video/mp4", metadata)
    return _entry(
        finished,
        run_id,
        ClipStatus.PUBLISHED,
        stage="publish",
        clip_key=clip.clip_key,
        thumbnail_key=clip.thumbnail_key,
        preview_key=clip.preview_key if finished.preview_path is not None else None,
        video_bytes=finished.video_path.stat().st_size,
    )


def quarantine_clip(store: ObjectStore, finished: FinishedClip, run_id: str) -> ManifestEntry:
    """Put a blocked clip where reviewers with the writer's access can see it and readers cannot."""
    clip, metadata = finished.clip, clip_metadata(finished, run_id)
    reason = "; ".join(finished.blocked)
    key = QUARANTINE_PREFIX + clip.clip_key
    store.put_file(QUARANTINE_PREFIX + clip.thumbnail_key, finished.thumbnail_path, "image/jpeg", metadata)
    store.put_file(key, finished.video_path, "video/mp4", metadata)
    log.warning("clip quarantined clip_id=%s of=%s reason=%s", clip.clip_id, clip.label, reason)
    return _entry(
        finished,
        run_id,
        ClipStatus.QUARANTINED,
        stage="content_filter",
        reason=f"blocked by the frame classifier: {reason}",
        quarantine_key=key,
        video_bytes=finished.video_path.stat().st_size,
    )


class Finisher:
    """Post-produces and publishes a run's clips, one at a time; its tools (the classifier's model, each
    profile's logo and rendered mark) are loaded once."""

    def __init__(self, context: FinishingContext, run_id: str) -> None:
        self.run_id = run_id
        self.profiles = context.profiles
        self.store = ObjectStore(context.store)
        self.upload_retry_seconds = context.upload_retry_seconds
        classifier = FrameClassifier(context.threads)
        self.tools: dict[str, ChainTools] = {}
        # A profile whose logo cannot be read fails its clips at "postprocess", not the finisher.
        self.broken: dict[str, str] = {}
        for name, profile in context.profiles.items():
            try:
                logo = _read_logo(profile.logo_location, self.store) if profile.logo_location else None
            except Exception as err:
                self.broken[name] = f"cannot read the logo {profile.logo_uri!r}: {type(err).__name__}: {err}"
                continue
            mark = replace(profile.visible_watermark, logo=logo) if logo else profile.visible_watermark
            self.tools[name] = ChainTools(
                classifier, context.provenance, WatermarkStamps(mark), context.threads
            )

    def finish(self, generated: GeneratedClip) -> ManifestEntry:
        """Post-process and publish one generated clip; any failure is a failed entry naming its stage."""
        clip = generated.clip

        def failed(stage: str, reason: str) -> ManifestEntry:
            log.warning(
                "clip failed clip_id=%s of=%s stage=%s reason=%s", clip.clip_id, clip.label, stage, reason
            )
            return ManifestEntry.of_generated(
                generated, self.run_id, ClipStatus.FAILED, stage=stage, reason=reason
            )

        if generated.error is not None:
            return failed("generate", generated.error)
        if clip.profile in self.broken:
            return failed("postprocess", self.broken[clip.profile])
        profile, tools = self.profiles[clip.profile], self.tools[clip.profile]
        with tempfile.TemporaryDirectory(prefix="wanfactory-") as tmp:
            try:
                finished = finish_frames(generated, profile, tools, self.run_id, Path(tmp))
            except StageError as err:
                return failed(err.stage, str(err))
            stages = {f"post_{report.stage}": report.seconds for report in finished.stages if report.applied}
            upload_started = time.perf_counter()
            try:
                return self._store(finished)
            except Exception as err:
                return failed("upload", f"{type(err).__name__}: {err}")
            finally:
                metrics.stage_seconds(clip, {**stages, "upload": time.perf_counter() - upload_started})

    def _store(self, finished: FinishedClip) -> ManifestEntry:
        """Publish (or quarantine) the clip's files, waiting out an outage of the store: the files stay on
        local disk and are tried again with growing pauses for ``upload_retry_seconds``, so the GPU time
        that made them is not thrown away. A refused credential is not waited out."""
        deadline = time.monotonic() + self.upload_retry_seconds
        pause = 1.0
        while True:
            try:
                if finished.blocked:
                    return quarantine_clip(self.store, finished, self.run_id)
                return publish_clip(self.store, finished, self.run_id)
            except Exception as err:
                if refused_credential(err) or time.monotonic() + pause > deadline:
                    raise
                log.warning(
                    "upload failed, trying again clip_id=%s in_s=%.0f error=%s",
                    finished.clip.clip_id,
                    pause,
                    type(err).__name__,
                )
                time.sleep(pause)
                pause = min(2 * pause, 30.0)
