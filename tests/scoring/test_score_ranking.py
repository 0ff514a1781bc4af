"""Bounded logit scores keep the exact ranking where float32 probabilities saturate, and every
backend gives the documented values on infinite / NaN rows (mpmath oracle, sklearn metrics)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from exact_scores import NAMES, exact_scores
from sklearn.metrics import auc, precision_recall_curve, roc_auc_score, roc_curve

import elogitnorm_fast as ef
from elogitnorm_fast import metrics
from elogitnorm_fast.scoring import energy, entropy_score, gen, logit_scores, max_logit, msp

BACKENDS = [
    "torch",
    pytest.param("cpu", marks=pytest.mark.skipif(
        ef.unavailable_reason("cpu", "cpu", op="logit_scores") is not None,
        reason="C++ op not built")),
]
INF, NAN = float("inf"), float("nan")


def sklearn_report(id_scores, ood_scores) -> dict[str, float]:
    """AUROC, AUPR-In / -Out (trapezoidal, as OpenOOD) and FPR@95TPR from scikit-learn."""
    y = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    s = np.r_[np.asarray(id_scores, dtype=np.float64), np.asarray(ood_scores, dtype=np.float64)]
    p_in, r_in, _ = precision_recall_curve(y, s)
    p_out, r_out, _ = precision_recall_curve(1 - y, -s)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return {
        "auroc": roc_auc_score(y, s),
        "aupr_in": auc(r_in, p_in),
        "aupr_out": auc(r_out, p_out),
        "fpr_at_tpr": fpr[np.argmax(tpr >= 0.95)],
    }


def confident_logits(n: int, classes: int, margins: tuple[float, float], seed: int):
    """float32 logits whose top class leads the next by a margin drawn from ``margins``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g, dtype=torch.float64)
    margin = torch.empty(n, dtype=torch.float64).uniform_(*margins, generator=g)
    top = torch.randint(0, classes, (n,), generator=g)
    z[torch.arange(n), top] = z.max(dim=1).values + margin
    return z.float()


def _same_metrics(ours: dict, oracle: dict):
    for key in ("auroc", "aupr_in", "aupr_out", "fpr_at_tpr"):
        assert ours[key] == pytest.approx(oracle[key], abs=1e-12), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_msp_metrics_equal_exact_msp_where_float32_saturates(backend):
    # The case: most ID samples of a confident model have p_top == 1.0 in float32.
    id_logits = confident_logits(325, 10, (20.0, 100.0), seed=0)
    ood_logits = confident_logits(325, 10, (10.0, 60.0), seed=1)
    saturated = (torch.softmax(id_logits, dim=1).amax(dim=1) == 1.0).sum()
    assert saturated > 250  # the float32 probability ties them
    exact_id = exact_scores(id_logits)["msp"]
    exact_ood = exact_scores(ood_logits)["msp"]
    oracle = sklearn_report(exact_id, exact_ood)
    ours = metrics.ood_report(msp(id_logits, backend=backend), msp(ood_logits, backend=backend))
    _same_metrics(ours, oracle)
    # the float32 probability does not reach them: the test can tell the two apart
    prob = sklearn_report(torch.softmax(id_logits, 1).amax(1), torch.softmax(ood_logits, 1).amax(1))
    assert abs(prob["auroc"] - oracle["auroc"]) > 0.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_msp_metrics_equal_float64_msp_where_it_is_resolved(backend):
    # margins below 30: float64 softmax still resolves p_top, the oracle is the probability
    id_logits = confident_logits(300, 7, (14.0, 30.0), seed=2)
    ood_logits = confident_logits(200, 7, (8.0, 24.0), seed=3)
    oracle = sklearn_report(torch.softmax(id_logits.double(), 1).amax(1),
                            torch.softmax(ood_logits.double(), 1).amax(1))
    _same_metrics(metrics.ood_report(msp(id_logits, backend=backend),
                                     msp(ood_logits, backend=backend)), oracle)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["entropy", "gen"])
def test_entropy_and_gen_metrics_equal_exact_ones_for_huge_margins(backend, name):
    # margins up to 3000: exp(-margin) underflows float64, GEN's terms (gamma = 0.1) underflow
    # float32 from about 900; the log forms rank exactly like the exact scores
    id_logits = confident_logits(200, 12, (20.0, 3000.0), seed=4)
    ood_logits = confident_logits(200, 12, (5.0, 2500.0), seed=5)
    oracle = sklearn_report(exact_scores(id_logits)[name], exact_scores(ood_logits)[name])
    fn = {"entropy": entropy_score, "gen": gen}[name]
    _same_metrics(metrics.ood_report(fn(id_logits, backend=backend),
                                     fn(ood_logits, backend=backend)), oracle)


def test_values_are_the_documented_transforms_of_the_textbook_scores():
    z = torch.randn(50, 6, dtype=torch.float64) * 2
    p = torch.softmax(z, dim=1)
    p_top = p.amax(dim=1)
    torch.testing.assert_close(torch.sigmoid(msp(z)), p_top)
    torch.testing.assert_close(torch.exp(-entropy_score(z)), -(p * p.log()).sum(dim=1))
    top = torch.sort(p, dim=1, descending=True).values[:, :3]
    paper_gen = -(top**0.5 * (1 - top) ** 0.5).sum(dim=1)
    torch.testing.assert_close(-torch.exp(-gen(z, 0.5, 3)), paper_gen)


INF_ROWS = torch.tensor(
    [
        [INF, 0.0, 1.0, -2.0],  # one +inf: p_top = 1
        [INF, INF, 0.0, -INF],  # two +inf share
        [-INF, -INF, -INF, -INF],  # all masked: uniform, energy -inf
        [NAN, 0.0, 1.0, 2.0],  # NaN: all NaN
        [-INF, 2.0, 1.0, -INF],  # masked entries
        [INF, -INF, -INF, -INF],
        [3.0, 3.0, 3.0, 3.0],
        [1e38, -1e38, 0.0, 5.0],  # finite, margin 1e38
        [0.0, 5000.0, -1e30, 1.0],
    ]
)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_infinite_and_nan_rows_match_the_documented_limits(backend, dtype):
    logits = INF_ROWS.to(dtype)
    out = logit_scores(logits, NAMES, backend=backend)
    expected = exact_scores(logits)
    for name in NAMES:
        got = out[name].double()
        want = expected[name]
        assert torch.equal(torch.isnan(got), torch.isnan(want)), (name, got, want)
        finite = torch.isfinite(want)
        assert torch.equal(got[~finite & ~torch.isnan(want)], want[~finite & ~torch.isnan(want)])
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_class(backend):
    logits = torch.tensor([[3.0], [-INF], [INF], [-1e30]])
    out = logit_scores(logits, NAMES, backend=backend)
    for name in ("msp", "entropy", "gen"):
        assert torch.equal(out[name], torch.full((4,), INF)), name
    assert torch.equal(out["energy"], logits[:, 0])
    assert torch.equal(out["max_logit"], logits[:, 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_come_in_the_order_asked(backend):
    logits = torch.randn(5, 4)
    asked = ("gen", "energy", "msp")
    out = logit_scores(logits, asked, backend=backend)
    assert list(out) == list(asked)
    torch.testing.assert_close(out["energy"], energy(logits, backend=backend))
    torch.testing.assert_close(out["msp"], msp(logits, backend=backend))
    torch.testing.assert_close(out["gen"], gen(logits, backend=backend))
    assert list(logit_scores(logits, ("max_logit", "msp", "max_logit"), backend=backend)) == [
        "max_logit", "msp"]
    torch.testing.assert_close(max_logit(logits, backend=backend), logits.max(dim=1).values)


@pytest.mark.parametrize("bad", [{"top_m": 2.5}, {"top_m": True}, {"temperature": INF},
                                 {"temperature": NAN}, {"gamma": -1.0}, {"gamma": INF}])
def test_options_are_checked(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        logit_scores(torch.randn(2, 3), ("gen", "energy"), **bad)
