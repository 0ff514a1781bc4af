"""Print a short Markdown table from the JSON files that the gpu_*.py scripts wrote to a folder.

Usage: ``python benchmarks/gpu_summary.py OUT_DIR``. Each JSON holds ``machine`` and a list of
records under ``rows`` (or ``results`` / ``records``); numbers are shown with 4 significant
digits, and a record's ``status`` (OOM, timeout, skipped) is shown instead of missing times.
"""

from __future__ import annotations

import glob
import json
import os
import sys

PREFERRED = ("op", "loss", "pass", "backend", "baseline", "size", "n", "c", "d", "bank", "queries",
             "k", "status", "ms", "median_ms", "fwd_ms", "fwd_bwd_ms", "speedup", "ratio",
             "bandwidth_fraction", "fraction_of_floor", "matmul_fraction", "gbps", "tflops")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _rows(payload: dict) -> list[dict]:
    for key in ("rows", "results", "records"):
        if isinstance(payload.get(key), list):
            return [row for row in payload[key] if isinstance(row, dict)]
    return []


def render(folder: str) -> str:
    parts = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as handle:
            try:
                payload = json.load(handle)
            except json.JSONDecodeError as error:
                parts.append(f"{os.path.basename(path)}: unreadable ({error})")
                continue
        rows = _rows(payload) if isinstance(payload, dict) else []
        if not rows:
            continue
        keys = [k for k in PREFERRED if any(k in row for row in rows)]
        keys += [k for k in rows[0] if k not in keys and not isinstance(rows[0][k], (dict, list))]
        keys = keys[:10]
        machine = payload.get("machine", {})
        card = machine.get("gpu") or machine.get("device_name") or machine.get("card") or ""
        parts.append(f"\n{os.path.basename(path)} {card}")
        parts.append("| " + " | ".join(keys) + " |")
        parts.append("|" + "---|" * len(keys))
        for row in rows:
            parts.append("| " + " | ".join(_cell(row.get(k, "")) for k in keys) + " |")
    return "\n".join(parts) if parts else f"no JSON results in {folder}"


if __name__ == "__main__":
    print(render(sys.argv[1] if len(sys.argv) > 1 else "."))
