"""``elogitnorm-fast info`` reports what this build and machine can run."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from elogitnorm_fast import info
from elogitnorm_fast.extension import load_error


def test_info_reports_backends_and_knn_kernels():
    details = info.collect()
    text = info.render(details)
    assert details["torch"] == torch.__version__ and f"torch: {torch.__version__}" in text
    assert details["backends"]["torch"] is None and "torch      available" in text
    built = load_error() is None
    assert (details["backends"]["cpu"] is None) == built
    assert set(details["op_backends"]) == {"losses", "linear_losses", "logit_scores", "knn"}
    for op, reasons in details["op_backends"].items():
        assert reasons["torch"] is None and (reasons["cpu"] is None) == built
        running = [name for name, reason in reasons.items() if reason is None]
        assert f"{op} backends: " + ", ".join(running) in text
    assert set(details["op_backends"]["knn"]) == {"torch", "cpu"}
    kernels = details["knn_cpu_kernels"]
    if not built:
        assert kernels == []
        return
    assert kernels[-1] == "blas" and "knn_cpu_kernels: " + ", ".join(kernels) in text
    cpuinfo = Path("/proc/cpuinfo")
    # the run-time dispatch offers exactly the tile kernels the CPU's flags allow
    if platform.machine() == "x86_64" and cpuinfo.exists():
        flags = cpuinfo.read_text()
        assert ("avx512" in kernels) == (" avx512f" in flags)
        assert ("avx2" in kernels) == (" avx2" in flags and " fma" in flags)
