"""The GPU benchmark scripts stay runnable where no GPU is: GPU time is scarce, so a script that
fails at import or argument parsing must fail here, not on the device machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("gpu_*.py") if p.name != "gpu_summary.py")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_gpu_script_imports_and_parses_arguments(script):
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--out" in done.stdout


def test_gpu_check_script_is_valid_bash():
    done = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_gpu_summary_renders_the_committed_results(tmp_path):
    results = sorted((ROOT / "benchmarks" / "results").glob("gpu_*.json"))
    if not results:
        pytest.skip("no GPU results committed")
    for path in results:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_summary.py"),
                           str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    for path in results:
        assert path.stem in done.stdout
    assert "|---|" in done.stdout
