"""GPU benchmark of the exact KNN scorer (ImageNet bank: 1,281,167 x 2048, k = 1000, 10,000
queries; ``--quick``: a 262,144-row bank). Under ~90 s on an H100.

Reports per configuration the median time of ``KNNScorer.score`` (CUDA events, inputs rotated,
result checked first against a float64 brute force on a query subset), the GEMM rate it reaches
(2 * queries * bank * dim flop over the time) and its fraction of the measured fp32 ``torch.mm``
rate (TF32 off). Configurations: fp32 with bank chunks 16k / 32k / 64k, and the opt-ins TF32 and
fp16 bank storage (with their max error of the squared k-th distance against fp32).

Usage: ``python benchmarks/gpu_knn.py --out DIR [--quick]``
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from _gpu_common import begin, write_rows


def fp64_kth_squared(bank, queries, k, chunk=131072):
    """Float64 brute force: the k-th smallest squared distance of each query (bank chunks)."""
    q = queries.double()
    best = None
    for start in range(0, bank.shape[0], chunk):
        d2 = torch.cdist(q, bank[start:start + chunk].double()).pow(2)
        cand = d2 if best is None else torch.cat((best, d2), dim=1)
        best = torch.topk(cand, min(k, cand.shape[1]), dim=1, largest=False).values
    return best.max(dim=1).values


def fp32_mm_tflops(dim, do_bench):
    """Measured fp32 (TF32 off) torch.mm rate at a shape like the scorer's blocks."""
    a = torch.randn(16384, dim, device="cuda")
    b = torch.randn(dim, 32768, device="cuda")
    ms = do_bench(lambda: torch.mm(a, b), warmup=50, rep=300)
    return 2 * 16384 * 32768 * dim / ms / 1e9


def median_ms(fn, inputs, reps):
    times = []  # the caller has already run fn once (the correctness check) as a warm-up
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn(inputs[i % len(inputs)])
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    started = begin("gpu_knn", __doc__, skip_key="config")
    if started is None:
        return
    args, path, machine = started
    rows: list[dict] = []

    from triton.testing import do_bench

    from elogitnorm_fast.knn import KNNScorer

    t_begin = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = False
    num_bank = 262_144 if args.quick else 1_281_167
    num_queries, dim, k = 10_000, 2048, 1000
    gflop = 2 * num_queries * num_bank * dim / 1e9

    mm_tflops = fp32_mm_tflops(dim, do_bench)
    machine["fp32_mm_tflops"] = mm_tflops

    g = torch.Generator(device="cuda").manual_seed(0)
    bank = torch.randn(num_bank, dim, device="cuda", generator=g)
    queries = [torch.randn(num_queries, dim, device="cuda", generator=g) for _ in range(2)]
    check_rows = torch.arange(0, num_queries, num_queries // 64, device="cuda")[:64]
    expected = fp64_kth_squared(F.normalize(bank, dim=1), F.normalize(queries[0][check_rows],
                                                                       dim=1), k)

    configs = [
        ("fp32 chunk=32k", dict(bank_chunk=32768)),
        ("fp32 chunk=16k", dict(bank_chunk=16384)),
        ("fp32 chunk=64k", dict(bank_chunk=65536)),
        ("tf32 chunk=32k", dict(bank_chunk=32768, allow_tf32=True)),
        ("fp16 bank chunk=32k", dict(bank_chunk=32768, bank_dtype=torch.float16)),
    ]
    reference_scores = None
    for name, options in configs:
        if time.perf_counter() - t_begin > 75:
            rows.append({"config": name, "status": "skipped: time budget"})
            continue
        row: dict = {"config": name, "bank": num_bank, "queries": num_queries, "dim": dim, "k": k}
        try:
            scorer = KNNScorer(k=k, squared=True, device="cuda", progress=False, **options)
            scorer.fit(bank)
            scores = scorer.score(queries[0])
            err = (-scores[check_rows].double() - expected).abs().max().item()
            row["max_abs_err_d2_vs_fp64"] = err
            if reference_scores is None:
                reference_scores = scores
            row["max_abs_diff_d2_vs_fp32"] = (scores - reference_scores).abs().max().item()
            exact = "tf32" not in name and "fp16" not in name
            row["check"] = "ok" if (err < 1e-4 if exact else err < 1e-2) else "FAILED"
            ms = median_ms(scorer.score, queries, reps=3)
            row.update(ms=ms, tflops=gflop / ms, fraction_of_fp32_mm=gflop / ms / mm_tflops)
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
            del scorer
        except torch.cuda.OutOfMemoryError as exc:
            row["status"] = f"OOM: {str(exc)[:80]}"
        torch.cuda.empty_cache()
        rows.append(row)

    # lower bound: the same blocked GEMMs with no selection at all
    unit_bank = F.normalize(bank, dim=1)
    buffer = torch.empty(num_queries, 32768, device="cuda")

    def gemm_only(q):
        for start in range(0, num_bank, 32768):
            rows_t = unit_bank[start:start + 32768].t()
            torch.mm(q, rows_t, out=buffer[:, : rows_t.shape[1]])

    gemm_only(queries[0])
    ms = median_ms(gemm_only, queries, reps=3)
    rows.append({"config": "GEMM only, no select", "ms": ms, "tflops": gflop / ms,
                 "fraction_of_fp32_mm": gflop / ms / mm_tflops, "max_abs_err_d2_vs_fp64": 0.0,
                 "check": "(bound)"})

    write_rows(path, machine, rows)
    print(f"KNN on {machine['gpu']}: bank {num_bank} x {dim}, {num_queries} queries, k={k}; "
          f"fp32 mm {mm_tflops:.1f} TFLOP/s")
    print(f"{'config':<22}{'ms':>10}{'TFLOP/s':>10}{'of mm':>8}{'err d2':>10}  check")
    for r in rows:
        if "ms" not in r:
            print(f"{r['config']:<22}  {r.get('status', r.get('check'))}")
            continue
        print(f"{r['config']:<22}{r['ms']:>10.1f}{r['tflops']:>10.1f}"
              f"{r['fraction_of_fp32_mm']:>8.0%}{r['max_abs_err_d2_vs_fp64']:>10.1e}  {r['check']}")
    print(f"wrote {path} ({time.perf_counter() - t_begin:.0f} s)")


if __name__ == "__main__":
    main()
