"""Ahead-of-time compilation of the Triton kernels for NVIDIA targets, without a GPU.

The Triton interpreter checks what the kernels compute but not that they compile: a kernel can
pass every interpreter test and still fail in the compiler on a GPU machine, where time is
scarce. ``triton.compile`` with an explicit target builds PTX and a cubin on any machine, so the
test suite compiles every kernel in the configurations the launchers pick for the benchmark
sizes, and ``ptxas -v`` on the result reports registers and spills (spilled registers go to local
memory, a common cause of bandwidth-bound kernels running below the floor).

Each configuration is specialized as the JIT specializes contiguous, freshly allocated tensors
at the protocol's sizes (:func:`jit_attributes`): pointers 16-byte aligned, W's column stride 1,
D and W's row stride multiples of 16. Without that, loads compile to scalar ones and the
register counts differ from a GPU's (the fused ELogitNorm kernel at C = 100: 255 registers
unspecialized, 96 specialized).

Run ``python tools/triton_aot.py [--arch 90] [--out FILE.json]`` for a table of registers and
spills per kernel and configuration.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import sys
from dataclasses import dataclass

_SCALARS_I32 = {"n_rows", "n_cols", "n_features", "feature_run", "ignore_index", "tiles"}
_SCALARS_F32 = {"eps", "inv_tau", "inv_divisor", "inv_temperature", "expected_value"}
_INDEX_POINTERS = {"target_ptr", "predicted_ptr"}
#: The logits' dtype; other pointers fp32.
_DATA_POINTERS = {"logits_ptr", "grad_ptr", "z_ptr"}


@dataclass(frozen=True)
class KernelConfig:
    """One compilation: a kernel, its constexpr values, warps and the logits' dtype."""

    module: str
    kernel: str
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    dtype: str = "fp32"

    @property
    def label(self) -> str:
        values = ", ".join(f"{k}={v}" for k, v in self.constexprs)
        return f"{self.kernel}[{values}] warps={self.num_warps} {self.dtype}"


def _signature(fn, constexprs: dict, dtype: str) -> dict[str, str]:
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _INDEX_POINTERS:
            signature[name] = "*i64"
        elif name in _DATA_POINTERS:
            signature[name] = f"*{dtype}"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        elif "stride" in name:
            signature[name] = "i64"
        elif name in _SCALARS_I32:
            signature[name] = "i32"
        elif name in _SCALARS_F32:
            signature[name] = "fp32"
        else:
            raise ValueError(f"no signature type for argument {name!r} of {fn.__name__}")
    return signature


def loss_configs() -> list[KernelConfig]:
    """The loss kernels in the blocks ``row_blocks`` picks at the protocol's sizes (C = 10,
    1000, 10,000, 32768 kept on chip; C = 100,000 streamed), and ELogitNorm's fused small-C
    kernel (``fused_blocks``), fp32 and bf16 logits."""
    from elogitnorm_fast.kernels.rows import COUNT_BLOCK, row_blocks

    configs = []
    for num_cols in (10, 1000, 10_000, 32768, 100_000):
        blocks = row_blocks(num_cols)
        shape = (("SINGLE", blocks.single), ("ROWS", blocks.rows), ("BLOCK", blocks.block))
        for dtype in ("fp32", "bf16"):
            # LogitNorm's forward writes the gradient too where the rows stay on chip.
            configs.append(KernelConfig(
                "logitnorm", "_logitnorm_kernel",
                (("WRITE_GRAD", blocks.single), ("EXPECTED_PTR", True), ("REDUCE", 0),
                 ("ONE_PROGRAM", False), *shape, ("COUNT_BLOCK", COUNT_BLOCK),
                 ("WRITE_STATS", True)),
                blocks.num_warps, dtype))
            # The mean reduced by a block of rows per program, each counting the targets.
            configs.append(KernelConfig(
                "logitnorm", "_logitnorm_kernel",
                (("WRITE_GRAD", blocks.single), ("EXPECTED_PTR", False), ("REDUCE", 2),
                 ("ONE_PROGRAM", False), *shape, ("COUNT_BLOCK", COUNT_BLOCK),
                 ("WRITE_STATS", True)),
                blocks.num_warps, dtype))
            # ELogitNorm per row (the op path) and eager's mean (rows' shares, counted).
            for reduce in (0, 2) if dtype == "fp32" else (2,):
                configs.append(KernelConfig(
                    "elogitnorm", "_elogitnorm_kernel",
                    (("PER_SAMPLE", True), ("WRITE_GRAD", True), ("WRITE_COEFFICIENTS", True),
                     *shape, ("REDUCE", reduce), ("COUNT_BLOCK", COUNT_BLOCK)),
                    blocks.num_warps, dtype))
    # LogitNorm's one-program sum and mean at C = 10 and 100 (logitnorm_reduced), for the C++
    # node (no statistics) and for the Python backward.
    for num_cols in (10, 100):
        blocks = row_blocks(num_cols)
        for reduce, write_stats in itertools.product((1, 2), (False, True)):
            configs.append(KernelConfig(
                "logitnorm", "_logitnorm_kernel",
                (("WRITE_GRAD", True), ("EXPECTED_PTR", False), ("REDUCE", reduce),
                 ("ONE_PROGRAM", True), ("SINGLE", True), ("ROWS", blocks.rows),
                 ("BLOCK", blocks.block), ("COUNT_BLOCK", COUNT_BLOCK),
                 ("WRITE_STATS", write_stats)), blocks.num_warps))
    # The fused small-C kernel (argmax and distances inside) at C = 10 and 100, D = 512 (N = 128:
    # N >= C, coefficient rows not folded).
    from elogitnorm_fast.kernels.elogitnorm import fused_blocks

    for num_cols in (10, 100):
        for rows in (1, 4):  # the default, and 4 rows per program (gpu_losses times both)
            fused = fused_blocks(num_cols, 512, rows=rows)
            for dtype in ("fp32", "bf16") if rows == 1 else ("fp32",):
                configs.append(KernelConfig(
                    "elogitnorm", "_elogitnorm_fused_kernel",
                    (("WRITE_GRAD", True), ("WRITE_COEFFICIENTS", True), ("ROWS", fused.rows),
                     ("BLOCK", fused.block), ("FEATURES", fused.features), ("REDUCE", 2),
                     ("COUNT_BLOCK", COUNT_BLOCK), ("FOLD", False),
                     ("DEFERRED", fused.deferred_sums)),
                    fused.num_warps, dtype))
    return configs


def other_configs() -> list[KernelConfig]:
    """The backward kernels (LogitNorm's gradient, the row rescaling of ELogitNorm's, its
    class-pooled weight gradient at C = 10 and 100, and the same weight gradient for the unit
    upstream gradient, which the forward of the C++-node path launches) and the logit-scores
    kernel."""
    from elogitnorm_fast.kernels.class_gradient import CLASSES, pooled_blocks

    return [
        *(KernelConfig("logitnorm", "_logitnorm_backward_kernel",
                       (("SKIP_EXPECTED", skip), ("EXPECTED_PTR", True), ("REDUCED", reduced),
                        ("ROWS", 1), ("BLOCK", 2048)), 4, "bf16")
          for skip in (True, False) for reduced in (False, True)),
        *(KernelConfig("class_gradient", "_pooled_weight_gradient_kernel",
                       (("UNIT_UPSTREAM", unit), ("CLASSES", CLASSES), ("SCAN", blocks.scan),
                        ("BLOCK", blocks.block), ("FEATURES", blocks.features)),
                       blocks.num_warps, dtype)
          for blocks in (pooled_blocks(10), pooled_blocks(100))
          for unit, dtype in ((False, "fp32"), (False, "bf16"), (True, "fp32"))),
        KernelConfig("rows", "_scale_rows_kernel",
                     (("HAS_FIRST", True), ("HAS_SECOND", True), ("ROWS", 1), ("BLOCK", 2048)), 4),
        KernelConfig("logit_scores", "_logit_row_stats_kernel",
                     (("WANT_T", True), ("BLOCK_ROWS", 4), ("BLOCK_COLS", 1024)), 4),
    ]


#: Integer arguments that are multiples of 16 at every protocol size (D = 512 or 2048), and
#: arguments equal to 1 for a contiguous W; the JIT specializes on both.
_MULTIPLES_OF_16 = {"n_features", "weight_stride"}
_UNIT = {"weight_col_stride"}


def jit_attributes(fn, constexprs: dict) -> tuple[dict, dict]:
    """``(constexprs, attrs)`` for ``ASTSource`` as the JIT would specialize a launch on
    contiguous, 16-byte aligned tensors: the unit strides become constants and the pointers (and
    :data:`_MULTIPLES_OF_16`) get ``tt.divisibility`` 16 (triton >= 3.3's attribute format)."""
    constexprs = {**{name: 1 for name in _UNIT if name in fn.arg_names}, **constexprs}
    attrs = {(index,): [["tt.divisibility", 16]] for index, name in enumerate(fn.arg_names)
             if name not in constexprs and (name.endswith("_ptr") or name in _MULTIPLES_OF_16)}
    return constexprs, attrs


def compile_config(config: KernelConfig, arch: int):
    """``triton.compile`` of one configuration for ``sm_<arch>``, specialized as the JIT would
    specialize it (:func:`jit_attributes`); returns the compiled kernel."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"elogitnorm_fast.kernels.{config.module}"),
                 config.kernel)
    constexprs, attrs = jit_attributes(fn, dict(config.constexprs))
    source = ASTSource(fn, _signature(fn, constexprs, config.dtype), constexprs=constexprs,
                       attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps})


def ptxas_usage(ptx: str, arch: int) -> dict[str, int]:
    """Registers and spill bytes that ``ptxas -v`` reports for ``ptx`` on ``sm_<arch>``."""
    import os
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(arch).path
    except TypeError:  # older triton releases take no architecture argument
        ptxas = get_ptxas().path
    suffix = "a" if arch == 90 else ""
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        result = subprocess.run(
            [ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", source, "-o",
             os.path.join(folder, "kernel.cubin")],
            capture_output=True, text=True, check=True,
        )
    log = result.stdout + result.stderr
    registers = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    return {
        "registers": int(registers.group(1)) if registers else -1,
        "spill_store_bytes": int(stores.group(1)) if stores else 0,
        "spill_load_bytes": int(loads.group(1)) if loads else 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--out", help="write the table as JSON here")
    args = parser.parse_args(argv)
    import triton

    rows = []
    for config in loss_configs() + other_configs():
        compiled = compile_config(config, args.arch)
        usage = ptxas_usage(compiled.asm["ptx"], args.arch)
        rows.append({"kernel": config.label, **usage})
        print(f"{config.label:<110} regs {usage['registers']:>3}  spill stores "
              f"{usage['spill_store_bytes']:>6} B  loads {usage['spill_load_bytes']:>6} B",
              flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"arch": f"sm_{args.arch}", "triton": triton.__version__, "kernels": rows},
                      handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
