"""The watchdog for hung clips: a clip that holds its generator's GPU past its deadline is stopped.

A hung generator actor answers nothing (a deadlocked kernel or collective, a wedged driver, a frozen
process), so the dispatcher cannot ask it how long its clip has held the GPU. Instead each actor tells a
small registry actor, :class:`GpuHolds`, when a clip takes its GPU lock and when it lets go, and the
dispatcher asks the registry, never the actor. The registry times the holds on its own clock, so no two
hosts' clocks are compared. The deadline counts from taking the GPU, not from being sent: a clip queued
behind another on its actor is not hung. What is done with a clip past its deadline is the dispatcher's
(:class:`tasks.fleet.GenerationFleet`): its actor is killed and restarted with its model, and the clip
retried once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

from tasks.records import ClipSpec
from wan_engine.cost import estimated_gpu_seconds

# How the reason of an attempt the watchdog stopped begins: the dispatcher counts them by it.
TIMED_OUT = "timed out after"


def timed_out(reason: str) -> bool:
    """Whether a lost attempt's ``reason`` says the watchdog stopped it."""
    return reason.startswith(TIMED_OUT)


@dataclass(frozen=True)
class ClipDeadline:
    """How long a clip may hold its GPU: ``factor`` times its estimated GPU-seconds, at least ``floor``."""

    clip: str  # what the clip is, for people: "t2v-a14b 832x480 81f 40 steps"
    estimate: float  # seconds on one H100 at full model size (wan_engine.cost)
    factor: float
    floor: float

    @property
    def seconds(self) -> float:
        return max(self.floor, self.factor * self.estimate)

    def reason(self, held_seconds: float) -> str:
        """Why a clip that held its GPU for ``held_seconds`` was stopped: the manifest's reason."""
        return (
            f"{TIMED_OUT} {held_seconds:.0f} s (deadline for {self.clip}: {self.seconds:.0f} s, "
            f"the longer of {self.factor:g} x its estimated {self.estimate:.1f} GPU-seconds on one H100 "
            f"and the {self.floor:g} s floor)"
        )


def clip_deadline(clip: ClipSpec, factor: float, floor_seconds: float) -> ClipDeadline:
    """The deadline of ``clip`` on its GPU: its size, frames and steps priced by the benchmarks' per-model
    figures (:func:`wan_engine.cost.estimated_gpu_seconds`), times ``factor``, and never under the floor."""
    request = clip.request
    size = f"{request.width}x{request.height}"
    return ClipDeadline(
        clip=f"{clip.model.name} {size} {request.num_frames}f {request.steps} steps",
        estimate=estimated_gpu_seconds(clip.model, request),
        factor=factor,
        floor=floor_seconds,
    )


class GpuHold(NamedTuple):
    """A generation call holding its actor's GPU."""

    clip_id: str
    label: str  # what the clip is of: its SKU, or experiment/variant
    worker: str  # the generator actor's worker name (node/gpu/pid)
    seconds: float  # held so far


class GpuHolds:
    """Which generation calls hold a generator's GPU, and since when: a Ray actor of the fleet.

    Keyed by the Ray task id of the ``generate`` call, which the dispatcher reads from the call's object
    ref: an attempt's hold is never confused with an earlier attempt of the same clip on a killed actor.
    It keeps nothing else: restarted after a crash, it knows only the holds taken since, and the clips
    holding a GPU meanwhile go unwatched until they end.
    """

    def __init__(self) -> None:
        self._holds: dict[str, tuple[str, str, str, float]] = {}  # call id -> clip, label, worker, since

    def took(self, call_id: str, clip_id: str, label: str, worker: str) -> None:
        self._holds[call_id] = (clip_id, label, worker, time.monotonic())

    def released(self, call_id: str) -> None:
        self._holds.pop(call_id, None)

    def held(self) -> dict[str, GpuHold]:
        """The holds now, by call id."""
        now = time.monotonic()
        return {
            call: GpuHold(clip_id, label, worker, now - since)
            for call, (clip_id, label, worker, since) in self._holds.items()
        }
