"""GPU benchmark of the losses: every CUDA backend against the baselines, side by side.

Times forward (grad enabled, as in training) and forward+backward of LogitNorm and ELogitNorm
for every backend available on CUDA, the reference in eager mode and under ``torch.compile``
(small sizes only: compiling is slow), and ``F.cross_entropy`` on pre-scaled logits (the floor of
any loss kernel), at the CIFAR to ImageNet-1k training sizes plus N=4096, C=32768 for
LogitNorm. Medians from ``triton.testing.do_bench`` (inputs rotate over several buffer sets so
repeated calls do not hit L2); calls under 50 us, every size up to 2^18 logits (host-bound
in eager mode), and the bandwidth case (``GRAPH_ALSO``) are also timed as a replayed CUDA
graph. Each result is checked against the float64 math before it is timed. Reports the fraction
of the memory-bandwidth floor (logits read + gradient written (+ W read), over the measured
device-to-device copy bandwidth) and the peak extra memory; OOM, infeasible sizes and the time
budget are recorded, not dropped. Writes JSON (card, torch, triton) to ``--out`` and prints a
short table.

Example::

    python benchmarks/gpu_losses.py --out benchmarks/results/gpu --quick
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _loss_variants import triton_variants  # noqa: E402

import elogitnorm_fast as ef  # noqa: E402
from elogitnorm_fast.reference import elogitnorm_reference, logitnorm_reference  # noqa: E402

from _gpu_common import stop_on_sigterm  # noqa: E402

ELOGITNORM_SIZES = [(128, 10, 512), (128, 100, 512), (256, 200, 512), (256, 1000, 2048),
                    (1024, 10000, 512), (1024, 100000, 512)]
LOGITNORM_SIZES = [(n, c, 0) for n, c, _ in ELOGITNORM_SIZES] + [(4096, 32768, 0)]
#: The issue's target sizes, timed first so that the budget (``--budget-s``) cuts other sizes
#: before these: ImageNet-1k ELogitNorm, the LogitNorm bandwidth case, the CIFAR sizes.
TARGETS_FIRST = [("elogitnorm", 256, 1000), ("logitnorm", 4096, 32768), ("logitnorm", 128, 10),
                 ("elogitnorm", 128, 10), ("logitnorm", 128, 100), ("elogitnorm", 128, 100)]
QUICK_ELOGITNORM = [(128, 10, 512), (256, 1000, 2048), (1024, 10000, 512)]
QUICK_LOGITNORM = [(128, 10, 0), (256, 1000, 0), (4096, 32768, 0)]
#: torch.compile only at these (N, C): each shape compiles anew, tens of seconds.
COMPILE_SIZES = {"elogitnorm": {(128, 10), (256, 1000)}, "logitnorm": {(128, 10), (4096, 32768)}}
QUICK_COMPILE_SIZES = {"elogitnorm": {(256, 1000)}, "logitnorm": {(4096, 32768)}}
ROTATION_BYTES = 256 << 20  # input sets together exceed the L2 cache (50 MiB on H100)
GRAPH_BELOW_MS = 0.05
GRAPH_BELOW_ELEMENTS = 1 << 18
#: Also timed as a replayed CUDA graph, for these implementations only: the bandwidth case. On
#: the H100 its eager fwd+bwd reached 0.65 of the floor where the forward alone reached 0.83;
#: with the host issuing about as fast as the device runs, ``do_bench``'s events can enclose
#: host gaps (the host rows of ``gpu_host.py`` time the same step's host side).
GRAPH_ALSO = {("logitnorm", 4096, 32768): ("triton", "F.cross_entropy (pre-scaled)",
                                           "triton, counted in blocks")}
GRAPH_CALLS = 20  # calls captured in one graph
GRAPH_REPLAYS = 15


def copy_bandwidth(triton_testing) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write of 1 GiB)."""
    source = torch.empty(1 << 28, dtype=torch.float32, device="cuda").uniform_()
    target = torch.empty_like(source)
    ms = triton_testing.do_bench(lambda: target.copy_(source), warmup=25, rep=200,
                                 return_mode="median")
    return 2 * source.numel() * 4 / (ms * 1e-3)


def make_sets(loss: str, n: int, c: int, d: int, count: int):
    """``count`` independent (logits, weight, target) sets; leaves require grad.

    Drawn from a generator of their own: a CUDA-graph capture that fails (a baseline that syncs
    with the host) can leave the default CUDA generator marked as capturing, and every later
    draw from it then fails ("Offset increment outside graph capture", seen on an H100)."""
    generator = torch.Generator(device="cuda")
    generator.manual_seed(n * 1_000_003 + c)
    sets = []
    for _ in range(count):
        logits = (torch.randn(n, c, device="cuda", generator=generator) * 3).requires_grad_(True)
        weight = (torch.randn(c, d, device="cuda", generator=generator) / math.sqrt(d)
                  ).requires_grad_(True) if loss == "elogitnorm" else None
        target = torch.randint(0, c, (n,), device="cuda", generator=generator)
        sets.append((logits, weight, target))
    return sets


def reference_bytes(c: int, d: int) -> int:
    """Memory of the released all-pairs formula: the C x C x D difference and its gradient."""
    return 3 * c * c * d * 4


def implementations(loss: str, n: int, c: int, d: int, compile_sizes: set) -> dict:
    """name -> (callable(logits, weight, target) -> scalar loss, None or reason to skip)."""
    impls = {}
    for backend in ef.available_backends("cuda"):
        if backend == "reference":
            continue
        if loss == "elogitnorm":
            impls[backend] = (lambda z, w, y, b=backend: ef.elogitnorm_loss(z, w, y, backend=b),
                              None)
        else:
            impls[backend] = (lambda z, w, y, b=backend: ef.logitnorm_loss(z, y, backend=b), None)
    if loss == "elogitnorm":
        def reference(z, w, y):
            return elogitnorm_reference(z, w, y)
    else:
        def reference(z, w, y):
            return logitnorm_reference(z, y)
    free, _ = torch.cuda.mem_get_info()
    infeasible = None
    if loss == "elogitnorm" and reference_bytes(c, d) > 0.6 * free:
        infeasible = (f"OOM/infeasible: C x C x D needs {reference_bytes(c, d) / 2**30:.0f} GiB "
                      f"> 60% of {free / 2**30:.0f} GiB free (not attempted)")
    impls["reference eager"] = (reference, infeasible)
    if (n, c) in compile_sizes[loss]:
        impls["reference compiled"] = (torch.compile(reference), infeasible)
        # Ours compiled too (the traced triton_op path): compiled against compiled.
        for backend in ("torch", "triton") if loss == "elogitnorm" else ("triton",):
            fn = impls.get(backend, (None, None))[0]
            if fn is not None:
                impls[f"{backend} compiled"] = (torch.compile(fn), None)
    else:
        impls["reference compiled"] = (None, "skipped: compiled only at " + str(sorted(
            compile_sizes[loss])))
    if "triton" in impls:
        impls.update((name, (fn, None)) for name, fn in triton_variants(loss, n, c, d).items())
    impls["F.cross_entropy (pre-scaled)"] = (lambda z, w, y: F.cross_entropy(z, y), None)
    return impls


def expected_loss(loss: str, logits, weight, target) -> torch.Tensor:
    """float64 oracle: the reference where it fits, else the float64 torch closed form."""
    z = logits.detach().double()
    if loss == "logitnorm":
        return logitnorm_reference(z, target)
    w = weight.detach().double()
    if reference_bytes(logits.shape[1], w.shape[1]) * 2 < 0.3 * torch.cuda.mem_get_info()[0]:
        return elogitnorm_reference(z, w, target)
    return ef.elogitnorm_loss(z, w, target, backend="torch")


def runner(fn, sets, backward: bool, rotate: bool = True):
    """One call of ``fn`` (and its backward) per run."""
    cycle = itertools.cycle(sets if rotate else sets[:1])

    def run():
        z, w, y = next(cycle)
        loss = fn(z, w, y)
        if backward:
            torch.autograd.grad(loss, [t for t in (z, w) if t is not None], allow_unused=True)
        return loss

    return run


def time_ms(triton_testing, run, slow: bool, quick: bool) -> float:
    if slow:  # a few repeats only (the all-pairs reference at large C)
        run()
        times = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[1]
    return triton_testing.do_bench(run, warmup=10 if quick else 25, rep=40 if quick else 100,
                                   return_mode="median")


def graph_ms(fn, sets, backward: bool) -> float | str:
    """Milliseconds per call of ``fn`` (with its backward) replayed from one CUDA graph of
    ``GRAPH_CALLS`` calls: the device time without the host's launch cost.

    The leaves are fresh copies first used on a side stream. Autograd waits on the stream where
    a leaf's gradient accumulator was made, and a wait on the legacy default stream invalidates
    a capture: capturing with leaves first used there failed every forward+backward on an H100.
    """
    try:
        logits, weight, target = sets[0]
        z = logits.detach().clone().requires_grad_(True)
        w = None if weight is None else weight.detach().clone().requires_grad_(True)
        run = runner(fn, [(z, w, target)], backward)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # compiles and caches outside the capture
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                run()
        graph.replay()
        times = []
        for _ in range(GRAPH_REPLAYS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / GRAPH_CALLS)
        del graph
        return statistics.median(times)
    except Exception as error:  # not capturable (e.g. a host sync in a baseline)
        torch.cuda.synchronize()
        return f"not capturable: {type(error).__name__}: {str(error)[:120]}"


def peak_extra_mib(run) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def floor_bytes(loss: str, n: int, c: int, d: int, backward: bool) -> int:
    logits = n * c * 4
    weight = c * d * 4 if loss == "elogitnorm" else 0
    return logits * (2 if backward else 1) + weight * (2 if backward else 1)


def times_graph(loss: str, n: int, c: int, impl: str, eager_ms: float) -> bool:
    """Whether ``impl`` is also timed replayed from a CUDA graph: small sizes, host-bound in
    eager mode (not compiled ones, not the eager-only variants), and :data:`GRAPH_ALSO`."""
    if impl in GRAPH_ALSO.get((loss, n, c), ()):
        return True
    small = eager_ms < GRAPH_BELOW_MS or n * c <= GRAPH_BELOW_ELEMENTS
    return small and "compiled" not in impl and impl not in EAGER_ONLY


def bench_case(loss, n, c, d, args, triton_testing, bandwidth, deadline, compile_sizes):
    rows = []
    per_set = n * c * 4 * 2 + c * d * 4 * 2
    count = max(2, min(8, ROTATION_BYTES // max(per_set, 1)))
    if per_set * count > 0.25 * torch.cuda.mem_get_info()[0]:
        count = 2
    sets = make_sets(loss, n, c, d, count)
    expected = expected_loss(loss, *sets[0])
    for name, (fn, skip) in implementations(loss, n, c, d, compile_sizes).items():
        row = {"loss": loss, "N": n, "C": c, "D": d, "impl": name}
        rows.append(row)
        if skip is not None:
            row["status"] = skip
            continue
        if time.monotonic() > deadline:
            row["status"] = "skipped: time budget of the script spent"
            continue
        try:
            started = time.monotonic()
            value = fn(*sets[0])
            torch.cuda.synchronize()
            row["check_s"] = round(time.monotonic() - started, 2)
            if name.startswith("F.cross_entropy"):
                row["checked"] = "baseline (different loss)"
            else:
                error = abs(value.double().item() - expected.item()) / max(abs(expected.item()),
                                                                             1e-12)
                row["rel_error_vs_float64"] = error
                if not error < 1e-3:
                    row["status"] = f"WRONG: relative error {error:.2e}"
                    continue
            slow = name == "reference eager" and c >= 1000
            for label, backward in (("fwd", False), ("fwd_bwd", True)):
                run = runner(fn, sets, backward)
                ms = time_ms(triton_testing, run, slow, args.quick)
                row[f"{label}_ms"] = ms
                row[f"{label}_floor_fraction"] = floor_bytes(loss, n, c, d, backward) / bandwidth \
                    / (ms * 1e-3)
                if times_graph(loss, n, c, name, ms):
                    graph = row[f"{label}_graph_ms"] = graph_ms(fn, sets, backward)
                    if isinstance(graph, float):
                        row[f"{label}_graph_floor_fraction"] = floor_bytes(
                            loss, n, c, d, backward) / bandwidth / (graph * 1e-3)
            row["peak_extra_MiB_fwd_bwd"] = peak_extra_mib(runner(fn, sets, True))
            row["status"] = "ok"
        except torch.cuda.OutOfMemoryError:
            row["status"] = "OOM"
        except Exception as error:  # recorded, the matrix goes on
            row["status"] = f"error: {type(error).__name__}: {str(error)[:200]}"
        finally:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    del sets
    torch.cuda.empty_cache()
    return rows


#: Variants timed eager against the default ``triton`` (> 1: the default is faster): the label
#: of each ratio in the summary. The single block up to 32768 columns, the grouped check, the
#: in-kernel reduction and the one-program reduction were decided by these.
EAGER_RATIOS = {
    "triton streamed": "triton streamed / one block",
    "triton, a program per tile": "triton per-tile / grouped check",
    "triton host reduction": "triton host / kernel reduction",
    "triton, reduced in blocks": "triton blocks / one-program reduction",
    "triton, Python backward": "triton Python backward / C++ node",
    "triton, direct launch": "triton direct / JIT launch",
    "triton, counted in blocks": "triton kernel count / host count",
}
#: Variants not timed as a graph: a CUDA-graph capture turns two into the default (the C++
#: node is eager-only, and captured, the default already reduces LogitNorm in blocks), and the
#: direct launch changes only host work, which a replay does not repeat.
EAGER_ONLY = ("triton, Python backward", "triton, reduced in blocks", "triton, direct launch")
#: Variants timed replayed from a CUDA graph against the default: the fused kernel's rows per
#: program, tile and deferred sums, the fused threshold, the pooled dW's split of D, the
#: in-kernel reduction, the kernel's own count (its device time).
GRAPH_RATIOS = ("triton, fused rows of 4", "triton, fused tiles of 4096",
                "triton, summed per step", "triton, GEMM distances", "triton, dW unsplit",
                "triton host reduction", "triton, counted in blocks")


def summary(rows: list[dict]) -> dict:
    """The issue's performance targets, as measured ratios."""
    def ms(loss, n, c, impl, key="fwd_bwd_ms"):
        for row in rows:
            if (row["loss"], row["N"], row["C"], row["impl"]) == (loss, n, c, impl):
                return row.get(key)
        return None

    out = {}
    triton = ms("elogitnorm", 256, 1000, "triton")
    for base in ("reference eager", "reference compiled"):
        other = ms("elogitnorm", 256, 1000, base)
        if triton and other:
            out[f"elogitnorm imagenet-1k speedup vs {base}"] = other / triton
    # How much of the 100x target's budget a host-bound eager step of plain cross-entropy at
    # the same size already takes (> 1: even F.cross_entropy alone could not meet it here).
    reference_e = ms("elogitnorm", 256, 1000, "reference eager")
    ce = ms("elogitnorm", 256, 1000, "F.cross_entropy (pre-scaled)")
    if reference_e and ce:
        out["elogitnorm imagenet-1k cross_entropy eager / 100x budget"] = ce / (reference_e / 100)
    compiled, reference_c = (ms("elogitnorm", 256, 1000, name)
                             for name in ("triton compiled", "reference compiled"))
    if compiled and reference_c:
        out["elogitnorm imagenet-1k triton compiled speedup vs reference compiled"] = \
            reference_c / compiled
    # Device time (the host's launch cost left out): both replayed from a CUDA graph.
    triton_g = ms("elogitnorm", 256, 1000, "triton", "fwd_bwd_graph_ms")
    reference_g = ms("elogitnorm", 256, 1000, "reference eager", "fwd_bwd_graph_ms")
    if isinstance(triton_g, float) and isinstance(reference_g, float):
        out["elogitnorm imagenet-1k speedup vs reference eager (CUDA graph)"] = \
            reference_g / triton_g
    for row in rows:  # the target's fraction, and each variant's that could meet it instead
        if (row["loss"], row["N"], row["C"]) != ("logitnorm", 4096, 32768) or not (
                row["impl"] == "triton" or row["impl"] in EAGER_RATIOS):
            continue
        variant = row["impl"].removeprefix("triton").strip(" ,")
        which = f", {variant}" if variant else ""
        if "fwd_bwd_floor_fraction" in row:
            out[f"logitnorm 4096x32768 fwd_bwd floor fraction{which}"] = \
                row["fwd_bwd_floor_fraction"]
        if "fwd_bwd_graph_floor_fraction" in row:
            out[f"logitnorm 4096x32768 fwd_bwd floor fraction{which} (CUDA graph)"] = \
                row["fwd_bwd_graph_floor_fraction"]
    for row in rows:  # each variant against the default, the question it answers in its label
        size = f"{row['loss']} {row['N']}x{row['C']}"
        single = ms(row["loss"], row["N"], row["C"], "triton")
        label = EAGER_RATIOS.get(row["impl"])
        if label and row.get("fwd_bwd_ms") and single:
            out[f"{size} {label} (fwd+bwd)"] = row["fwd_bwd_ms"] / single
        if row["impl"] in GRAPH_RATIOS:
            default = ms(row["loss"], row["N"], row["C"], "triton", "fwd_bwd_graph_ms")
            if isinstance(default, float) and isinstance(row.get("fwd_bwd_graph_ms"), float):
                name = row["impl"].removeprefix("triton").strip(" ,")
                out[f"{size} triton {name} / default (CUDA graph, fwd+bwd)"] = \
                    row["fwd_bwd_graph_ms"] / default
    for loss in ("logitnorm", "elogitnorm"):
        for n, c in ((128, 10), (128, 100)):
            triton, ce = ms(loss, n, c, "triton"), ms(loss, n, c, "F.cross_entropy (pre-scaled)")
            if triton and ce:
                out[f"{loss} {n}x{c} triton / cross_entropy (eager)"] = triton / ce
            triton_g = ms(loss, n, c, "triton", "fwd_bwd_graph_ms")
            ce_g = ms(loss, n, c, "F.cross_entropy (pre-scaled)", "fwd_bwd_graph_ms")
            if isinstance(triton_g, float) and isinstance(ce_g, float):
                out[f"{loss} {n}x{c} triton / cross_entropy (CUDA graph)"] = triton_g / ce_g
    return out


def print_table(rows: list[dict]) -> None:
    print(f"{'loss':<10} {'N':>5} {'C':>6} {'impl':<30} {'fwd ms':>9} {'f+b ms':>9} "
          f"{'f+b floor':>9} {'graph ms':>9}  status")
    def fmt(row, key, spec=".4f"):
        value = row.get(key)
        return format(value, spec) if isinstance(value, float) else "-"

    for row in rows:
        print(f"{row['loss']:<10} {row['N']:>5} {row['C']:>6} {row['impl']:<30} "
              f"{fmt(row, 'fwd_ms'):>9} {fmt(row, 'fwd_bwd_ms'):>9} "
              f"{fmt(row, 'fwd_bwd_floor_fraction', '.2f'):>9} "
              f"{fmt(row, 'fwd_bwd_graph_ms'):>9}  {row.get('status', '')[:60]}")


def ordered_cases(cases: list[tuple[str, tuple[int, int, int]]]) -> list:
    """``cases`` with :data:`TARGETS_FIRST` first, in that order, then the rest as given."""
    def rank(case):
        loss, (n, c, _) = case
        key = (loss, n, c)
        return TARGETS_FIRST.index(key) if key in TARGETS_FIRST else len(TARGETS_FIRST)

    return sorted(cases, key=rank)  # stable: the rest keep their order


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop timing new cases after this many seconds "
                        "(default 200, 90 quick)")
    parser.add_argument("--sizes", default=None,
                        help="only these N x C, comma-separated (e.g. 128x10,128x100)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_losses: no CUDA device; nothing to time")
        return 0
    import triton
    import triton.testing as triton_testing

    budget = args.budget_s or (90.0 if args.quick else 200.0)
    deadline = time.monotonic() + budget
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    bandwidth = copy_bandwidth(triton_testing)
    result = {
        "card": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "backends": ef.available_backends("cuda"), "quick": args.quick,
        "copy_bandwidth_GBps": bandwidth / 1e9, "dtype": "float32", "tf32": False, "rows": [],
    }
    compile_sizes = QUICK_COMPILE_SIZES if args.quick else COMPILE_SIZES
    cases = [("elogitnorm", s) for s in (QUICK_ELOGITNORM if args.quick else ELOGITNORM_SIZES)]
    cases += [("logitnorm", s) for s in (QUICK_LOGITNORM if args.quick else LOGITNORM_SIZES)]
    if args.sizes:
        wanted = {tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")}
        cases = [(loss, size) for loss, size in cases if size[:2] in wanted]
    cases = ordered_cases(cases)
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are optional on the GPU machine
        def tqdm(items, **_):
            return items
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_losses.json")
    # Stopped by gpu_check.sh's time limit (SIGTERM), the cases timed until then are written.
    stop_on_sigterm()
    finished = False
    try:
        for loss, (n, c, d) in tqdm(cases, desc="gpu_losses", file=sys.stderr):
            result["rows"] += bench_case(loss, n, c, d, args, triton_testing, bandwidth,
                                         deadline, compile_sizes)
        finished = True
    finally:
        if not finished:
            result["unfinished"] = "stopped before every case was timed"
        result["summary"] = summary(result["rows"])
        with open(path, "w") as handle:
            json.dump(result, handle, indent=1, default=str)
    print(f"card: {result['card']}  torch {result['torch']}  triton {result['triton']}  "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print_table(result["rows"])
    for key, value in result["summary"].items():
        print(f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
