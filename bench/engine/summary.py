"""``engine-latest.json`` and ``engine-latest.md`` from the newest run of each config (``--summarize``).

Side-by-side runs (``bench.engine.compare``) are keyed by config; distilled-recipe runs
(``bench.engine.distilled``) by ``<config>/<recipe>``, with the same fields and their own beside them.
"""

from __future__ import annotations

import json
from pathlib import Path

FIELDS = (
    "stock_s",
    "ours_s",
    "speedup_vs_stock",
    "denoise_matmul_fraction",
    "decode_fraction",
    "peak_gib",
    "device",
    "matmul_tflops",
    "latents_rel_error",
    "frames_rel_error",
    "denoise_scaled_from_steps",
)
DISTILLED_FIELDS = (
    "recipe",
    "stock_compiled_s",
    "speedup_vs_stock_compiled",
    "ours",
    "warmup_s",
    "ours_fuse_s",
    "stock_lora_load_fuse_s",
    "adapter_costs",
    "swap_s_max",
    "swap_graphs_compiled",
    "skipped",
)


def distilled_key(result: dict) -> str:
    """``a14b_t2v_480p/lightx2v-4step``; ``ti2v5b_720p/4-step-base`` where no distilled recipe exists."""
    recipe = result["recipe"] if result["recipe"] == "lightx2v-4step" else f"{result['steps']}-step-base"
    return f"{result['config']}/{recipe}"


def run(results_dir: Path) -> dict:
    """Summarize the runs under ``results_dir``'s dated folders (the newest of each config wins)."""
    latest: dict = {}
    for path in sorted(results_dir.glob("*/engine-*.json")):
        result = json.loads(path.read_text())
        if result.get("study") == "distilled":
            if "speedup_vs_stock" in result:  # a run stopped before ours' clip has nothing to compare
                fields = {k: result.get(k) for k in (*FIELDS, *DISTILLED_FIELDS)}
                latest[distilled_key(result)] = fields | {"source": str(path)}
        elif "speedup_vs_stock" in result:
            latest[result["config"]] = {k: result[k] for k in FIELDS} | {"source": str(path)}
    (results_dir / "engine-latest.json").write_text(json.dumps(latest, indent=1) + "\n")
    rows = [
        "| config | device | stock s | ours s | speedup | denoise / matmul rate | decode share | peak GiB |"
    ]
    rows.append("|---|---|---|---|---|---|---|---|")
    for name, r in latest.items():
        if "recipe" in r:
            continue
        rows.append(
            f"| {name} | {r['device']} | {r['stock_s']} | {r['ours_s']} | {r['speedup_vs_stock']} | "
            f"{r['denoise_matmul_fraction']} | {r['decode_fraction']} | {r['peak_gib']} |"
        )
    distilled = {name: r for name, r in latest.items() if "recipe" in r}
    if distilled:
        rows += [
            "",
            "Distilled recipe (4 steps, guidance 1; `--distilled`):",
            "",
            "| config/recipe | device | stock s | stock compiled s | ours s | vs stock | vs stock compiled | "
            "decode share | fused overhead / step | slot adapter overhead / step | swap s (max) | "
            "graphs compiled by swaps |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in distilled.items():
            costs = r.get("adapter_costs") or {}
            rows.append(
                f"| {name} | {r['device']} | {r['stock_s']} | {r['stock_compiled_s']} | {r['ours_s']} | "
                f"{r['speedup_vs_stock']} | {r['speedup_vs_stock_compiled']} | {r['decode_fraction']} | "
                f"{costs.get('fused_overhead', '-')} | {costs.get('slot_adapter_overhead', '-')} | "
                f"{r.get('swap_s_max') or '-'} | "
                f"{'-' if r.get('swap_graphs_compiled') is None else r['swap_graphs_compiled']} |"
            )
    (results_dir / "engine-latest.md").write_text("\n".join(rows) + "\n")
    return latest
