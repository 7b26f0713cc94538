"""What a post-production stage tells the manifest about itself."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StageReport:
    """One stage's parameters and outcome for one clip.

    ``applied`` is False when the stage decided to skip (with the reason in
    ``outcome``) or is switched off in the profile. ``cpu_seconds`` is the process
    CPU time the stage used, including ffmpeg child processes it waited for; ``seconds`` its wall time.
    """

    stage: str
    applied: bool
    params: dict[str, Any] = field(default_factory=dict)
    outcome: dict[str, Any] = field(default_factory=dict)
    cpu_seconds: float = 0.0
    seconds: float = 0.0


def _cpu_seconds() -> float:
    # Children's times count once they are waited for, which is when ffmpeg-python's run() returns.
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


@contextmanager
def cpu_timer(report: StageReport) -> Iterator[StageReport]:
    """Add the CPU time spent inside the block (this process and its finished children) and its wall time
    to ``report``."""
    start, wall_start = _cpu_seconds(), time.perf_counter()
    try:
        yield report
    finally:
        report.cpu_seconds += round(_cpu_seconds() - start, 3)
        report.seconds += round(time.perf_counter() - wall_start, 3)
