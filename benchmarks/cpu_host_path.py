"""The host work of one eager training step of the ``triton`` backend, measured on this CPU.

Small eager steps of the Triton path are host-bound on a GPU machine (``gpu_host.py`` measures
them there). Without a GPU this script measures the host side here: CPU tensors (the backend
takes them under ``TRITON_INTERPRET=1``, which the script sets), every Triton launch replaced by
a stand-in that only counts it (the configuration's ``launch``), one thread. For each case it
runs the default path (eager ``mean`` through the C++ node), ``triton, Python backward`` (the
Python autograd Functions) and ``F.cross_entropy`` on the same logits; the Triton paths call
the kernel modules directly (the public API's only other host work there is validation, and on
CPU tensors a check of the target range that a GPU step skips):

* ``us_per_step``: one step (forward and ``loss.backward()``), the mean over ``STEPS`` steps, the
  best of ``REPEATS``; one value per round, the three paths alternating over ``ROUNDS`` rounds;
* ``forward_ops`` / ``backward_ops``: the torch ops one step dispatches (a dispatch mode; the
  backward's include autograd's seed and the leaves' detaches), and the Triton launches.

What differs from a GPU machine's host: here the torch ops do their arithmetic (the node's
multiply, ``F.cross_entropy``'s whole computation), where on a GPU they are asynchronous
launches; and a stand-in launch costs nothing, where a real one costs tens of microseconds of
host time (``gpu_host.py``). The op counts carry over; the microseconds say which path costs
more Python.

Usage: ``python benchmarks/cpu_host_path.py [--out DIR] [--quick]``, writes
``cpu_host_path.json`` (default folder ``benchmarks/results``).
"""

from __future__ import annotations

import os

# Before triton is imported: the triton backend takes CPU tensors only under the interpreter
# (no kernel runs here: the launches are stand-ins).
os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from _loss_variants import launch_triton, python_backward_triton  # noqa: E402
from gpu_host import PYTHON_BACKWARD, loss_fn, make_inputs  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from _gpu_common import write_rows  # noqa: E402
from peak_memory import cpu_name  # noqa: E402

#: (loss, N, C, D): the CIFAR sizes, and N = 256, C = 1000 (ELogitNorm's GEMM path; D = 64 keeps
#: the CPU's GEMMs short, and D does not change the ops).
CASES = [("logitnorm", 128, 10, 0), ("logitnorm", 128, 100, 0), ("logitnorm", 256, 1000, 0),
         ("elogitnorm", 128, 10, 512), ("elogitnorm", 128, 100, 512),
         ("elogitnorm", 256, 1000, 64)]
PATHS = ("triton", PYTHON_BACKWARD, "F.cross_entropy")
STEPS, REPEATS, ROUNDS = 300, 5, 2


def stand_in_launch(launched: list[str]):
    """A configuration's ``launch`` that only appends the kernel's name to ``launched``."""
    def launch(kernel, grid, *args, **kwargs):
        launched.append(kernel.__name__)

    return launch


def loss_on_path(loss: str, path: str, launched: list[str]):
    """``(logits, weight, target) -> loss`` of ``path``, Triton launches replaced by stand-ins."""
    if path == "triton":
        return launch_triton(loss, stand_in_launch(launched))
    if path == PYTHON_BACKWARD:
        return python_backward_triton(loss, stand_in_launch(launched))
    return loss_fn(loss, path)


class CountOps(TorchDispatchMode):
    """Names of the torch ops dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def make_step(loss: str, path: str, n: int, c: int, d: int, launched: list[str]):
    """One training step's loss and backward on fixed random inputs (gradients reset first)."""
    z, w, y, leaves = make_inputs(loss, n, c, d, device="cpu")
    forward = loss_on_path(loss, path, launched)

    def step(count: CountOps | None = None) -> tuple:
        for leaf in leaves:
            leaf.grad = None
        if count is None:
            forward(z, w, y).backward()
            return ()
        with count:
            value = forward(z, w, y)
        forward_work = (list(count.ops), list(launched))
        count.ops.clear()
        launched.clear()
        with count:
            value.backward()
        return forward_work, (list(count.ops), list(launched))

    return step


def best_us(step, steps: int, repeats: int) -> float:
    for _ in range(min(steps, 30)):
        step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - start) / steps * 1e6)
    return best


def measure(cases=CASES, steps: int = STEPS, repeats: int = REPEATS,
            rounds: int = ROUNDS) -> list[dict]:
    rows = []
    launched: list[str] = []
    for loss, n, c, d in cases:
        case_rows = {}
        for path in PATHS:
            step = make_step(loss, path, n, c, d, launched)
            step()  # first calls import and cache
            launched.clear()
            (forward_ops, forward_launches), (backward_ops, backward_launches) = step(CountOps())
            case_rows[path] = {
                "loss": loss, "N": n, "C": c, "D": d, "path": path, "us_per_step": [],
                "forward_ops": forward_ops, "forward_launches": forward_launches,
                "backward_ops": backward_ops, "backward_launches": backward_launches}
        for _ in range(rounds):
            for path in PATHS:
                case_rows[path]["us_per_step"].append(
                    round(best_us(make_step(loss, path, n, c, d, launched), steps, repeats), 1))
        launched.clear()
        rows += case_rows.values()
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'case':22s} {'path':24s} {'us per step':>14s}  forward ops + launches | backward")
    for row in rows:
        case = f"{row['loss']} {row['N']}x{row['C']}" + (f"x{row['D']}" if row["D"] else "")
        times = row["us_per_step"]
        spread = f"{min(times):.0f}-{max(times):.0f}" if len(times) > 1 else f"{times[0]:.0f}"
        print(f"{case:22s} {row['path']:24s} {spread:>14s}  "
              f"{len(row['forward_ops'])} + {len(row['forward_launches'])} | "
              f"{len(row['backward_ops'])} + {len(row['backward_launches'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="few steps, one round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import triton

    steps, repeats, rounds = (20, 1, 1) if args.quick else (STEPS, REPEATS, ROUNDS)
    rows = measure(steps=steps, repeats=repeats, rounds=rounds)
    print_table(rows)
    machine = {"host": platform.node(), "cpu": cpu_name(),
               "threads": 1, "torch": torch.__version__, "triton": triton.__version__,
               "date": time.strftime("%Y-%m-%d", time.gmtime()),
               "steps": steps, "repeats": repeats, "rounds": rounds}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "cpu_host_path.json")
    write_rows(path, machine, rows)
    print("wrote", path)


if __name__ == "__main__":
    main()
