"""The typed records that flow through a run, each fact stated once.

catalog row or sheet sample -> :class:`ClipSpec` (planned: the model, the resolved generation
request, where the clip came from) -> :class:`GeneratedClip` (frames from a generator actor, or
the error that stopped it) -> :class:`FinishedClip` (post-produced files) ->
:class:`ManifestEntry` (what happened, one row of the run manifest). Every planned clip, and
every row that could not be planned, ends as exactly one manifest entry.

The manifest's Arrow schema is derived from :class:`ManifestEntry` (:func:`manifest_schema`), so
a field added to the entry is a column of every manifest, and a field of a type the manifest
cannot store fails loudly instead of vanishing.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import types
import typing
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from catalogs.problems import RowRef
from tasks.postprod.report import StageReport
from wan_engine.adapters import AdapterWeights
from wan_engine.cost import estimated_gpu_seconds
from wan_engine.requests import GenerationRequest
from wan_engine.specs import ModelSpec

# Where a row stops for its own input (its cells, or what the model or profile allows): every other
# stage a clip fails at is the infrastructure's (a model that would not load, a GPU, ffmpeg, storage).
INPUT_STAGES = frozenset({"validate", "plan"})


class ClipStatus(StrEnum):
    PUBLISHED = "published"  # generated, encoded and stored in this run
    SKIPPED = "skipped"  # the same clip (same clip id) is already published
    QUARANTINED = "quarantined"  # generated but held back from publishing
    FAILED = "failed"  # invalid row, or an error in generation, encoding or upload
    PLANNED = "planned"  # would be made, but not in this run: a dry run, or past the run's limit


class ReasonClass(StrEnum):
    """Whose an entry's outcome is (:attr:`ManifestEntry.reason_class`): what alerts and metrics group by."""

    NONE = "none"  # published, skipped or planned
    INPUT = "input"  # the row's own cells, or what its model or profile allows
    CONTENT = "content"  # quarantined by the prompt policy or the frame classifier
    INFRASTRUCTURE = "infrastructure"  # a model that would not load, a GPU, ffmpeg, storage


@dataclass(frozen=True, kw_only=True)
class ClipSpec:
    """One planned clip: every input that determines its frames, resolved against its model and checked.

    ``origin`` is the row it comes from: a catalog's product (its SKU) or a prompt sheet's variant
    (experiment and variant), of which this is sample ``sample``.
    """

    clip_id: str
    origin: RowRef
    sample: int | None = None  # A/B samples: 0-based among the variant's samples
    model: ModelSpec
    request: GenerationRequest  # resolved against the model; the image is loaded by the generator actor
    image_uri: str | None = None
    image_sha256: str | None = None
    profile: str  # the post-production profile's name
    # The adapters the clip's recipe needs fused into its generator's weights (a distillation LoRA):
    # clips are served by actors loaded with exactly these (:attr:`loadout`).
    fused_adapters: tuple[AdapterWeights, ...] = ()

    @property
    def loadout(self) -> Loadout:
        return Loadout(family=self.model.family, fused_adapters=self.fused_adapters)

    @property
    def row(self) -> int:
        return self.origin.row or 0

    @property
    def sku(self) -> str | None:
        return self.origin.sku

    @property
    def experiment_id(self) -> str | None:
        return self.origin.experiment_id

    @property
    def variant_id(self) -> str | None:
        return self.origin.variant_id

    @property
    def label(self) -> str:
        """What the clip is of, for people: the SKU, or ``experiment/variant``."""
        return self.sku if self.sku is not None else f"{self.experiment_id}/{self.variant_id}"

    @property
    def prompt_sha256(self) -> str:
        return hashlib.sha256(self.request.prompt.encode()).hexdigest()

    @property
    def frames_bytes(self) -> int:
        """The size of the clip's generated frames (uint8 RGB), as they wait in Ray's object store."""
        request = self.request
        return (request.num_frames or 0) * (request.height or 0) * (request.width or 0) * 3

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


@dataclass(frozen=True, kw_only=True)
class Loadout:
    """What a generator actor loads: a model family and the adapters fused into its weights. Clips of one
    loadout can share an actor; per-clip adapters are swapped in between clips and are not part of it."""

    family: str
    fused_adapters: tuple[AdapterWeights, ...] = ()

    @property
    def name(self) -> str:
        """``t2v-a14b``, or ``t2v-a14b+<adapter>`` with fused adapters: for logs and fleet shapes."""
        return "+".join([self.family, *(adapter.name for adapter in self.fused_adapters)])


@dataclass(frozen=True, kw_only=True)
class GeneratedClip:
    """A generator actor's answer for one clip: frames, or the error that stopped it."""

    clip: ClipSpec
    frames: np.ndarray | None  # uint8 (frames, height, width, 3); None when ``error`` is set
    worker: str  # which actor (node and GPU) made it
    engine_mode: str  # "exact", or the approximations used, e.g. "approximate:step-cache-3"
    seconds: float = 0.0
    expert_calls: dict[str, int] = field(default_factory=dict)
    started_at: datetime | None = None  # when the clip took its actor's GPU (UTC)
    prompt_tokens: int | None = None  # the prompt's text-encoder tokens, and how many the encoder read
    prompt_tokens_kept: int | None = None
    adapter_swap_seconds: float | None = None  # swapping the clip's adapters in, when it had to
    # What the clip held its actor's GPU for (its wall time, from the start of its generation to its frames
    # being handed back; None when it never got the GPU), and that GPU's type (tasks.cost.gpu_type_key).
    gpu_seconds: float | None = None
    gpu_type: str | None = None
    error: str | None = None

    @property
    def fps(self) -> int:
        return self.clip.model.fps


@dataclass(frozen=True, kw_only=True)
class FinishedClip:
    """A clip through post-production, in local files ready to upload (or to quarantine).

    ``blocked`` holds the content filter's reasons: a blocked clip is encoded as generated, for
    review, and never published. ``stages`` are the post-production stage reports, in order.
    """

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

    @property
    def clip(self) -> ClipSpec:
        return self.generated.clip


# Manifest columns narrower than their Python type's default (int -> int64).
_INT32: dict[str, Any] = {"arrow": pa.int32()}


@dataclass(frozen=True, kw_only=True)
class ManifestEntry:
    """The outcome of one planned clip or one rejected row: one row of the run manifest.

    Its fields are the manifest's columns (:func:`manifest_schema`); dicts and lists are stored as
    JSON text.
    """

    run_id: str
    row: int  # in the source's own numbering (catalogs.problems)
    sku: str | None = None  # catalog clips
    status: ClipStatus
    reason: str = ""  # why it failed or was skipped; empty when published
    stage: str = ""  # where it ended: validate, plan, generate, encode, upload, publish
    clip_id: str | None = None
    model: str | None = None  # the model's name, e.g. "t2v-a14b" or "t2v-a14b-tiny"
    seed: int | None = None
    prompt: str | None = None
    prompt_sha256: str | None = None
    image_uri: str | None = None
    width: int | None = field(default=None, metadata=_INT32)
    height: int | None = field(default=None, metadata=_INT32)
    num_frames: int | None = field(default=None, metadata=_INT32)
    fps: int | None = field(default=None, metadata=_INT32)
    clip_key: str | None = None
    thumbnail_key: str | None = None
    video_bytes: int | None = None
    generate_started_at: datetime | None = None  # when the clip took its GPU: with the seconds, a timeline
    generate_seconds: float | None = None
    expert_calls: dict[str, int] = field(default_factory=dict)  # transformer forward passes per expert
    worker: str | None = None
    # The prompt's tokens and those the text encoder read: fewer kept means the prompt was cut there.
    prompt_tokens: int | None = None
    prompt_tokens_kept: int | None = None
    engine_mode: str | None = None  # "exact", or the opt-in approximations that made the clip
    recipe: str | None = None  # the sampling recipe (wan_engine.recipes)
    # Adapters: the recipe's fused ones and the clip's own, each {name, scale, digest, fused}.
    adapters: list[dict[str, Any]] = field(default_factory=list)
    adapter_swap_seconds: float | None = None  # the generator swapped adapters in for this clip
    # What the clip holds (or would hold) one H100 for, from the benchmarks (wan_engine.cost).
    estimated_gpu_seconds: float | None = None
    # What it did hold its generator's GPU for (measured on the actor: from the start of its generation to
    # its frames being handed back), the GPU's type ("H100", "cpu": tasks.cost.gpu_type_key), and that
    # time's cost at the run's price for the type (WANFACTORY_GPU_PRICE_PER_HOUR; None: no price for it).
    gpu_seconds: float | None = None
    gpu_type: str | None = None
    cost_usd: float | None = None
    profile: str | None = None  # the post-production profile
    experiment_id: str | None = None  # A/B runs: experiment, variant and sample of the clip
    variant_id: str | None = None
    sample: int | None = field(default=None, metadata=_INT32)
    delivered_width: int | None = field(default=None, metadata=_INT32)
    delivered_height: int | None = field(default=None, metadata=_INT32)
    delivered_fps: int | None = field(default=None, metadata=_INT32)
    delivered_frames: int | None = field(default=None, metadata=_INT32)
    preview_key: str | None = None
    quarantine_key: str | None = None  # a blocked clip, under the prefix normal readers cannot list
    watermark_payload: str | None = None  # hex; `wanfactory verify FILE` reads it back
    filter_scores: dict[str, float] = field(default_factory=dict)  # the frame classifier's max per label
    postprocess: list[dict[str, Any]] = field(default_factory=list)  # stage reports: params, outcome, CPU s
    # Generation attempts: more than one when an attempt was lost with its actor.
    attempts: int = field(default=1, metadata=_INT32)
    retried_after: list[str] = field(default_factory=list)  # the errors that lost the earlier attempts

    @property
    def label(self) -> str:
        """What the entry is of, for people: the SKU, ``experiment/variant``, or '' for a row with neither."""
        if self.sku is not None:
            return self.sku
        if self.experiment_id is not None:
            return f"{self.experiment_id}/{self.variant_id}"
        return ""

    @property
    def reason_class(self) -> ReasonClass:
        """Whose the outcome is: none for a clip that was made, skipped or held back; the input's for a row
        stopped at :data:`INPUT_STAGES`; the content's for a quarantined clip; else the infrastructure's."""
        if self.status == ClipStatus.QUARANTINED:
            return ReasonClass.CONTENT
        if self.status != ClipStatus.FAILED:
            return ReasonClass.NONE
        return ReasonClass.INPUT if self.stage in INPUT_STAGES else ReasonClass.INFRASTRUCTURE

    @classmethod
    def of_clip(cls, clip: ClipSpec, run_id: str, status: ClipStatus, **details: Any) -> ManifestEntry:
        """The entry of a planned clip: what the plan fixed, plus ``details`` of what became of it."""
        request = clip.request
        return cls.of_row(
            clip.origin,
            run_id,
            status,
            sample=clip.sample,
            clip_id=clip.clip_id,
            model=clip.model.name,
            seed=request.seed,
            prompt=request.prompt,
            prompt_sha256=clip.prompt_sha256,
            image_uri=clip.image_uri,
            width=request.width,
            height=request.height,
            num_frames=request.num_frames,
            fps=clip.model.fps,
            profile=clip.profile,
            estimated_gpu_seconds=round(estimated_gpu_seconds(clip.model, request), 2),
            recipe=request.recipe,
            adapters=[
                {"name": a.name, "scale": a.scale, "digest": a.digest, "fused": fused}
                for fused, group in ((True, clip.fused_adapters), (False, request.adapters))
                for a in group
            ],
            **details,
        )

    @classmethod
    def of_row(cls, origin: RowRef, run_id: str, status: ClipStatus, **details: Any) -> ManifestEntry:
        """The entry of anything from row ``origin``: a planned clip, or a row that could not be one."""
        return cls(
            run_id=run_id,
            row=origin.row or 0,
            sku=origin.sku,
            experiment_id=origin.experiment_id,
            variant_id=origin.variant_id,
            status=status,
            **details,
        )

    @classmethod
    def of_generated(
        cls, generated: GeneratedClip, run_id: str, status: ClipStatus, **details: Any
    ) -> ManifestEntry:
        """The entry of a clip that reached a generator: with what its generation recorded."""
        return cls.of_clip(
            generated.clip,
            run_id,
            status,
            generate_started_at=generated.started_at,
            generate_seconds=round(generated.seconds, 3),
            expert_calls=generated.expert_calls,
            worker=generated.worker,
            engine_mode=generated.engine_mode,
            prompt_tokens=generated.prompt_tokens,
            prompt_tokens_kept=generated.prompt_tokens_kept,
            adapter_swap_seconds=generated.adapter_swap_seconds,
            gpu_seconds=None if generated.gpu_seconds is None else round(generated.gpu_seconds, 3),
            gpu_type=generated.gpu_type,
            **details,
        )

    def to_record(self) -> dict[str, Any]:
        """A flat record for Parquet and JSON: the schema's columns, dicts and lists as JSON text."""
        record = asdict(self)
        for name, arrow_field in zip(record, manifest_schema(type(self)), strict=True):
            if arrow_field.metadata and arrow_field.metadata.get(b"json") == b"true":
                record[name] = json.dumps(record[name], sort_keys=True, default=str)
            elif isinstance(record[name], StrEnum):
                record[name] = str(record[name])
        return record


def failed_entry(clip: ClipSpec, run_id: str, stage: str, reason: str, **details: Any) -> ManifestEntry:
    """The manifest entry of a planned clip that stopped at ``stage`` before reaching a generator."""
    return ManifestEntry.of_clip(clip, run_id, ClipStatus.FAILED, stage=stage, reason=reason, **details)


_ARROW_TYPES: dict[type, pa.DataType] = {
    str: pa.string(),
    int: pa.int64(),
    float: pa.float64(),
    bool: pa.bool_(),
    datetime: pa.timestamp("us", tz="UTC"),
}


@functools.cache
def manifest_schema(entry_class: type[ManifestEntry] = ManifestEntry) -> pa.Schema:
    """The manifest's Arrow schema: one column per field of ``entry_class``, in field order.

    Plain values map to their Arrow types (``metadata={"arrow": ...}`` on a field narrows one), string
    enums to strings, and dicts and lists to JSON text. A field of any other type raises TypeError
    naming it: the manifest never silently drops a field.
    """
    hints = typing.get_type_hints(entry_class)
    columns = []
    for entry_field in dataclasses.fields(entry_class):
        annotation = _without_none(hints[entry_field.name])
        origin = typing.get_origin(annotation) or annotation
        if "arrow" in entry_field.metadata:
            columns.append(pa.field(entry_field.name, entry_field.metadata["arrow"]))
        elif origin in (dict, list):
            columns.append(pa.field(entry_field.name, pa.string(), metadata={"json": "true"}))
        elif isinstance(origin, type) and issubclass(origin, StrEnum):
            columns.append(pa.field(entry_field.name, pa.string()))
        elif origin in _ARROW_TYPES:
            columns.append(pa.field(entry_field.name, _ARROW_TYPES[origin]))
        else:
            raise TypeError(
                f"{entry_class.__name__}.{entry_field.name}: the manifest cannot store {annotation!r}; "
                "use a plain value, a string enum, a dict or a list, "
                "or give the field metadata={'arrow': <pyarrow type>}"
            )
    return pa.schema(columns)


def _without_none(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        others = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(others) == 1:
            return others[0]
    return annotation
