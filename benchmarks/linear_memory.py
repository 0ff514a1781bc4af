"""Peak extra memory and time of linear layer + loss, fwd+bwd, fused against unfused.

Each measurement runs in a fresh process (:func:`measure`), as ``peak_memory.py`` does for the
losses alone: features (N x D), head weight (C x D) and bias (C) exist before it starts, all
three require grad, and the figure is the step's own working memory: logits, their gradients,
the weight gradient's C x D buffer and every temporary. One untimed step runs first.

Variants (``--variant``, with ``--backend`` where the loss has several):

* ``fused_elogitnorm`` / ``fused_logitnorm``: :func:`elogitnorm_fast.linear_elogitnorm_loss` /
  ``linear_logitnorm_loss``;
* ``unfused_elogitnorm`` / ``unfused_logitnorm``: ``F.linear`` then the loss;
* ``unfused_ce``: ``F.linear`` then ``F.cross_entropy``.

Usage::

    python benchmarks/linear_memory.py                   # the issue's sizes -> JSON below
    python benchmarks/linear_memory.py --one --variant fused_elogitnorm --backend cpu \\
        --n 512 --c 50000 --d 256                        # one measurement, one JSON line

The full run writes ``benchmarks/results/linear_memory_cpu.json``; ``--sweep`` times the fused
``cpu`` ELogitNorm at several chunk sizes into ``linear_chunks_memory_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from linear_variants import loss_function

from peak_memory import machine_info, measure_cpu_call, run_isolated

VARIANTS = ("fused_elogitnorm", "fused_logitnorm", "unfused_elogitnorm", "unfused_logitnorm",
            "unfused_ce")
#: This script's names that :func:`linear_variants.loss_function` spells out.
_NAMES = {"unfused_ce": "unfused_cross_entropy"}
#: (variant, backend) pairs of the full run, per size.
RUNS = (("fused_elogitnorm", "cpu"), ("fused_elogitnorm", "torch"), ("fused_logitnorm", "cpu"),
        ("unfused_elogitnorm", "cpu"), ("unfused_elogitnorm", "torch"), ("unfused_ce", "-"))
#: The issue's CPU sizes (N, C, D).
SIZES = ((1024, 100_000, 512), (256, 1_000_000, 256))
RESULTS = Path(__file__).resolve().parent / "results" / "linear_memory_cpu.json"
#: ``--sweep``: fused ELogitNorm on ``cpu`` at these chunk sizes, per size (N, C, D).
SWEEP = {(1024, 100_000, 512): (42, 83, 128, 256), (256, 1_000_000, 256): (8, 16, 32, 64)}
SWEEP_RESULTS = RESULTS.with_name("linear_chunks_memory_cpu.json")


def step_function(variant: str, backend: str, chunk_rows: int | None = None):
    """``step(features, weight, bias, target)``: one fwd+bwd of ``variant``."""
    loss = loss_function(_NAMES.get(variant, variant), backend, chunk_rows)

    def step(features, weight, bias, target):
        loss(features, weight, bias, target).backward()

    return step


def _run(args: argparse.Namespace) -> dict:
    import torch

    torch.manual_seed(0)
    features = torch.randn(args.n, args.d, requires_grad=True)
    weight = (torch.randn(args.c, args.d) / args.d**0.5).requires_grad_(True)
    bias = torch.zeros(args.c, requires_grad=True)
    target = torch.randint(0, args.c, (args.n,))
    step = step_function(args.variant, args.backend, args.chunk_rows)
    step(features, weight, bias, target)  # code pages, thread pools, BLAS buffers
    features.grad = weight.grad = bias.grad = None
    extra, seconds = measure_cpu_call(lambda: step(features, weight, bias, target))
    return {"peak_extra_bytes": extra, "seconds": seconds}


def measure(variant: str, backend: str, n: int, c: int, d: int, *,
            chunk_rows: int | None = None, memory_cap_bytes: int | None = None,
            timeout_s: float = 1800.0) -> dict:
    """One measurement in a fresh interpreter; ``status`` is ``"ok"``, ``"OOM"`` (past the
    address-space cap, or killed) or ``"timeout"``."""
    command = [sys.executable, str(Path(__file__).resolve()), "--one", "--variant", variant,
               "--backend", backend, "--n", str(n), "--c", str(c), "--d", str(d)]
    if chunk_rows is not None:
        command += ["--chunk-rows", str(chunk_rows)]
    record = {"variant": variant, "backend": backend, "n": n, "c": c, "d": d,
              "chunk_rows": chunk_rows}

    return run_isolated(command, record, memory_cap_bytes=memory_cap_bytes, timeout_s=timeout_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", action="store_true", help="one measurement in this process")
    parser.add_argument("--variant", choices=VARIANTS, default="fused_elogitnorm")
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--c", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--chunk-rows", type=int, default=None)
    parser.add_argument("--cap-gib", type=float, default=20.0,
                        help="address-space cap of each full-run measurement")
    parser.add_argument("--sizes", default=None,
                        help="N,C,D;N,C,D... instead of the issue's sizes")
    parser.add_argument("--sweep", action="store_true",
                        help="chunk sizes of the fused cpu ELogitNorm instead (SWEEP)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(_run(args)))
        return
    if args.sweep:
        cells = [("fused_elogitnorm", "cpu", size, chunk)
                 for size, chunks in SWEEP.items() for chunk in chunks]
    else:
        sizes = SIZES if args.sizes is None else [tuple(int(v) for v in s.split(","))
                                                  for s in args.sizes.split(";")]
        cells = [(variant, backend, size, None) for size in sizes for variant, backend in RUNS]
    records = []
    for variant, backend, (n, c, d), chunk in cells:
        result = measure(variant, backend, n, c, d, chunk_rows=chunk,
                         memory_cap_bytes=int(args.cap_gib * 2**30))
        print(json.dumps(result), flush=True)
        records.append(result)
    out = args.out or (SWEEP_RESULTS if args.sweep else RESULTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine_info(), "records": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
