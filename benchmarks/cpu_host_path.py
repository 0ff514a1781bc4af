"""The host work of one eager training step of the ``triton`` backend, measured on this CPU.

Small eager steps of the Triton path are host-bound on a GPU machine (``gpu_host.py`` measures
them there). Without a GPU this script measures the host side here: CPU tensors (the backend
takes them under ``TRITON_INTERPRET=1``, which the script sets), every Triton launch replaced by
a stand-in that only counts it, one thread. For each case it runs the default path (eager
``mean`` through the C++ node), ``triton, Python backward`` (the Python autograd Functions) and
``F.cross_entropy`` on the same logits:

* ``us_per_step``: one step (forward and ``loss.backward()``), the mean over ``STEPS`` steps, the
  best of ``REPEATS``; one value per round, the three paths alternating over ``ROUNDS`` rounds;
* ``forward_ops`` / ``backward_ops``: the torch ops one step dispatches (a dispatch mode; the
  backward's include autograd's seed and the leaves' detaches), and the Triton launches.

What differs from a GPU machine's host: here the torch ops do their arithmetic (the node's
multiply, ``F.cross_entropy``'s whole computation), where on a GPU they are asynchronous
launches; and a stand-in launch costs nothing, where on the H100 machine an empty Triton launch
took 13 us of host time and the LogitNorm forward call (allocations and launch) 60 us. The op
counts carry over; the microseconds say which path costs more Python.

Usage: ``python benchmarks/cpu_host_path.py [--out DIR] [--quick]``, writes
``cpu_host_path.json`` (default folder ``benchmarks/results``).
"""

from __future__ import annotations

import os

# Before triton is imported: the triton backend takes CPU tensors only under the interpreter
# (no kernel runs here: the launches are stand-ins).
os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from unittest import mock  # noqa: E402

import torch  # noqa: E402
from gpu_host import PYTHON_BACKWARD, launchers_replaced, loss_fn, make_inputs  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from elogitnorm_fast.backends import triton_backend  # noqa: E402

from _gpu_common import write_rows  # noqa: E402

#: (loss, N, C, D): the CIFAR sizes, and N = 256, C = 1000 (ELogitNorm's GEMM path; D = 64 keeps
#: the CPU's GEMMs short, and D does not change the ops).
CASES = [("logitnorm", 128, 10, 0), ("logitnorm", 128, 100, 0), ("logitnorm", 256, 1000, 0),
         ("elogitnorm", 128, 10, 512), ("elogitnorm", 128, 100, 512),
         ("elogitnorm", 256, 1000, 64)]
PATHS = ("triton", PYTHON_BACKWARD, "F.cross_entropy")
STEPS, REPEATS, ROUNDS = 300, 5, 2


@contextlib.contextmanager
def stand_in_launches(launched: list[str]):
    """Every Triton launch of the kernel modules only appends the kernel's name; and the public
    API skips the target-range pass it runs on CPU tensors only (on a GPU it would be a host
    sync), so the ops counted are a GPU step's."""
    def stand_in(original):
        return lambda kernel, grid, traced: lambda *args, **kwargs: launched.append(
            kernel.__name__)

    with (mock.patch.object(triton_backend, "CHECKS_TARGET_VALUES", True, create=True),
          launchers_replaced(stand_in)):
        yield


class CountOps(TorchDispatchMode):
    """Names of the torch ops dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def make_step(loss: str, path: str, n: int, c: int, d: int):
    """One training step's loss and backward on fixed random inputs (gradients reset first)."""
    z, w, y, leaves = make_inputs(loss, n, c, d, device="cpu")
    forward = loss_fn(loss, path)

    def step(count: CountOps | None = None, launched: list[str] | None = None) -> tuple:
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
    with stand_in_launches(launched):
        for loss, n, c, d in cases:
            case_rows = {}
            for path in PATHS:
                step = make_step(loss, path, n, c, d)
                step()  # first calls import and cache
                launched.clear()
                (forward_ops, forward_launches), (backward_ops, backward_launches) = step(
                    CountOps(), launched)
                case_rows[path] = {
                    "loss": loss, "N": n, "C": c, "D": d, "path": path, "us_per_step": [],
                    "forward_ops": forward_ops, "forward_launches": forward_launches,
                    "backward_ops": backward_ops, "backward_launches": backward_launches}
            for _ in range(rounds):
                for path in PATHS:
                    case_rows[path]["us_per_step"].append(
                        round(best_us(make_step(loss, path, n, c, d), steps, repeats), 1))
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


def cpu_name() -> str:
    """The CPU's model name (Linux), else the architecture."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


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
