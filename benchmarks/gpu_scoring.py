"""GPU benchmark of the logit scorers and metrics (one JSON under --out, ~30 s on an H100).

* ``logit_scores`` (MSP, MaxLogit, Energy, entropy together) with the Triton kernel vs the four
  separate plain-PyTorch computations, fp32 / fp16 / bf16 at N = 10^6, C = 1000 (--quick: 2e5),
  with the fraction of the memory-bandwidth floor (logits read once, over the measured copy
  bandwidth); GEN's second path timed separately.
* ``auroc`` + ``fpr_at_tpr`` on 10^7 scores on the GPU.
Results are checked against the torch formulas before being timed.

Usage: ``python benchmarks/gpu_scoring.py --out DIR [--quick]``
"""

from __future__ import annotations

import time

import torch

from _gpu_common import begin, write_rows

FOUR = ("msp", "max_logit", "energy", "entropy")
#: The package returns msp as log-odds and entropy as -log H (rank-exact forms); these map them
#: back to the probabilities a hand-written baseline computes, for the parity check.
TEXTBOOK = {"msp": torch.sigmoid, "entropy": lambda value: -torch.exp(-value)}


def four_separate_torch(z):
    msp = torch.softmax(z, dim=1, dtype=torch.float32).max(dim=1).values
    max_logit = z.max(dim=1).values
    energy = torch.logsumexp(z.float(), dim=1)
    log_p = torch.log_softmax(z, dim=1, dtype=torch.float32)
    entropy = (log_p.exp() * log_p).sum(dim=1)
    return msp, max_logit, energy, entropy


def main() -> None:
    started = begin("gpu_scoring", __doc__, skip_key="op")
    if started is None:
        return
    args, path, machine = started
    rows: list[dict] = []

    import triton
    from triton.testing import do_bench

    from elogitnorm_fast import metrics
    from elogitnorm_fast.scoring import logit_scores

    machine["triton"] = triton.__version__
    n_rows = 200_000 if args.quick else 1_000_000
    n_cols = 1000

    def copy_bandwidth() -> tuple[float, float]:
        buffer = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
        ms = do_bench(lambda: buffer.clone())
        return 2 * buffer.numel() / (ms * 1e-3), ms  # bytes/s, read + write

    bandwidth, copy_ms = copy_bandwidth()
    rows.append({"op": "copy", "gbps": bandwidth / 1e9, "ms": copy_ms})

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        torch.manual_seed(0)
        z = (torch.randn(n_rows, n_cols, device="cuda") * 3).to(dtype)
        got = logit_scores(z, FOUR + ("gen",), backend="triton")
        for name, expected in zip(FOUR, four_separate_torch(z), strict=True):
            value = TEXTBOOK.get(name, lambda v: v)(got[name])
            torch.testing.assert_close(value, expected.float(), rtol=1e-4, atol=1e-4)
        size = f"{n_rows}x{n_cols} {str(dtype).split('.')[-1]}"
        floor_ms = z.numel() * z.element_size() / bandwidth * 1e3
        t_sep = do_bench(lambda z=z: four_separate_torch(z))
        t_one = do_bench(lambda z=z: logit_scores(z, FOUR, backend="triton"))
        t_torch = do_bench(lambda z=z: logit_scores(z, FOUR, backend="torch"))
        t_gen = do_bench(lambda z=z: logit_scores(z, ("gen",), backend="triton"))
        rows += [
            {
                "op": "logit_scores(4)",
                "backend": "four separate torch",
                "size": size,
                "ms": t_sep,
                "fraction_of_floor": floor_ms / t_sep,
            },
            {
                "op": "logit_scores(4)",
                "backend": "triton",
                "size": size,
                "ms": t_one,
                "speedup": t_sep / t_one,
                "fraction_of_floor": floor_ms / t_one,
            },
            {
                "op": "logit_scores(4)",
                "backend": "torch (chunked)",
                "size": size,
                "ms": t_torch,
                "speedup": t_sep / t_torch,
                "fraction_of_floor": floor_ms / t_torch,
            },
            {
                "op": "gen",
                "backend": "triton stats + topk path",
                "size": size,
                "ms": t_gen,
                "fraction_of_floor": floor_ms / t_gen,
            },
        ]
        del z, got

    n_scores = 1_000_000 if args.quick else 10_000_000
    i = torch.randn(n_scores // 2, device="cuda") + 1
    o = torch.randn(n_scores - n_scores // 2, device="cuda")
    start = time.perf_counter()
    metrics.auroc(i, o)
    metrics.fpr_at_tpr(i, o)
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    t_metrics = do_bench(lambda: (metrics.auroc(i, o), metrics.fpr_at_tpr(i, o)))
    rows.append(
        {
            "op": "auroc+fpr_at_tpr",
            "backend": "torch cuda",
            "n": n_scores,
            "ms": t_metrics,
            "first_call_ms": first * 1e3,
        }
    )
    write_rows(path, machine, rows)
    for row in rows:
        print(row)
    print("wrote", path)


if __name__ == "__main__":
    main()
