"""GPU benchmark of linear layer + loss, fwd+bwd: the fused linear losses against the unfused
paths and Liger-Kernel's fused linear cross-entropy (one JSON under --out).

Size: N = 8192, C = 256,000, D = 1024, bf16 features, weight and bias (--quick: N = 2048,
C = 64,000, D = 512). Each variant is one training step of the head (loss, then the gradients of
features, weight and bias); its row holds the median time (``triton.testing.do_bench``) and the
peak memory above what the inputs hold (``torch.cuda.max_memory_allocated``). A variant that runs
out of memory is recorded as ``OOM``; Liger-Kernel, when not installed, as ``not installed``.
Not in ``gpu_check.sh``'s default list: ``GPU_CHECK_BENCHES="linear"`` runs it.

Usage: ``python benchmarks/gpu_linear.py --out DIR [--quick]``
"""

from __future__ import annotations

import torch
from linear_variants import loss_function

from _gpu_common import begin, stop_on_sigterm, write_rows

#: (name, backend): what each row times.
VARIANTS = (
    ("fused_elogitnorm", "triton"), ("fused_elogitnorm", "cuda"), ("fused_elogitnorm", "torch"),
    ("fused_logitnorm", "triton"), ("unfused_elogitnorm", "triton"),
    ("unfused_logitnorm", "triton"), ("unfused_cross_entropy", "-"),
    ("liger_fused_linear_cross_entropy", "-"),
)
SIZES = {"full": (8192, 256_000, 1024), "quick": (2048, 64_000, 512)}


def make_inputs(n: int, c: int, d: int, device: str, dtype: torch.dtype):
    generator = torch.Generator(device=device).manual_seed(0)
    features = torch.randn(n, d, device=device, generator=generator).to(dtype)
    weight = (torch.randn(c, d, device=device, generator=generator) / d**0.5).to(dtype)
    bias = torch.zeros(c, device=device, dtype=dtype)
    target = torch.randint(0, c, (n,), device=device, generator=generator)
    return [t.requires_grad_(True) for t in (features, weight, bias)] + [target]


def training_step(loss, features, weight, bias, target):
    """One fwd+bwd: the loss and the gradients of the three inputs."""
    value = loss(features, weight, bias, target)
    return value, torch.autograd.grad(value, (features, weight, bias))


def measure(name: str, backend: str, inputs: list, do_bench) -> dict:
    """The row of one variant: median ms and peak extra MiB, or why it has none."""
    row = {"variant": name, "backend": backend}
    try:
        loss = loss_function(name, backend)
    except ImportError:
        return {**row, "status": "not installed"}
    try:
        training_step(loss, *inputs)  # compiles the kernels
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        training_step(loss, *inputs)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        ms = do_bench(lambda: training_step(loss, *inputs), return_mode="median")
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {**row, "status": "OOM"}
    except Exception as error:  # a variant that fails still leaves the others' rows
        return {**row, "status": f"error: {type(error).__name__}: {error}"[:300]}
    return {**row, "status": "ok", "median_ms": ms, "peak_extra_MiB_fwd_bwd": peak / 2**20}


def main() -> None:
    started = begin("gpu_linear", __doc__, skip_key="variant")
    if started is None:
        return
    args, path, machine = started
    stop_on_sigterm()
    from triton.testing import do_bench

    n, c, d = SIZES["quick" if args.quick else "full"]
    machine.update(n=n, c=c, d=d, dtype="bfloat16")
    inputs = make_inputs(n, c, d, "cuda", torch.bfloat16)
    rows: list[dict] = []
    try:
        for name, backend in VARIANTS:
            rows.append(measure(name, backend, inputs, do_bench))
            print(rows[-1], flush=True)
    finally:
        write_rows(path, machine, rows)
        print("wrote", path)


if __name__ == "__main__":
    main()
