"""Shared start and end of the GPU benchmark scripts (``gpu_knn.py``, ``gpu_scoring.py``).

``begin`` parses ``--out`` / ``--quick``, and where no CUDA device is present writes a JSON that
says so (one ``status`` row) and returns ``None``, so ``gpu_check.sh`` and ``bench`` still get a
file to render. ``write_rows`` saves ``{"machine": ..., "rows": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import time

import torch


def begin(name: str, description: str | None = None, skip_key: str = "config"):
    """``(args, json_path, machine)``, or ``None`` after writing the skip record (no GPU)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{name}.json")
    machine = {"host": platform.node(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d", time.gmtime())}
    if not torch.cuda.is_available():
        write_rows(path, machine, [{skip_key: "all", "status": "skipped: no CUDA device"}])
        print("no CUDA device; wrote", path)
        return None
    machine["gpu"] = torch.cuda.get_device_name(0)
    return args, path, machine


def write_rows(path: str, machine: dict, rows: list[dict]) -> None:
    """The JSON file of a benchmark; a row's keys that start with ``_`` (live objects a later
    stage takes, such as a step to profile) stay out."""
    public = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]
    with open(path, "w") as handle:
        json.dump({"machine": machine, "rows": public}, handle, indent=1)


def _stopped(signum, frame):
    raise SystemExit(f"stopped by signal {signum}")


def stop_on_sigterm() -> None:
    """Make SIGTERM (gpu_check.sh's stage time limit) raise SystemExit, so that a script's
    ``finally`` still writes the rows measured until then."""
    signal.signal(signal.SIGTERM, _stopped)
