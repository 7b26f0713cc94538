"""What the benchmarks share: the device they measure, its name, timing, and how far two results are.

``DEVICE`` is the GPU when there is one, else the CPU. The timing and memory helpers follow it; a
process that measures another device (a rank of ``bench.context_parallel``) sets it first.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    """The GPU's name as CUDA reports it (``NVIDIA H100 80GB HBM3``), else ``cpu (<processor>)``."""
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()})"


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what the platform module knows."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def sync_time() -> float:
    """``time.perf_counter()`` once the device has finished the work enqueued so far."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def matmul_tflops(n: int = 8192, repeats: int = 20) -> float:
    """The bf16 matmul rate of this device: median of ``repeats`` timed n^3 products after warm-up."""
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start = sync_time()
        a @ b
        times.append(sync_time() - start)
    return 2 * n**3 / statistics.median(times) / 1e12


def reset_peak_memory() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float:
    """The GPU memory allocated at most since :func:`reset_peak_memory`; 0 on the CPU."""
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else 0.0


def peak_reserved_gib() -> float:
    """The GPU memory the caching allocator held at most since :func:`reset_peak_memory`; 0 on the CPU."""
    return torch.cuda.max_memory_reserved() / 2**30 if DEVICE.type == "cuda" else 0.0


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Relative L2 distance of ``ours`` from ``reference``, in float64."""
    ours, reference = ours.double(), reference.double()
    return float(torch.linalg.vector_norm(ours - reference) / torch.linalg.vector_norm(reference))


def frames_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """:func:`relative_error` of two clips' uint8 frames."""
    return relative_error(
        torch.from_numpy(ours.astype(np.float32)), torch.from_numpy(reference.astype(np.float32))
    )


def write_result(result: dict, path: Path) -> None:
    """Write ``result`` as JSON to ``path`` (its folder made as needed) and print it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1), flush=True)
