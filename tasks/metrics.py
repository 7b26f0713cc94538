"""The fleet's Prometheus metrics, exported by Ray's own per-node metrics agent (no server of ours).

Every metric is defined here, named ``wanfactory_*`` (Ray's exporter adds ``ray_``: Prometheus sees
``ray_wanfactory_clips_total``), with low-cardinality labels only: model, recipe, resolution, status, stage,
reason class, GPU type. Never a clip id, SKU or run id.

``ray.util.metrics`` objects need a connected Ray worker, so they are made on first use in each process
(the driver's dispatcher, generator actors, finishers). A process without Ray (a dry run, which starts no
fleet) records nothing.

Where each one is recorded:

- the driver (``tasks.units``, ``flows.common``): every manifest entry once, as it becomes final:
  :data:`CLIPS` by status, stage and reason class; :data:`GPU_SECONDS` and :data:`GPU_COST_USD` (the
  manifest's own figures, so the counters add up to the manifest's totals);
- the dispatcher (``tasks.fleet.GenerationFleet``): ``queue_wait``, :data:`CLIPS_GENERATING`,
  :data:`CLIPS_FINISHING`, :data:`ACTOR_RESTARTS`, :data:`OUT_OF_MEMORY` for actors killed for memory;
- generator actors: ``prepare``, ``adapter_swap``, ``denoise``, ``decode``, ``handback``,
  :data:`ADAPTER_SWAPS`, :data:`OUT_OF_MEMORY` for a clip's CUDA out-of-memory error;
- finishers (``tasks.publish.Finisher``): ``post_<stage>`` per post-production stage that ran, ``upload``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import ray

from tasks.records import ClipSpec, ManifestEntry

# The metric's name as Prometheus sees it: Ray's exporter puts "ray_" before ours.
RAY_EXPORT_PREFIX = "ray_"
# Seconds, from a tiny model's stages on a CPU to a real clip's denoising loop (minutes).
SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)

CLIP_LABELS = ("model", "recipe", "resolution")


@dataclass(frozen=True)
class MetricDef:
    """One metric: its kind (``ray.util.metrics`` class name), name, help text and label names."""

    kind: str
    name: str
    description: str
    labels: tuple[str, ...]

    @property
    def exported_name(self) -> str:
        """The name Prometheus scrapes (a histogram's series add _bucket, _count and _sum to it)."""
        return RAY_EXPORT_PREFIX + self.name


CLIPS = MetricDef(
    "Counter",
    "wanfactory_clips_total",
    "Clips (and rejected rows) by their final status in the manifest, where they ended and whose the "
    "outcome is (reason_class: none, input, content, infrastructure)",
    (*CLIP_LABELS, "status", "stage", "reason_class"),
)
STAGE_SECONDS = MetricDef(
    "Histogram",
    "wanfactory_stage_seconds",
    "Seconds a clip spent in one stage: queue_wait, prepare (image, adapters, prompt encoding), "
    "adapter_swap, denoise, decode, handback (frames to the host), post_<stage>, upload",
    (*CLIP_LABELS, "stage"),
)
GPU_SECONDS = MetricDef(
    "Counter",
    "wanfactory_gpu_seconds_total",
    "Seconds clips held their generator's GPU (the manifest's gpu_seconds), failed clips included",
    (*CLIP_LABELS, "gpu_type"),
)
GPU_COST_USD = MetricDef(
    "Counter",
    "wanfactory_gpu_cost_usd_total",
    "What that GPU time cost at WANFACTORY_GPU_PRICE_PER_HOUR (the manifest's cost_usd; clips of a GPU type "
    "without a price add nothing)",
    (*CLIP_LABELS, "gpu_type"),
)
CLIPS_GENERATING = MetricDef(
    "Gauge", "wanfactory_clips_generating", "Clips sent to generator actors and not answered yet", ()
)
CLIPS_FINISHING = MetricDef(
    "Gauge",
    "wanfactory_clips_finishing",
    "Generated clips waiting for or in post-production and upload",
    (),
)
ACTOR_RESTARTS = MetricDef(
    "Counter",
    "wanfactory_actor_restarts_total",
    "Generator actors lost (their process or node died) and restarted by Ray",
    ("model",),
)
CLIP_TIMEOUTS = MetricDef(
    "Counter",
    "wanfactory_clip_timeouts_total",
    "Clip attempts given up for taking too long on their generator actor",
    ("model",),
)
ADAPTER_SWAPS = MetricDef(
    "Counter",
    "wanfactory_adapter_swaps_total",
    "Per-clip adapter swaps on generator actors",
    ("model",),
)
OUT_OF_MEMORY = MetricDef(
    "Counter",
    "wanfactory_out_of_memory_total",
    "Out-of-memory errors: a clip's CUDA allocation (where=gpu) or an actor killed for host memory "
    "(where=host)",
    ("model", "where"),
)

METRICS = (
    CLIPS,
    STAGE_SECONDS,
    GPU_SECONDS,
    GPU_COST_USD,
    CLIPS_GENERATING,
    CLIPS_FINISHING,
    ACTOR_RESTARTS,
    CLIP_TIMEOUTS,
    ADAPTER_SWAPS,
    OUT_OF_MEMORY,
)


@functools.cache
def _metric(metric: MetricDef) -> Any:
    """The process's ``ray.util.metrics`` object for ``metric``, made on first use."""
    from ray.util import metrics

    kind = getattr(metrics, metric.kind)
    if metric.kind == "Histogram":
        return kind(metric.name, metric.description, list(SECONDS_BUCKETS), tag_keys=metric.labels)
    return kind(metric.name, metric.description, tag_keys=metric.labels)


def _record(metric: MetricDef, action: Callable[[Any], None]) -> None:
    if ray.is_initialized():
        action(_metric(metric))


def clip_labels(clip: ClipSpec) -> dict[str, str]:
    request = clip.request
    return {
        "model": clip.model.name,
        "recipe": request.recipe or "",
        "resolution": f"{request.width}x{request.height}",
    }


def _entry_labels(entry: ManifestEntry) -> dict[str, str]:
    resolution = f"{entry.width}x{entry.height}" if entry.width and entry.height else ""
    return {"model": entry.model or "", "recipe": entry.recipe or "", "resolution": resolution}


def clip_ended(entry: ManifestEntry) -> None:
    """A manifest entry became final: count it, with its GPU time and cost."""
    labels = _entry_labels(entry)
    tags = {**labels, "status": str(entry.status), "stage": entry.stage, "reason_class": entry.reason_class}
    _record(CLIPS, lambda counter: counter.inc(1, tags=tags))
    gpu = {**labels, "gpu_type": entry.gpu_type or ""}
    if entry.gpu_seconds:
        _record(GPU_SECONDS, lambda counter: counter.inc(entry.gpu_seconds, tags=gpu))
    if entry.cost_usd:
        _record(GPU_COST_USD, lambda counter: counter.inc(entry.cost_usd, tags=gpu))


def stage_seconds(clip: ClipSpec, seconds: Mapping[str, float]) -> None:
    """Observe the seconds ``clip`` spent in each of the stages named by ``seconds``' keys."""
    labels = clip_labels(clip)

    def observe(histogram: Any) -> None:
        for stage, value in seconds.items():
            histogram.observe(value, tags={**labels, "stage": stage})

    _record(STAGE_SECONDS, observe)


def clips_in_flight(generating: int, finishing: int) -> None:
    """The dispatcher's clips on generator actors, and those waiting for or in finishing."""
    _record(CLIPS_GENERATING, lambda gauge: gauge.set(generating))
    _record(CLIPS_FINISHING, lambda gauge: gauge.set(finishing))


def count(metric: MetricDef, **labels: str) -> None:
    """One more of ``metric`` (a counter of events: restarts, timeouts, swaps, out-of-memory errors)."""
    _record(metric, lambda counter: counter.inc(1, tags=labels))
