"""Engine benchmark: stock diffusers vs wan_engine on the same random weights at real size, side by side.

    python -m bench.engine --config ti2v5b_720p [--steps N] [--out DIR]
    python -m bench.engine --config ti2v5b_720p --tiny --steps 2 --out DIR   # CPU smoke test
    python -m bench.engine --config a14b_t2v_480p --distilled [--budget-s S] --out DIR
    python -m bench.engine --config ti2v5b_720p --decode-study --out DIR
    python -m bench.engine --config a14b_t2v_480p --small-card 3 [--weights-8bit fp8] --out DIR

Run from the repository root on the GPU machine (see bench/README.md for the exact commands used).
One study per command, each a module of bench/engine/: by default ``compare``, one clip through
stock diffusers and one through ``WanGenerator`` (exact mode) on the same real-size pipeline with
the same seed and inputs, timing each stage, against this GPU's measured matmul rate; the flags
below pick another study.

With ``--steps N`` below the config's step count the denoising time is measured over N steps
and scaled to the full count (every step costs the same); the output says so.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch

from bench.common import device_name
from bench.engine import (
    approximate,
    compare,
    decode,
    distilled,
    error,
    memory,
    small_card,
    streaming,
    summary,
    throughput,
)
from bench.real_size import CONFIGS


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.engine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", choices=sorted(CONFIGS))
    parser.add_argument("--summarize", type=Path, metavar="DIR", help="rebuild DIR/engine-latest.{json,md}")
    parser.add_argument(
        "--steps", type=int, default=None, help="denoising steps to run (scaled to the full count)"
    )
    parser.add_argument(
        "--error-study",
        type=int,
        metavar="STEPS",
        help="measure exact mode's numeric distance over STEPS steps",
    )
    parser.add_argument(
        "--memory-check", type=int, metavar="STEPS", help="ours alone: peak memory and the expert switch"
    )
    parser.add_argument(
        "--gpu-memory-gib",
        type=float,
        help="with --memory-check: use only this much GPU memory, as on a smaller card",
    )
    parser.add_argument(
        "--small-card",
        type=int,
        metavar="STEPS",
        help="the model held to --gpu-memory-gib (default 22), weights from host memory, against resident",
    )
    parser.add_argument(
        "--weights-8bit", choices=["fp8", "int8"], help="with --small-card: weights stored in 8 bits"
    )
    parser.add_argument(
        "--streaming-check",
        type=int,
        metavar="STEPS",
        help="streamed experts against resident ones, bit for bit",
    )
    parser.add_argument(
        "--throughput", action="store_true", help="per-clip step time, 1 vs 2 clips per forward"
    )
    parser.add_argument(
        "--approximate", action="store_true", help="the opt-in approximate modes against exact mode"
    )
    parser.add_argument(
        "--modes", nargs="+", choices=sorted(approximate.MODES), help="with --approximate: these modes only"
    )
    parser.add_argument(
        "--distilled",
        action="store_true",
        help="the 4-step distilled recipe with LoRA adapters: stock, stock compiled and ours; adapter costs",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=distilled.DEFAULT_BUDGET_S,
        help="with --distilled: skip the adapter-cost parts that would end past this many seconds",
    )
    parser.add_argument(
        "--decode-study", action="store_true", help="the VAE decode alone: each of wan_engine.vae's options"
    )
    parser.add_argument(
        "--decode-flops", action="store_true", help="the decode's PFLOP, counted on meta tensors (CPU)"
    )
    parser.add_argument("--tiny", action="store_true", help="smoke-test the script on the tiny model (CPU)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    args = parser.parse_args()
    if args.summarize:
        summary.run(args.summarize)
        return
    if not args.config:
        parser.error("--config is required")
    print(f"{platform.node()} {device_name()} torch {torch.__version__}", flush=True)
    variant = "tiny" if args.tiny else "full"
    if args.decode_flops:
        print(f"{args.config} decode: {decode.decode_pflop(args.config):.3f} PFLOP", flush=True)
    elif args.decode_study:
        decode.run(args.config, args.out, variant)
    elif args.distilled:
        distilled.run(args.config, args.out, variant, args.budget_s)
    elif args.approximate:
        approximate.run(args.config, args.out, variant, args.modes)
    elif args.throughput:
        throughput.run(args.config, args.out)
    elif args.small_card:
        small_card.run(
            args.config, args.small_card, args.out, args.gpu_memory_gib or 22.0, args.weights_8bit, variant
        )
    elif args.streaming_check:
        streaming.run(args.config, args.streaming_check, args.out)
    elif args.memory_check:
        memory.run(args.config, args.memory_check, args.out, args.gpu_memory_gib)
    elif args.error_study:
        error.run(args.config, args.error_study, args.out)
    else:
        compare.run(args.config, args.steps, args.out, variant)


if __name__ == "__main__":
    main()
