"""Shared benchmark set-up: size modes and the machine record written into every JSON.

``ELOGITNORM_BENCH_SIZE`` picks the sizes (read before the benchmark modules import):

* ``full`` (default): the sizes users train at, CIFAR to 10^5 classes;
* ``quick``: protocol sizes for the losses and KNN, fewer rows for the scorer / metric
  benchmarks, and only the fastest native KNN kernel (``elogitnorm-fast bench --quick``, under
  10 minutes on 2 cores);
* ``smoke``: tiny sizes, for CI to check that every benchmark still runs (``--benchmark-disable``).
"""

from __future__ import annotations

import os
import platform
import subprocess

MODES = {
    "full": {},
    "quick": {"ELOGITNORM_BENCH_ROWS": "100000", "ELOGITNORM_BENCH_SCORES": "1000000,10000000",
              "KNN_BENCH_KERNELS": "auto"},
    "smoke": {"ELOGITNORM_BENCH_ROWS": "2000", "ELOGITNORM_BENCH_SCORES": "5000",
              "KNN_BENCH_SCALE": "0.01"},
}
MODE = os.environ.get("ELOGITNORM_BENCH_SIZE", "full")
if MODE not in MODES:
    raise ValueError(f"ELOGITNORM_BENCH_SIZE must be one of {sorted(MODES)}, got {MODE!r}")
for key, value in MODES[MODE].items():
    os.environ.setdefault(key, value)
# Inductor's pool of compile workers keeps spinning after a torch.compile cell and slows the
# eager cells timed next on a 2-core machine: compile in-process instead.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


def pytest_benchmark_update_machine_info(config, machine_info):
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    machine_info.update(
        torch=torch.__version__, triton=triton_version, threads=torch.get_num_threads(),
        commit=commit, size_mode=MODE, python_version=platform.python_version(),
        gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    )


def pytest_benchmark_update_json(config, benchmarks, output_json):
    # Keep the statistics, drop every round's raw time (tens of MB for the fast cells).
    for bench in output_json.get("benchmarks", []):
        bench.get("stats", {}).pop("data", None)
