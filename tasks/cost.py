"""What clips cost: the GPU time each clip held, priced by GPU type, and a run's totals per model and recipe.

A clip's GPU-seconds are measured on its generator actor: the wall time it held the actor's GPU, from the
start of its generation to its frames being handed back (:class:`tasks.fleet.GeneratorActor`). Its cost is
those seconds at the price per GPU-hour of the actor's GPU type (``WANFACTORY_GPU_PRICE_PER_HOUR``). A dry
run's planned clips are priced the same way, with their estimated seconds (``wan_engine.cost``: one H100)
at the price of ``WANFACTORY_ESTIMATE_GPU_TYPE``. Pure: entries in, figures and text out.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from tasks.records import ClipStatus, ManifestEntry

log = logging.getLogger(__name__)

CPU = "cpu"  # the GPU type of a generator actor that runs on the CPU (the tests, the demo)

# Words of a device name that say who made it or its product line, not which GPU it is.
_MAKER_WORDS = frozenset({"nvidia", "tesla", "geforce", "quadro", "amd", "instinct", "radeon"})


def gpu_type_key(device_name: str) -> str:
    """A device's name as torch reports it (``torch.cuda.get_device_name``) as a key of the price table: the
    GPU's model code, without maker, memory or form factor. ``NVIDIA H100 80GB HBM3`` and ``NVIDIA H100
    PCIe`` are ``H100``, ``NVIDIA A100-SXM4-80GB`` is ``A100``, ``Tesla T4`` is ``T4``, ``NVIDIA GeForce
    RTX 4090`` is ``RTX4090`` (a line name without a number takes the next word), ``cpu`` stays ``cpu``."""
    words = [word for word in re.split(r"[\s_-]+", device_name.strip()) if word]
    if [word.casefold() for word in words] == [CPU]:
        return CPU
    words = [word for word in words if word.casefold() not in _MAKER_WORDS] or words
    if not words:
        return device_name.strip()
    key = words[0].upper()
    if key.isalpha() and len(words) > 1:
        key += words[1].upper()
    return key


def gpu_cost_usd(
    gpu_seconds: float | None, gpu_type: str | None, prices: Mapping[str, float]
) -> float | None:
    """USD for holding one GPU of ``gpu_type`` for ``gpu_seconds``, at ``prices`` (USD per GPU-hour by GPU
    type, keys matched without regard to case). None when the seconds or the type are unknown, or the table
    has no price for the type: that is logged once per type, and never stops a run."""
    if gpu_seconds is None or gpu_type is None:
        return None
    price = {key.casefold(): value for key, value in prices.items()}.get(gpu_type.casefold())
    if price is None:
        _warn_unpriced(gpu_type, tuple(sorted(prices)))
        return None
    return round(gpu_seconds / 3600 * price, 6)


@functools.cache
def _warn_unpriced(gpu_type: str, priced_types: tuple[str, ...]) -> None:
    log.warning(
        "no price for GPU type %r in WANFACTORY_GPU_PRICE_PER_HOUR (priced: %s): its clips' cost is unknown",
        gpu_type,
        ", ".join(priced_types) or "none",
    )


def priced(entry: ManifestEntry, prices: Mapping[str, float]) -> ManifestEntry:
    """``entry`` with the cost of the GPU time it held (None when it held none, or its type has no price)."""
    return replace(entry, cost_usd=gpu_cost_usd(entry.gpu_seconds, entry.gpu_type, prices))


@dataclass(frozen=True)
class CostLine:
    """GPU time and cost of a run's clips of one model and recipe, or of all of them.

    Measured: every clip that held a GPU counts, whatever became of it (a clip that failed after its
    generation cost its GPU time too), and ``cost_usd`` is None when any of them has no price. Estimated:
    the clips left planned (a dry run, or past a limit)."""

    model: str
    recipe: str
    published: int = 0
    gpu_seconds: float = 0.0
    cost_usd: float | None = 0.0
    planned: int = 0
    estimated_gpu_seconds: float = 0.0
    estimated_cost_usd: float | None = 0.0

    @property
    def gpu_hours(self) -> float:
        return self.gpu_seconds / 3600

    @property
    def estimated_gpu_hours(self) -> float:
        return self.estimated_gpu_seconds / 3600

    @property
    def cost_per_published_clip(self) -> float | None:
        return self.cost_usd / self.published if self.cost_usd is not None and self.published else None

    @property
    def clips_per_gpu_hour(self) -> float | None:
        return self.published / self.gpu_hours if self.gpu_seconds > 0 else None

    def __add__(self, other: CostLine) -> CostLine:
        return replace(
            self,
            published=self.published + other.published,
            gpu_seconds=self.gpu_seconds + other.gpu_seconds,
            cost_usd=_sum(self.cost_usd, other.cost_usd),
            planned=self.planned + other.planned,
            estimated_gpu_seconds=self.estimated_gpu_seconds + other.estimated_gpu_seconds,
            estimated_cost_usd=_sum(self.estimated_cost_usd, other.estimated_cost_usd),
        )


def _sum(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


@dataclass(frozen=True)
class RunCosts:
    """A run's cost per (model, recipe) and in total, and the GPU types it ran on."""

    lines: list[CostLine]
    total: CostLine
    gpu_types: list[str]  # of the actors that made its clips
    estimate_gpu_type: str  # what its planned clips are priced as


def run_costs(
    entries: Sequence[ManifestEntry], prices: Mapping[str, float], estimate_gpu_type: str
) -> RunCosts:
    """A run's GPU time and cost per (model, recipe), in the order the models first appear, and in total."""
    lines: dict[tuple[str, str], CostLine] = {}
    for entry in entries:
        held = entry.gpu_seconds is not None
        planned = entry.status == ClipStatus.PLANNED
        published = entry.status == ClipStatus.PUBLISHED
        if not (held or planned or published):
            continue
        estimated = (entry.estimated_gpu_seconds or 0.0) if planned else 0.0
        line = CostLine(
            model=entry.model or "",
            recipe=entry.recipe or "",
            published=int(published),
            gpu_seconds=entry.gpu_seconds or 0.0,
            cost_usd=entry.cost_usd if held else 0.0,
            planned=int(planned),
            estimated_gpu_seconds=estimated,
            estimated_cost_usd=gpu_cost_usd(estimated, estimate_gpu_type, prices) if planned else 0.0,
        )
        key = (line.model, line.recipe)
        lines[key] = lines[key] + line if key in lines else line
    total = sum(lines.values(), CostLine(model="all", recipe=""))
    gpu_types = sorted({e.gpu_type for e in entries if e.gpu_type is not None and e.gpu_seconds is not None})
    return RunCosts(list(lines.values()), total, gpu_types, estimate_gpu_type)


def usd(value: float | None) -> str:
    """Dollars as people read them: cents, or four decimals below a cent; "n/a" when unknown."""
    if value is None:
        return "n/a"
    return f"${value:,.2f}" if value == 0 or value >= 0.01 else f"${value:.4f}"


def figure(value: float | None) -> str:
    """Hours and rates: two decimals from 10 up, three significant digits below (never an exponent: a tiny
    model's clip is 0.0000333 GPU-hours); "-" when there is none."""
    if value is None:
        return "-"
    if value >= 10:
        return f"{value:,.2f}"
    if value <= 0:
        return "0"
    decimals = max(2, 2 - math.floor(math.log10(value)))
    return f"{value:.{decimals}f}".rstrip("0").rstrip(".")


def cost_sentence(costs: RunCosts) -> str:
    """The run's cost in one line: what its clips' GPU time cost, per published clip, in GPU-hours and clips
    per GPU-hour; and what its planned clips would cost, when it left any."""
    total, parts = costs.total, []
    if total.gpu_seconds or total.published or not total.planned:
        on = f" on {', '.join(costs.gpu_types)}" if costs.gpu_types else ""
        per_clip = f" ({usd(total.cost_per_published_clip)} a clip)" if total.published else ""
        parts.append(
            f"{usd(total.cost_usd)} for {total.published} published clips{per_clip}, "
            f"{figure(total.gpu_hours)} GPU-hours{on}, {figure(total.clips_per_gpu_hour)} clips per GPU-hour"
        )
    if total.planned:
        parts.append(
            f"{total.planned} planned clips estimated at ~{figure(total.estimated_gpu_hours)} GPU-hours, "
            f"~{usd(total.estimated_cost_usd)} on {costs.estimate_gpu_type}"
        )
    return "; ".join(parts)


def cost_markdown(costs: RunCosts) -> list[str]:
    """The cost table per model and recipe, with a totals row; and the estimate's, when clips are planned.

    Model and recipe names come from the run's own specs, never from catalog cells."""
    rows = [*costs.lines, costs.total]
    lines = [
        "| model | recipe | published | GPU-hours | cost | cost per published clip | clips per GPU-hour |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        model = "**all**" if row is costs.total else row.model
        lines.append(
            f"| {model} | {row.recipe} | {row.published} | {figure(row.gpu_hours)} | {usd(row.cost_usd)} "
            f"| {usd(row.cost_per_published_clip)} | {figure(row.clips_per_gpu_hour)} |"
        )
    if costs.total.planned:
        lines += [
            "",
            f"Planned clips, estimated (`wan_engine/cost.py`: one H100 a clip) and priced as "
            f"{costs.estimate_gpu_type}:",
            "",
            "| model | recipe | planned | estimated GPU-hours | estimated cost |",
            "|---|---|---:|---:|---:|",
        ]
        lines += [
            f"| {'**all**' if row is costs.total else row.model} | {row.recipe} | {row.planned} "
            f"| {figure(row.estimated_gpu_hours)} | {usd(row.estimated_cost_usd)} |"
            for row in rows
            if row.planned
        ]
    return lines


def cost_text(costs: RunCosts) -> list[str]:
    """The cost per model and recipe for a terminal, one line each: what was made, what is planned."""
    lines = []
    for row in costs.lines:
        parts = []
        if row.published or row.gpu_seconds:
            parts.append(
                f"{row.published} published, {figure(row.gpu_hours)} GPU-h, {usd(row.cost_usd)} "
                f"({usd(row.cost_per_published_clip)} a clip, {figure(row.clips_per_gpu_hour)} clips/GPU-h)"
            )
        if row.planned:
            estimate = f"~{figure(row.estimated_gpu_hours)} GPU-h, ~{usd(row.estimated_cost_usd)}"
            parts.append(f"{row.planned} planned {estimate}")
        lines.append(f"{row.model} {row.recipe}: {'; '.join(parts)}")
    return lines
