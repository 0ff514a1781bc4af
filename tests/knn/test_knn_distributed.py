"""Two gloo ranks on localhost, each holding half the bank, equal the single-process scorer."""

from __future__ import annotations

import textwrap

import torch

from elogitnorm_fast.knn import KNNScorer

from gloo_ranks import FINISH, run_ranks
from parity import knn_oracle_sorted

WORKER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    import torch.distributed as dist
    from elogitnorm_fast.knn import DistributedKNNScorer

    data_path, out_path = sys.argv[1], f"{sys.argv[2]}/{sys.argv[3]}.pt"
    dist.init_process_group("gloo", init_method="env://")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    data = torch.load(data_path)
    results = {}
    # shard=True: each rank passes its own uneven slice (rank 0 gets fewer rows than k); bank
    # chunks narrower than k make every early row a candidate, so the selection merges often
    cut = 30
    shard = data["bank"][:cut] if rank == 0 else data["bank"][cut:]
    scorer = DistributedKNNScorer(k=data["k"], squared=True, bank_chunk=16).fit(shard)
    results["score_shard"] = scorer.score(data["queries"])
    results["kneighbors_shard"] = scorer.kneighbors(data["queries"])
    # shard=False: every rank passes the full bank and keeps its half
    scorer = DistributedKNNScorer(k=data["k"], bank_chunk=64, backend="torch")
    results["score_split"] = scorer.fit(data["bank"], shard=False).score(data["queries"])
    # features that require grad (taken outside no_grad) and a numpy integer k
    scale = torch.ones(data["bank"].shape[1], requires_grad=True)
    for backend in ("auto", "torch"):
        scorer = DistributedKNNScorer(k=data["k"], squared=True, backend=backend)
        scorer.fit(shard * scale)
        results[f"score_grad_{backend}"] = scorer.score(data["queries"] * scale)
        results[f"kneighbors_k5_{backend}"] = scorer.kneighbors(data["queries"] * scale,
                                                                k=np.int64(5))
    try:
        DistributedKNNScorer(k=10_000).fit(shard)
    except ValueError as err:
        results["error"] = str(err)
    torch.save(results, out_path)
    """
) + FINISH


def test_two_gloo_ranks_equal_single_process(tmp_path):
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(403, 24, generator=g)
    queries = torch.randn(57, 24, generator=g)
    queries[:3] = bank[[0, 200, 402]]
    k = 40
    torch.save({"bank": bank, "queries": queries, "k": k}, tmp_path / "data.pt")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run_ranks(script, [str(tmp_path / "data.pt"), str(tmp_path)])

    single = KNNScorer(k=k, squared=True).fit(bank)
    expected_scores = single.score(queries)
    expected_distances, expected_indices = single.kneighbors(queries)
    unsquared = KNNScorer(k=k).fit(bank).score(queries)
    # independent check of the single-process reference too: float64 brute force
    d2 = knn_oracle_sorted(queries, bank).values[:, k - 1]
    torch.testing.assert_close(expected_scores.double(), -d2, rtol=1e-5, atol=2e-6)
    for r in range(2):
        got = torch.load(tmp_path / f"{r}.pt")
        # GEMM shapes differ per shard, so allow fp32 rounding; neighbours must be identical
        torch.testing.assert_close(got["score_shard"], expected_scores, rtol=1e-6, atol=1e-6)
        distances, indices = got["kneighbors_shard"]
        torch.testing.assert_close(distances, expected_distances, rtol=1e-6, atol=1e-6)
        assert torch.equal(indices, expected_indices)
        torch.testing.assert_close(got["score_split"], unsquared, rtol=1e-6, atol=1e-5)
        assert "over all ranks (403)" in got["error"]
        five_distances, five_indices = single.kneighbors(queries, k=5)
        for backend in ("auto", "torch"):
            scores = got[f"score_grad_{backend}"]
            assert not scores.requires_grad
            torch.testing.assert_close(scores, expected_scores, rtol=1e-6, atol=1e-6)
            distances, indices = got[f"kneighbors_k5_{backend}"]
            torch.testing.assert_close(distances, five_distances, rtol=1e-6, atol=1e-6)
            assert torch.equal(indices, five_indices)
