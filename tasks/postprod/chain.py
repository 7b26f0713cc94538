"""The post-production chain of one generated clip, stage by stage, into deliverable files.

content filter (on the model's frames: a blocked clip stops here, encoded as generated for
review) -> delivery size -> stabilization -> frame-rate conform and deflicker -> visible
watermark -> invisible watermark -> H.264 encode -> C2PA signature (after the last encode) ->
thumbnail and animated preview of the final frames.

Pure work on frames and local files: no object store, no Ray. The caller supplies the
loaded logo and the classifier, which live as long as their worker process.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.encode import encode_mp4, encode_thumbnail
from tasks.postprod.content_filter import FrameClassifier, FrameDecision
from tasks.postprod.ffmpeg_io import filter_frames, raw_input, raw_output
from tasks.postprod.invisible import format_payload, payload_for
from tasks.postprod.motion import conform, stabilize
from tasks.postprod.overlay import WatermarkStamps, apply_visible_watermark
from tasks.postprod.periodic_mark import embed_periodic_mark
from tasks.postprod.preview import write_preview
from tasks.postprod.profile import DeliveryParams, PostprocessProfile
from tasks.postprod.provenance import ProvenanceFacts, ProvenanceParams, sign_clip
from tasks.postprod.report import StageReport, cpu_timer
from tasks.records import FinishedClip, GeneratedClip

# Deliverables are encoded once, at a quality that survives a platform's re-encode.
DELIVERY_CRF = 18


@dataclass(frozen=True)
class ChainTools:
    """What a finishing worker loads once per profile and reuses for every clip."""

    classifier: FrameClassifier
    provenance: ProvenanceParams
    stamps: WatermarkStamps  # the profile's visible mark, with its logo, by frame size
    threads: int = 1


def deliver_size(
    frames: np.ndarray, params: DeliveryParams, threads: int = 1
) -> tuple[np.ndarray, StageReport]:
    """Upscale frames whose shorter side is below ``params.min_short_side`` (lanczos)."""
    _, height, width, _ = frames.shape
    target = params.delivered_size(width, height)
    report = StageReport("delivery", applied=False, params={"min_short_side": params.min_short_side})
    report.outcome = {"size_in": f"{width}x{height}", "size_out": f"{target[0]}x{target[1]}"}
    if target == (width, height):
        return frames, report
    with cpu_timer(report):
        # Scaling is per frame: the rate given to the raw input changes nothing here.
        stream = raw_input(width, height, 24).filter("scale", target[0], target[1], flags="lanczos")
        scaled = filter_frames(raw_output(stream), frames, threads, size=target)
    report.applied = True
    return scaled, report


class StageError(RuntimeError):
    """A post-production stage failed; ``stage`` names it for the manifest."""

    def __init__(self, stage: str, error: Exception) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.stage = stage


@contextmanager
def _stage(name: str) -> Iterator[None]:
    try:
        yield
    except Exception as err:
        raise StageError(name, err) from err


def finish_frames(
    generated: GeneratedClip, profile: PostprocessProfile, tools: ChainTools, run_id: str, out_dir: Path
) -> FinishedClip:
    """Run ``generated`` through ``profile`` into files under ``out_dir``.

    Raises :class:`StageError` naming the stage that failed; a clip the content filter blocks
    comes back with ``blocked`` set, encoded from the model's frames for review.
    """
    clip, frames, fps = generated.clip, generated.frames, generated.fps
    if frames is None:
        raise StageError("generate", ValueError(f"clip {clip.clip_id} has no frames"))
    out_dir.mkdir(parents=True, exist_ok=True)
    video, thumbnail = out_dir / f"{clip.clip_id}.mp4", out_dir / f"{clip.clip_id}.jpg"
    with _stage("content_filter"):
        decision, report = tools.classifier.classify(frames, profile.content_filter)
    stages = [report]
    if not decision.allowed:
        with _stage("encode"):
            encode_mp4(frames, fps, video, crf=DELIVERY_CRF, threads=tools.threads)
            encode_thumbnail(frames, thumbnail)
        return _finished(generated, frames, fps, video, thumbnail, None, stages, None, decision)

    with _stage("delivery"):
        frames, report = deliver_size(frames, profile.delivery, tools.threads)
    stages.append(report)
    with _stage("stabilize"):
        frames, report = stabilize(frames, fps, profile.stabilize)
    stages.append(report)
    conform_params = profile.conform_for(fps)
    with _stage("conform"):
        frames, report = conform(frames, fps, conform_params)
    stages.append(report)
    fps = conform_params.target_fps
    with _stage("visible_watermark"):
        frames, report = apply_visible_watermark(frames, tools.stamps.params, tools.stamps)
    stages.append(report)
    payload = payload_for(clip.clip_id, run_id)
    with _stage("invisible_watermark"):
        frames, report = embed_periodic_mark(frames, payload, profile.invisible_watermark)
    stages.append(report)
    payload_hex = format_payload(payload) if report.applied else None

    report = StageReport(
        "encode", applied=True, params={"codec": "libx264", "crf": DELIVERY_CRF, "pix_fmt": "yuv420p"}
    )
    with _stage("encode"), cpu_timer(report):
        encode_mp4(frames, fps, video, crf=DELIVERY_CRF, threads=tools.threads)
        encode_thumbnail(frames, thumbnail)
    report.outcome = {"bytes": video.stat().st_size}
    stages.append(report)
    if profile.provenance.enabled:
        facts = ProvenanceFacts(
            clip_id=clip.clip_id,
            run_id=run_id,
            model_name=f"Wan2.2-{clip.model.family}",
            model_version=clip.model.variant,
            extra={"sku": clip.label, "profile": profile.name, "engine_mode": generated.engine_mode},
        )
        with _stage("provenance"):
            stages.append(sign_clip(video, video, facts, tools.provenance))
    preview = out_dir / f"{clip.clip_id}.webp"
    with _stage("preview"):
        stages.append(write_preview(frames, fps, preview, profile.preview))
    return _finished(generated, frames, fps, video, thumbnail, preview, stages, payload_hex, decision)


def _finished(
    generated: GeneratedClip,
    frames: np.ndarray,
    fps: int,
    video: Path,
    thumbnail: Path,
    preview: Path | None,
    stages: list[StageReport],
    payload_hex: str | None,
    decision: FrameDecision,
) -> FinishedClip:
    count, height, width, _ = frames.shape
    return FinishedClip(
        generated=generated,
        video_path=video,
        thumbnail_path=thumbnail,
        preview_path=preview,
        frame_count=count,
        fps=fps,
        width=width,
        height=height,
        stages=tuple(stages),
        watermark_payload=payload_hex,
        blocked=decision.reasons if not decision.allowed else (),
        filter_scores=decision.max_scores,
    )
