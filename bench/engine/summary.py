"""``engine-latest.json`` and ``engine-latest.md`` from the newest run of each config (``--summarize``)."""

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


def run(results_dir: Path) -> dict:
    """Summarize the side-by-side runs (``bench.engine.compare``) under ``results_dir``'s dated folders."""
    latest: dict = {}
    for path in sorted(results_dir.glob("*/engine-*.json")):
        result = json.loads(path.read_text())
        if "speedup_vs_stock" in result:
            latest[result["config"]] = {k: result[k] for k in FIELDS} | {"source": str(path)}
    (results_dir / "engine-latest.json").write_text(json.dumps(latest, indent=1) + "\n")
    rows = [
        "| config | device | stock s | ours s | speedup | denoise / matmul rate | decode share | peak GiB |"
    ]
    rows.append("|---|---|---|---|---|---|---|---|")
    for name, r in latest.items():
        rows.append(
            f"| {name} | {r['device']} | {r['stock_s']} | {r['ours_s']} | {r['speedup_vs_stock']} | "
            f"{r['denoise_matmul_fraction']} | {r['decode_fraction']} | {r['peak_gib']} |"
        )
    (results_dir / "engine-latest.md").write_text("\n".join(rows) + "\n")
    return latest
