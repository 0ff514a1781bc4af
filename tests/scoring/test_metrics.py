"""Metrics against scikit-learn (the oracle) and an ECE loop written from the definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import auc, precision_recall_curve, roc_auc_score, roc_curve

from elogitnorm_fast import metrics

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _labels_scores(id_scores, ood_scores):
    s = torch.cat([id_scores.double(), ood_scores.double()]).numpy()
    y = np.r_[np.ones(id_scores.numel()), np.zeros(ood_scores.numel())]
    return y, s


def sk_auroc(i, o):
    y, s = _labels_scores(i, o)
    return roc_auc_score(y, s)


def sk_aupr_in(i, o):
    y, s = _labels_scores(i, o)
    p, r, _ = precision_recall_curve(y, s)
    return auc(r, p)


def sk_aupr_out(i, o):
    y, s = _labels_scores(i, o)
    p, r, _ = precision_recall_curve(1 - y, -s)
    return auc(r, p)


def sk_fpr_classical(i, o, rate=0.95):
    y, s = _labels_scores(i, o)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return fpr[np.argmax(tpr >= rate)]


def sk_fpr_openood(i, o, rate=0.95):
    # OpenOOD v1.5 evaluation code, verbatim in spirit: OOD positive, negated confidence.
    y, s = _labels_scores(i, o)
    fpr, tpr, _ = roc_curve(1 - y, -s)
    return fpr[np.argmax(tpr >= rate)]


def _check_all(i, o, tol=1e-12):
    assert metrics.auroc(i, o) == pytest.approx(sk_auroc(i, o), abs=tol)
    assert metrics.aupr_in(i, o) == pytest.approx(sk_aupr_in(i, o), abs=tol)
    assert metrics.aupr_out(i, o) == pytest.approx(sk_aupr_out(i, o), abs=tol)
    assert metrics.fpr_at_tpr(i, o) == pytest.approx(sk_fpr_classical(i, o), abs=tol)
    assert metrics.fpr_at_tpr(i, o, convention="openood") == pytest.approx(
        sk_fpr_openood(i, o), abs=tol
    )
    report = metrics.ood_report(i, o)
    assert report["auroc"] == pytest.approx(sk_auroc(i, o), abs=tol)
    assert report["aupr_in"] == pytest.approx(sk_aupr_in(i, o), abs=tol)
    assert report["aupr_out"] == pytest.approx(sk_aupr_out(i, o), abs=tol)
    assert report["fpr_at_tpr"] == pytest.approx(sk_fpr_classical(i, o), abs=tol)
    report_oo = metrics.ood_report(i, o, convention="openood")
    assert report_oo["fpr_at_tpr"] == pytest.approx(sk_fpr_openood(i, o), abs=tol)


@pytest.mark.parametrize("n_id,n_ood", [(1, 1), (7, 3), (500, 800), (2000, 1500)])
def test_continuous_scores_match_sklearn(n_id, n_ood):
    i = torch.randn(n_id, dtype=torch.float64) + 0.7
    o = torch.randn(n_ood, dtype=torch.float64)
    _check_all(i, o)


@pytest.mark.parametrize("levels", [2, 3, 10, 50])
def test_heavy_ties_match_sklearn(levels):
    i = torch.randint(0, levels, (3000,)).double()
    o = torch.randint(0, levels, (2500,)).double() - 0.5 * (levels > 2)
    o = o.round()
    _check_all(i, o)


def test_all_scores_tied():
    i = torch.ones(10)
    o = torch.ones(30)
    assert metrics.auroc(i, o) == 0.5
    _check_all(i, o)


def test_collinear_ties_openood_differs_from_exact_minimum():
    # Each distinct level holds one ID and one OOD sample: a straight diagonal ROC curve, where
    # sklearn's drop_intermediate removes every interior point.
    i = torch.arange(40, dtype=torch.float64)
    o = torch.arange(40, dtype=torch.float64)
    assert metrics.fpr_at_tpr(i, o, convention="openood") == pytest.approx(sk_fpr_openood(i, o))
    exact = metrics.fpr_at_tpr(i, o, convention="openood", drop_intermediate=False)
    assert exact == pytest.approx(38 / 40)
    assert metrics.fpr_at_tpr(i, o) == pytest.approx(sk_fpr_classical(i, o))


@pytest.mark.parametrize("one_id", [True, False])
def test_extreme_imbalance(one_id):
    big = torch.randn(100_000, dtype=torch.float64)
    small = torch.tensor([0.3], dtype=torch.float64)
    i, o = (small, big) if one_id else (big + 0.5, small)
    _check_all(i, o, tol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_match_sklearn_on_the_same_values(dtype):
    i = (torch.randn(3000) + 0.5).to(dtype)
    o = torch.randn(2000).to(dtype)
    _check_all(i, o)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_offset_1e6(dtype):
    i = (1e6 + torch.randn(2000, dtype=torch.float64) * 0.3 + 0.2).to(dtype)
    o = (1e6 + torch.randn(2000, dtype=torch.float64) * 0.3).to(dtype)
    _check_all(i, o)


def test_mixed_dtypes_promote():
    i = torch.randn(100).half()
    o = torch.randn(100, dtype=torch.float64)
    assert metrics.auroc(i, o) == pytest.approx(sk_auroc(i, o))


def test_integer_scores_accepted():
    i = torch.randint(0, 5, (200,))
    o = torch.randint(0, 4, (300,))
    assert metrics.auroc(i, o) == pytest.approx(sk_auroc(i, o))


def test_permutation_and_monotone_transform_invariance():
    i = torch.randn(1000, dtype=torch.float64) + 1
    o = torch.randn(1200, dtype=torch.float64)
    ref = metrics.ood_report(i, o)
    perm = metrics.ood_report(i[torch.randperm(1000)], o[torch.randperm(1200)])
    mono = metrics.ood_report(torch.exp(i) * 3 + 1, torch.exp(o) * 3 + 1)
    for key in ("auroc", "aupr_in", "aupr_out", "fpr_at_tpr"):
        assert perm[key] == ref[key]
        assert mono[key] == pytest.approx(ref[key], abs=1e-12)


def test_auroc_is_the_pairwise_probability():
    i = torch.randint(0, 6, (300,)).double()
    o = torch.randint(0, 6, (200,)).double()
    greater = (i[:, None] > o[None, :]).double().mean()
    equal = (i[:, None] == o[None, :]).double().mean()
    assert metrics.auroc(i, o) == pytest.approx(float(greater + 0.5 * equal), abs=1e-14)


def test_perfect_separation():
    i = torch.tensor([2.0, 3.0])
    o = torch.tensor([0.0, 1.0])
    assert metrics.auroc(i, o) == 1.0
    assert metrics.fpr_at_tpr(i, o) == 0.0
    assert metrics.aupr_in(i, o) == pytest.approx(1.0)
    assert metrics.auroc(o, i) == 0.0


@pytest.mark.parametrize("rate", [0.5, 0.8, 0.95, 0.99, 1.0])
def test_other_tpr_levels(rate):
    i = torch.randint(0, 30, (997,)).double()
    o = torch.randint(0, 25, (613,)).double()
    assert metrics.fpr_at_tpr(i, o, rate) == pytest.approx(sk_fpr_classical(i, o, rate))
    assert metrics.fpr_at_tpr(i, o, rate, "openood") == pytest.approx(sk_fpr_openood(i, o, rate))


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.tensor([0.1, float("nan")]), "NaN"),
        (torch.tensor([0.1, float("inf")]), "inf"),
        (torch.tensor([0.1, -float("inf")]), "inf"),
        (torch.tensor([]), "empty"),
    ],
)
@pytest.mark.parametrize("side", ["id", "ood"])
def test_invalid_scores_raise(bad, match, side):
    good = torch.randn(10)
    args = (bad, good) if side == "id" else (good, bad)
    for fn in (
        metrics.auroc,
        metrics.aupr_in,
        metrics.aupr_out,
        metrics.fpr_at_tpr,
        metrics.ood_report,
    ):
        with pytest.raises(ValueError, match=match) as info:
            fn(*args)
        assert f"{side}_scores" in str(info.value)


def test_invalid_options_raise():
    i, o = torch.randn(5), torch.randn(5)
    with pytest.raises(ValueError, match="convention"):
        metrics.fpr_at_tpr(i, o, convention="other")
    with pytest.raises(ValueError, match="tpr"):
        metrics.fpr_at_tpr(i, o, tpr=0.0)
    with pytest.raises(ValueError, match="tpr"):
        metrics.fpr_at_tpr(i, o, tpr=1.5)
    with pytest.raises(ValueError, match="dtype"):
        metrics.auroc(torch.ones(3, dtype=torch.bool), o)


# ---------------------------------------------------------------------------------------------
# ECE
# ---------------------------------------------------------------------------------------------


def ece_loop(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Guo et al.'s definition, one bin at a time, in float64."""
    probs = torch.softmax(logits.double(), dim=1)
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    total = 0.0
    for b in range(n_bins):
        lower, upper = float(edges[b]), float(edges[b + 1])
        in_bin = (conf > lower) & (conf <= upper)
        if b == 0:
            in_bin |= conf == 0
        if in_bin.any():
            weight = float(in_bin.double().mean())
            total += weight * abs(float(correct[in_bin].mean()) - float(conf[in_bin].mean()))
    return total


@pytest.mark.parametrize("n,c", [(1, 2), (100, 10), (5000, 100), (333, 7)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ece_matches_loop(n, c, dtype):
    logits = (torch.randn(n, c) * 3).to(dtype)
    labels = torch.randint(0, c, (n,))
    assert metrics.ece(logits, labels) == pytest.approx(ece_loop(logits, labels), abs=1e-12)


@pytest.mark.parametrize("n_bins", [1, 10, 20])
def test_ece_other_bin_counts_and_chunking(n_bins):
    logits = torch.randn(1000, 10) * 2
    labels = torch.randint(0, 10, (1000,))
    expected = ece_loop(logits, labels, n_bins)
    assert metrics.ece(logits, labels, n_bins) == pytest.approx(expected, abs=1e-12)
    assert metrics.ece(logits, labels, n_bins, chunk_rows=37) == pytest.approx(expected, abs=1e-12)


def test_ece_perfectly_calibrated_confident():
    logits = torch.zeros(4, 3)
    logits[torch.arange(4), torch.tensor([0, 1, 2, 0])] = 100.0
    assert metrics.ece(logits, torch.tensor([0, 1, 2, 0])) == pytest.approx(0.0, abs=1e-12)


def test_ece_errors():
    with pytest.raises(ValueError, match="2-D"):
        metrics.ece(torch.randn(5), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="one entry per row"):
        metrics.ece(torch.randn(5, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        metrics.ece(torch.full((2, 3), float("nan")), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        metrics.ece(torch.randn(0, 3), torch.zeros(0, dtype=torch.long))


@pytest.mark.gpu
def test_metrics_on_gpu_match_sklearn():
    i = torch.randint(0, 20, (10_000,)).float()
    o = torch.randint(0, 15, (7_000,)).float()
    gpu = metrics.ood_report(i.cuda(), o.cuda())
    assert gpu["auroc"] == pytest.approx(sk_auroc(i, o), abs=1e-12)
    assert gpu["aupr_in"] == pytest.approx(sk_aupr_in(i, o), abs=1e-12)
    assert gpu["aupr_out"] == pytest.approx(sk_aupr_out(i, o), abs=1e-12)
    assert gpu["fpr_at_tpr"] == pytest.approx(sk_fpr_classical(i, o), abs=1e-12)
    logits = torch.randn(1000, 10)
    labels = torch.randint(0, 10, (1000,))
    assert metrics.ece(logits.cuda(), labels.cuda()) == pytest.approx(
        metrics.ece(logits, labels), abs=1e-12
    )


def test_signed_zero_ties_and_negative_scores():
    i = torch.tensor([-0.0, -1.5, 2.0, -3e-39])
    o = torch.tensor([0.0, -1.5, -2.0, 3e-39])
    _check_all(i, o)
    _check_all(i.double(), o.double())
