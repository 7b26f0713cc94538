"""Attention kernels at Wan2.2's production shapes, side by side, through diffusers' own dispatcher.

    python -m bench.attention --out DIR

Each diffusers backend that runs here (PyTorch SDPA as diffusers calls it, SDPA's cuDNN, flash and
memory-efficient kernels, and FlashAttention's CuTe-DSL kernel as ``flash_4_hub`` when
``flash_attn.cute`` is installed, supplied by ``wan_engine.attention``) computes the self- and
cross-attention of one batched-guidance forward (batch 2, head dim 128, bf16) at each shape. It
reports the median of CUDA-event timings, the achieved TFLOP/s against this GPU's bf16 matmul rate
measured in the same run, and each kernel's relative error against a float32 reference on the first
query rows (every kernel sees the same inputs).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

from bench.common import DEVICE, device_name, matmul_tflops
from wan_engine.attention import FLASH_ATTENTION_BACKEND, resolve_attention_backend

# name: (query tokens, key tokens, heads); batch 2 (conditional + unconditional), head dim 128.
SHAPES = {
    "ti2v5b_720p_self": (27280, 27280, 24),  # 1280x704, 121 frames: 31 x 44 x 20 latent patches
    "ti2v5b_720p_cross": (27280, 512, 24),  # against the 512 umT5 tokens
    "a14b_480p_self": (32760, 32760, 40),  # 832x480, 81 frames: 21 x 30 x 52
}
BACKENDS = ("native", "_native_cudnn", "_native_flash", "_native_efficient", FLASH_ATTENTION_BACKEND)
REFERENCE_ROWS = 256


def time_ms(call, repeats: int) -> float:
    call()  # compiles where the kernel is compiled at its first call (CuTe DSL)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """float32 softmax attention of the first REFERENCE_ROWS queries, in (batch, tokens, heads, dim)."""
    q, k, v = (t.float().transpose(1, 2) for t in (q[:, :REFERENCE_ROWS], k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return (weights @ v).transpose(1, 2)


def measure(name: str, repeats: int, matmul: float) -> dict:
    query_tokens, key_tokens, heads = SHAPES[name]
    gen = torch.Generator(DEVICE).manual_seed(0)
    q = torch.randn(2, query_tokens, heads, 128, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(2, key_tokens, heads, 128, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(2, key_tokens, heads, 128, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    expected = reference(q, k, v)
    flops = 4 * 2 * heads * query_tokens * key_tokens * 128
    result = {
        "tokens": [query_tokens, key_tokens],
        "heads": heads,
        "gflop": round(flops / 1e9, 1),
        "backends": {},
    }
    for backend in BACKENDS:
        try:
            resolve_attention_backend(backend, DEVICE)

            def call(backend: str = backend) -> torch.Tensor:
                return dispatch_attention_fn(q, k, v, backend=AttentionBackendName(backend))

            with torch.inference_mode():
                out = call()
                ms = time_ms(call, repeats)
        except Exception as err:  # a backend this image or GPU lacks: reported, not fatal
            result["backends"][backend] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
            print(f"{name} {backend}: unavailable ({type(err).__name__}: {str(err)[:160]})", flush=True)
            continue
        error = torch.linalg.vector_norm(
            out[:, :REFERENCE_ROWS].float() - expected
        ) / torch.linalg.vector_norm(expected)
        tflops = flops / ms / 1e9
        result["backends"][backend] = {
            "ms": round(ms, 3),
            "tflops": round(tflops, 1),
            "matmul_fraction": round(tflops / matmul, 3),
            "rel_error_vs_fp32": float(error),
        }
        print(
            f"{name} {backend}: {ms:.2f} ms, {tflops:.0f} TFLOP/s, rel error {float(error):.2e}", flush=True
        )
    timed = {b: r["ms"] for b, r in result["backends"].items() if "ms" in r}
    result["fastest"] = min(timed, key=timed.get)
    result["speedup_vs_native"] = round(timed["native"] / timed[result["fastest"]], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if DEVICE.type != "cuda":
        raise SystemExit("bench.attention times GPU kernels: run it on the GPU machine")
    matmul = matmul_tflops()
    print(f"{device_name()}: bf16 matmul {matmul:.1f} TFLOP/s", flush=True)
    results = {
        "device": device_name(),
        "torch": torch.__version__,
        "matmul_tflops": round(matmul, 1),
        "shapes": {name: measure(name, args.repeats, matmul) for name in args.shapes},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
