"""Peak extra memory of one loss forward+backward, measured in a fresh process.

CPU: the resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` right
before the call) minus the resident set before it. CUDA: ``torch.cuda.max_memory_allocated``
minus the memory allocated before the call. The inputs exist before the measurement starts, so
the figure is the loss's own working memory (its outputs and gradients included); one
untimed call of the same shapes runs first, so one-time library loads are not counted, and
blocks of 64 KiB and more are unmapped on free (a fixed glibc mmap threshold), so what the
warm-up freed cannot hide the measured peak; smaller blocks may not register at all.

Run as ``python benchmarks/peak_memory.py --loss elogitnorm --backend torch --n 256 --c 1000
--d 512``; it prints one JSON object. :func:`measure` wraps that in a subprocess, with an optional
address-space cap so that an all-pairs reference that would exhaust the machine fails as "OOM".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def rss_bytes() -> int:
    """This process's resident set now."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> bool:
    """Reset the resident-set high-water mark; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int:
    """The resident-set high-water mark since the last :func:`reset_peak`."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_cpu_call(call) -> tuple[int, float]:
    """``(peak extra bytes, seconds)`` of ``call()`` on the CPU; -1 bytes where the peak cannot
    be reset."""
    before = rss_bytes()
    exact = reset_peak()
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    return (max(0, peak_bytes() - before) if exact else -1), seconds


def run_isolated(command: list[str], record: dict, *, memory_cap_bytes: int | None,
                 timeout_s: float) -> dict:
    """Run ``command`` (which prints one JSON object last) in a fresh process; returns
    ``record`` with ``status`` (``"ok"``, ``"OOM"``: past the address-space cap or killed,
    ``"timeout"``) and the printed fields."""

    def cap() -> None:  # runs in the child before exec
        if memory_cap_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_cap_bytes, memory_cap_bytes))

    # A fixed glibc mmap threshold: blocks of 64 KiB and more are mapped and unmapped on free,
    # so memory freed by the warm-up call does not hide the measured call's peak (the default
    # threshold grows after frees, and freed heap memory stays resident).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                              preexec_fn=cap, env=env)
    except subprocess.TimeoutExpired:
        return {**record, "status": "timeout", "limit_s": timeout_s}
    if done.returncode != 0:
        text = done.stderr.lower()
        if done.returncode < 0 or any(s in text for s in ("out of memory", "memoryerror",
                                                          "can't allocate")):
            return {**record, "status": "OOM", "cap_bytes": memory_cap_bytes}
        raise RuntimeError(f"isolated run failed: {' '.join(command)}\n{done.stderr[-2000:]}")
    return {**record, "status": "ok", **json.loads(done.stdout.strip().splitlines()[-1])}


def cpu_name() -> str:
    """The CPU's model name (Linux), else the architecture."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict:
    """Date, commit, versions and the machine, for a results file."""
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).resolve().parent).stdout.strip()
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": commit,
            "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads(), "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _run(args: argparse.Namespace) -> dict:
    import torch

    import elogitnorm_fast as ef

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)

    def inputs(n: int, c: int, d: int):
        logits = torch.randn(n, c, device=device, dtype=dtype, requires_grad=True)
        weight = torch.randn(c, d, device=device, dtype=torch.float32, requires_grad=True)
        target = torch.randint(0, c, (n,), device=device)
        return logits, weight, target

    def step(logits, weight, target):
        if args.loss == "elogitnorm":
            loss = ef.elogitnorm_loss(logits, weight, target, backend=args.backend)
            loss.backward()
        else:
            ef.logitnorm_loss(logits, target, backend=args.backend).backward()

    logits, weight, target = inputs(args.n, args.c, args.d)
    # One untimed call of the same shapes first: code pages, thread pools and BLAS buffers
    # loaded on first use would otherwise count as the loss's memory.
    step(logits, weight, target)
    logits.grad = weight.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        step(logits, weight, target)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        extra = torch.cuda.max_memory_allocated() - before
    else:
        extra, seconds = measure_cpu_call(lambda: step(logits, weight, target))
    return {"peak_extra_bytes": extra, "seconds_first_call": seconds}


def measure(
    loss: str,
    backend: str,
    n: int,
    c: int,
    d: int,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    memory_cap_bytes: int | None = None,
    timeout_s: float = 600.0,
) -> dict:
    """Measure one configuration in a fresh interpreter; returns a dict with ``status``.

    ``status`` is ``"ok"``, ``"OOM"`` (the process ran out of its memory cap or was killed) or
    ``"timeout"``.
    """
    command = [
        sys.executable, str(Path(__file__).resolve()), "--loss", loss, "--backend", backend,
        "--n", str(n), "--c", str(c), "--d", str(d), "--device", device, "--dtype", dtype,
    ]

    record = {"loss": loss, "backend": backend, "n": n, "c": c, "d": d, "device": device,
              "dtype": dtype}
    return run_isolated(command, record, memory_cap_bytes=memory_cap_bytes, timeout_s=timeout_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--loss", choices=("elogitnorm", "logitnorm"), default="elogitnorm")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--c", type=int, default=1000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    print(json.dumps(_run(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
