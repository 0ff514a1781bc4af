"""CPU benchmarks for the scorers and metrics (pytest-benchmark).

Run: ``pytest benchmarks/bench_scoring.py --benchmark-json benchmarks/results/scoring_cpu.json``

* ``logit_scores`` computing MSP, MaxLogit, Energy and entropy together, per backend, against the
  four separate plain-PyTorch computations (target: >= 2x at N = 10^6, C = 1000).
* ``auroc`` + ``fpr_at_tpr`` against scikit-learn's ``roc_auc_score`` + ``roc_curve`` (target:
  >= 3x at 10^7 scores, same values; checked before timing).

Sizes: ``ELOGITNORM_BENCH_ROWS`` (default 1_000_000; the logits take 4 GB) and
``ELOGITNORM_BENCH_SCORES`` (comma list, default "1000000,10000000").
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

import elogitnorm_fast as ef
from elogitnorm_fast import metrics
from elogitnorm_fast.scoring import logit_scores

ROWS = int(os.environ.get("ELOGITNORM_BENCH_ROWS", "1000000"))
CLASSES = 1000
SCORE_SIZES = [
    int(n) for n in os.environ.get("ELOGITNORM_BENCH_SCORES", "1000000,10000000").split(",")
]
FOUR = ("msp", "max_logit", "energy", "entropy")
#: The package returns msp as log-odds and entropy as -log H (rank-exact forms); these map them
#: back to the probabilities a hand-written baseline computes, for the parity check.
TEXTBOOK = {"msp": torch.sigmoid, "entropy": lambda value: -torch.exp(-value)}


@pytest.fixture(scope="module")
def logits():
    torch.manual_seed(0)
    return torch.randn(ROWS, CLASSES) * 3


def four_separate_torch(z):
    """What a user writes by hand: four independent torch computations."""
    msp = torch.softmax(z, dim=1).max(dim=1).values
    max_logit = z.max(dim=1).values
    energy = torch.logsumexp(z, dim=1)
    log_p = torch.log_softmax(z, dim=1)
    entropy = (log_p.exp() * log_p).sum(dim=1)
    return msp, max_logit, energy, entropy


def _backends():
    return ef.available_backends("cpu", op="logit_scores")


@pytest.mark.benchmark(group=f"logit_scores N={ROWS} C={CLASSES}")
def test_four_separate_torch(benchmark, logits):
    benchmark.pedantic(four_separate_torch, args=(logits,), rounds=3, warmup_rounds=1)


@pytest.mark.benchmark(group=f"logit_scores N={ROWS} C={CLASSES}")
@pytest.mark.parametrize("backend", _backends())
def test_logit_scores_one_pass(benchmark, logits, backend):
    head = logits[:1000]
    got = logit_scores(head, FOUR, backend=backend)
    for name, expected in zip(FOUR, four_separate_torch(head), strict=True):
        value = TEXTBOOK.get(name, lambda v: v)(got[name])
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-4)
    benchmark.extra_info["backend"] = backend
    benchmark.pedantic(
        logit_scores, args=(logits, FOUR), kwargs={"backend": backend}, rounds=3, warmup_rounds=1
    )


def _scores(n):
    g = torch.Generator().manual_seed(1)
    i = torch.randn(n // 2, generator=g) + 1.0
    o = torch.randn(n - n // 2, generator=g)
    return i, o


def sklearn_auroc_fpr(y, s):
    auroc = roc_auc_score(y, s)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return auroc, fpr[np.argmax(tpr >= 0.95)]


def ours_auroc_fpr(i, o):
    return metrics.auroc(i, o), metrics.fpr_at_tpr(i, o)


@pytest.mark.parametrize("n", SCORE_SIZES)
def test_metrics_sklearn(benchmark, n):
    i, o = _scores(n)
    benchmark.group = f"auroc+fpr_at_tpr n={n}"
    y = np.r_[np.ones(i.numel()), np.zeros(o.numel())]
    s = torch.cat([i, o]).numpy()
    benchmark.pedantic(sklearn_auroc_fpr, args=(y, s), rounds=3, warmup_rounds=0)


@pytest.mark.parametrize("n", SCORE_SIZES)
def test_metrics_ours(benchmark, n):
    i, o = _scores(n)
    benchmark.group = f"auroc+fpr_at_tpr n={n}"
    if n <= 2_000_000:  # same values as sklearn (checked before timing)
        y = np.r_[np.ones(i.numel()), np.zeros(o.numel())]
        expected = sklearn_auroc_fpr(y, torch.cat([i, o]).double().numpy())
        got = ours_auroc_fpr(i, o)
        assert got[0] == pytest.approx(expected[0], abs=1e-12)
        assert got[1] == pytest.approx(expected[1], abs=1e-12)
    benchmark.pedantic(ours_auroc_fpr, args=(i, o), rounds=3, warmup_rounds=1)
