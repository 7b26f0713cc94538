"""The typed records that flow through a run.

catalog row -> :class:`ClipSpec` (planned) -> :class:`GeneratedClip` (frames from a
generator actor) -> :class:`FinishedClip` (encoded files) -> :class:`ManifestEntry`
(what happened, as stored in the run manifest). Every planned clip, and every
catalog row that could not be planned, ends as exactly one manifest entry.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.postprod.report import StageReport
from wan_engine import GenerationRequest

if TYPE_CHECKING:
    from PIL.Image import Image


class ClipStatus(StrEnum):
    PUBLISHED = "published"  # generated, encoded and stored in this run
    SKIPPED = "skipped"  # the same clip (same clip id) is already published
    QUARANTINED = "quarantined"  # generated but held back from publishing
    FAILED = "failed"  # invalid row, or an error in generation, encoding or upload


@dataclass(frozen=True)
class ClipSpec:
    """One planned clip: every input that determines its frames, resolved and checked."""

    clip_id: str
    row: int
    sku: str
    model: str  # the spec name, e.g. "t2v-a14b" or "t2v-a14b-tiny"
    family: str
    variant: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_frames: int
    fps: int
    steps: int
    guidance_scale: float
    guidance_scale_2: float | None
    seed: int
    image_uri: str | None
    image_sha256: str | None
    prompt_sha256: str
    profile: str  # the post-production profile's name
    # A/B samples: their experiment and variant (``sku`` is then "<experiment>/<variant>").
    experiment_id: str | None = None
    variant_id: str | None = None
    sample: int | None = None

    @property
    def key_stem(self) -> str:
        """Where this clip's files live, less the extension."""
        if self.experiment_id is not None:
            return f"experiments/{self.experiment_id}/{self.variant_id}/{self.clip_id}"
        return f"clips/{self.sku}/{self.clip_id}"

    @property
    def clip_key(self) -> str:
        return f"{self.key_stem}.mp4"

    @property
    def thumbnail_key(self) -> str:
        return f"{self.key_stem}.jpg"

    @property
    def preview_key(self) -> str:
        return f"{self.key_stem}.webp"

    def request(self, image: Image | None = None) -> GenerationRequest:
        return GenerationRequest(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            seed=self.seed,
            width=self.width,
            height=self.height,
            num_frames=self.num_frames,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            guidance_scale_2=self.guidance_scale_2,
            image=image,
        )


@dataclass(frozen=True)
class GeneratedClip:
    """A generator actor's answer for one clip: frames, or the error that stopped it."""

    spec: ClipSpec
    frames: np.ndarray | None  # uint8 (frames, height, width, 3)
    fps: int
    seconds: float
    expert_calls: dict[str, int]
    worker: str  # which actor (node and GPU) made it
    error: str | None = None
    engine_mode: str = "exact"  # or the approximations used, e.g. "approximate:step-cache-3"
    started_at: datetime | None = None  # when the clip took its actor's GPU (UTC)


@dataclass(frozen=True)
class FinishedClip:
    """A clip through post-production, in local files ready to upload (or to quarantine).

    ``blocked`` holds the content filter's reasons: a blocked clip is encoded as generated, for
    review, and never published. ``stages`` are the post-production stage reports, in order.
    """

    spec: ClipSpec
    generated: GeneratedClip = field(repr=False)
    video_path: Path
    thumbnail_path: Path
    preview_path: Path | None
    frame_count: int
    fps: int
    width: int
    height: int
    stages: tuple[StageReport, ...]
    watermark_payload: str | None  # 12 hex digits, when the invisible watermark was embedded
    blocked: tuple[str, ...] = ()
    filter_scores: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ManifestEntry:
    """The outcome of one planned clip or one rejected catalog row."""

    run_id: str
    row: int
    sku: str | None
    status: ClipStatus
    reason: str = ""  # why it failed or was skipped; empty when published
    stage: str = ""  # where it ended: validate, plan, generate, encode, upload, publish
    clip_id: str | None = None
    model: str | None = None
    seed: int | None = None
    prompt: str | None = None
    prompt_sha256: str | None = None
    image_uri: str | None = None
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None
    fps: int | None = None
    clip_key: str | None = None
    thumbnail_key: str | None = None
    video_bytes: int | None = None
    generate_started_at: datetime | None = None  # when the clip took its GPU: with the seconds, a timeline
    generate_seconds: float | None = None
    expert_calls: dict[str, int] = field(default_factory=dict)
    worker: str | None = None
    engine_mode: str | None = None
    profile: str | None = None
    experiment_id: str | None = None
    variant_id: str | None = None
    sample: int | None = None
    delivered_width: int | None = None
    delivered_height: int | None = None
    delivered_fps: int | None = None
    delivered_frames: int | None = None
    preview_key: str | None = None
    quarantine_key: str | None = None  # where a blocked clip was put for review
    watermark_payload: str | None = None
    filter_scores: dict[str, float] = field(default_factory=dict)  # the content filter's max per label
    postprocess: list[dict[str, Any]] = field(default_factory=list)  # stage reports: params, outcome, CPU s
    attempts: int = 1  # generation attempts: more than one when an attempt was lost with its actor
    retried_after: list[str] = field(default_factory=list)  # the errors that lost the earlier attempts

    @classmethod
    def for_spec(cls, spec: ClipSpec, run_id: str, status: ClipStatus, **details: Any) -> ManifestEntry:
        return cls(
            run_id=run_id,
            row=spec.row,
            sku=spec.sku,
            status=status,
            clip_id=spec.clip_id,
            model=spec.model,
            seed=spec.seed,
            prompt=spec.prompt,
            prompt_sha256=spec.prompt_sha256,
            image_uri=spec.image_uri,
            width=spec.width,
            height=spec.height,
            num_frames=spec.num_frames,
            fps=spec.fps,
            profile=spec.profile,
            experiment_id=spec.experiment_id,
            variant_id=spec.variant_id,
            sample=spec.sample,
            **details,
        )

    def to_record(self) -> dict[str, Any]:
        """A flat record for Parquet and JSON (nested fields as JSON strings)."""
        record = asdict(self)
        record["status"] = str(self.status)
        for name in ("expert_calls", "filter_scores", "postprocess", "retried_after"):
            record[name] = json.dumps(record[name], sort_keys=True, default=str)
        return record


def failed_entry(spec: ClipSpec, run_id: str, stage: str, reason: str, **details: Any) -> ManifestEntry:
    """The manifest entry of a planned clip that stopped at ``stage``."""
    return ManifestEntry.for_spec(spec, run_id, ClipStatus.FAILED, stage=stage, reason=reason, **details)
