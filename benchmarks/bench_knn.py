"""CPU benchmark of the exact KNN scorer against faiss-cpu IndexFlatL2 and chunked mm + topk.

Sizes: bank 50,000 x 512, 10,000 queries, k = 50 and 200 (the CIFAR setting). Set
``KNN_BENCH_SCALE=0.1`` to shrink bank and queries for a quick run, ``KNN_BENCH_KERNELS=auto``
to time only the fastest native kernel. faiss is optional.

Run: ``.venv/bin/python -m pytest benchmarks/bench_knn.py --benchmark-json
benchmarks/results/knn_cpu.json``
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from elogitnorm_fast.knn import KNNScorer, selection

SCALE = float(os.environ.get("KNN_BENCH_SCALE", "1"))
#: native similarity kernels timed: "auto" (the register-tiled kernel this CPU runs, avx512 /
#: avx2) and "blas" (MKL tiles + scan)
KERNELS = os.environ.get("KNN_BENCH_KERNELS", "auto,blas").split(",")
BANK, QUERIES, DIM = int(50_000 * SCALE), int(10_000 * SCALE), 512


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(BANK, DIM, generator=g), dim=1)
    queries = F.normalize(torch.randn(QUERIES, DIM, generator=g), dim=1)
    return bank, queries


def chunked_mm_topk(bank, queries, k, chunk=1024):
    """The baseline a user writes by hand: all bank columns per query chunk, then topk."""
    out = []
    for start in range(0, queries.shape[0], chunk):
        d2 = 2.0 - 2.0 * (queries[start:start + chunk] @ bank.t())
        out.append(torch.topk(d2, k, dim=1, largest=False).values[:, -1])
    return torch.cat(out).clamp_min(0.0)


def faiss_kth(bank, queries, k):
    faiss = pytest.importorskip("faiss")
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank.numpy())
    distances, _ = index.search(queries.numpy(), k)
    return torch.from_numpy(distances[:, -1])


def _record(benchmark, k, impl):
    benchmark.extra_info.update(
        bank=BANK, queries=QUERIES, dim=DIM, k=k, impl=impl, threads=torch.get_num_threads(),
        torch=torch.__version__, gflop=2 * BANK * QUERIES * DIM / 1e9,
    )
    benchmark.group = f"knn bank={BANK} queries={QUERIES} k={k}"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("k", [50, 200])
def test_knn_scorer(benchmark, data, k, kernel):
    bank, queries = data
    scorer = KNNScorer(k=k, squared=True, cpu_kernel=kernel).fit(bank)
    expected = chunked_mm_topk(bank, queries[:500], k)  # independent check before timing
    torch.testing.assert_close(-scorer.score(queries[:500]), expected, rtol=1e-5, atol=2e-6)
    native = scorer._use_native()
    if native and kernel == "auto":
        kernel = selection.native_kernels()[0]
    _record(benchmark, k, f"KNNScorer({kernel})" if native else "KNNScorer(torch)")
    benchmark.pedantic(scorer.score, args=(queries,), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("k", [50, 200])
def test_faiss_indexflatl2(benchmark, data, k):
    bank, queries = data
    kth = faiss_kth(bank, queries[:500], k)
    ours = -KNNScorer(k=k, squared=True).fit(bank).score(queries[:500])
    torch.testing.assert_close(ours, kth, rtol=1e-5, atol=2e-6)  # same k-th distances
    _record(benchmark, k, "faiss IndexFlatL2")
    benchmark.pedantic(faiss_kth, args=(bank, queries, k), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("k", [50, 200])
def test_chunked_mm_topk(benchmark, data, k):
    bank, queries = data
    _record(benchmark, k, "chunked mm + topk")
    benchmark.pedantic(chunked_mm_topk, args=(bank, queries, k), rounds=3, warmup_rounds=1)
