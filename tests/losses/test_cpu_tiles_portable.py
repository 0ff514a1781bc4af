"""The x86 KNN tile kernels build into a portable object: compiled for baseline x86-64 (what
``ELOGITNORM_FAST_CPU_ARCH=portable`` builds), only the AVX-512 kernel uses zmm registers and only
the two kernels use AVX at all, so the run-time dispatch in ``knn_tiles_x86.cpp`` is what keeps
an AVX2-only or SSE-only CPU safe. The default ``-march=native`` build cannot show this (every
function may use AVX-512 there). Skipped only without g++ / objdump or off x86-64.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "csrc" / "cpu" / "knn_tiles_x86.cpp"

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None or shutil.which("objdump") is None
    or platform.machine() not in ("x86_64", "AMD64"),
    reason="needs g++ and objdump on x86-64",
)


def _instructions_by_function(obj: Path) -> dict[str, list[str]]:
    listing = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", str(obj)],
        capture_output=True, text=True, check=True,
    ).stdout
    functions: dict[str, list[str]] = defaultdict(list)
    name = None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            name = header.group(1)
        elif name is not None and "\t" in line:
            functions[name].append(line.split("\t", 1)[1].strip())
    return functions


def test_only_the_dispatched_kernels_use_avx(tmp_path):
    from torch.utils.cpp_extension import include_paths

    obj = tmp_path / "knn_tiles_x86.o"
    command = [
        "g++", "-O3", "-std=c++17", "-march=x86-64", "-fopenmp", "-I", str(ROOT / "csrc"),
        *(f"-I{path}" for path in include_paths()), "-c", str(SOURCE), "-o", str(obj),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr[-4000:]}"

    functions = _instructions_by_function(obj)
    kernels = {"avx512": None, "avx2": None}
    for name, code in functions.items():
        uses_zmm = any("zmm" in ins for ins in code)
        uses_vex = any(ins.startswith("v") for ins in code)  # AVX encodings: vfmadd, vmovups...
        for isa in kernels:
            if name.startswith(f"elogitnorm_fast::knn::{isa}::run_tiles"):
                kernels[isa] = code
                break
        else:
            assert not uses_vex, f"{name} uses AVX outside a dispatched kernel"
            continue
        if isa == "avx2":
            assert not uses_zmm, f"{name}: the AVX2 kernel uses AVX-512 registers"
    assert kernels["avx512"] and any("zmm" in ins for ins in kernels["avx512"])
    assert kernels["avx2"] and any("vfmadd" in ins and "ymm" in ins for ins in kernels["avx2"])
