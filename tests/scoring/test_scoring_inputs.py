"""Scoring never drops or mixes data: batch containers, grad-carrying features, array-likes,
non-1-D scores, NaN in ID statistics, all-zero feature rows, and chunk sizes.

Every expected value is computed independently (float64 formulas, numpy, a brute-force KNN).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import auc, precision_recall_curve, roc_auc_score
from torch.utils.data import DataLoader, TensorDataset

import elogitnorm_fast as ef
from elogitnorm_fast import metrics
from elogitnorm_fast.knn import KNNScorer
from elogitnorm_fast.scoring import (
    SCALE,
    ASHDetector,
    KNNDetector,
    MSPDetector,
    ReAct,
    ReActDetector,
    SCALEDetector,
    ash_b,
    ash_p,
    ash_s,
    elogitnorm_scale,
    scale_features,
)

from parity import knn_oracle_kth, knn_oracle_sorted

KNN_BACKENDS = [
    "torch",
    pytest.param("cpu", marks=pytest.mark.skipif(
        ef.unavailable_reason("cpu", "cpu", op="knn") is not None, reason="_C not built")),
]


def exact_log_odds(logits: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of the top softmax class in float64: -logsumexp of the other logits
    minus the top one (a strictly increasing function of the max softmax probability)."""
    z = logits.double()
    top, where = z.max(dim=1)
    rest = z.scatter(1, where[:, None], float("-inf"))
    return top - torch.logsumexp(rest, dim=1)


# --------------------------------------------------------------------------------------------
# item 1: a list of batches is a list of batches
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3])
def test_list_of_equal_batches_is_scored_whole(count):
    g = torch.Generator().manual_seed(count)
    batches = [torch.randn(4, 4, generator=g) * 3 for _ in range(count)]
    expected = torch.cat([exact_log_odds(b) for b in batches])
    scores = MSPDetector(backend="torch").score(batches)
    assert scores.shape == (4 * count,)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-5)


def test_explicit_pair_tuple_and_loader_batches():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 3, generator=g)
    labels = torch.randint(0, 3, (12,), generator=g)
    detector = MSPDetector(backend="torch")
    expected = exact_log_odds(logits)
    # a tuple is one (inputs, labels) batch, as a Dataset item or a hand-made pair
    torch.testing.assert_close(detector.score((logits, labels)).double(), expected,
                               rtol=1e-5, atol=1e-5)
    # a DataLoader yields [inputs, labels] lists: each one is a batch
    loader = DataLoader(TensorDataset(logits, labels), batch_size=4)
    torch.testing.assert_close(detector.score(loader).double(), expected, rtol=1e-5, atol=1e-5)
    # the loader's batches gathered in a list: still every batch
    torch.testing.assert_close(detector.score(list(loader)).double(), expected,
                               rtol=1e-5, atol=1e-5)
    # dict batches, one and several
    parts = [{"logits": logits[:6]}, {"logits": logits[6:]}]
    torch.testing.assert_close(detector.score(parts).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(detector.score({"logits": logits}).double(), expected,
                               rtol=1e-5, atol=1e-5)
    # a generator of batches
    torch.testing.assert_close(detector.score(b for b in logits.split(5)).double(), expected,
                               rtol=1e-5, atol=1e-5)


def test_ambiguous_containers_raise():
    logits = torch.randn(6, 3)
    detector = MSPDetector()
    with pytest.raises(TypeError, match="first element"):
        detector.score((list(logits.split(3)), None))
    with pytest.raises(ValueError, match="no data"):
        detector.score([])
    with pytest.raises(ValueError, match="empty"):
        detector.score(())


def test_react_and_knn_fit_on_every_batch_of_a_list():
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(5, 3)
    first = torch.relu(torch.randn(8, 5, generator=g))
    second = torch.relu(torch.randn(8, 5, generator=g)) + 5.0  # moves the 90th percentile
    react = ReActDetector(head.weight, head.bias).fit([first, second])
    both = torch.cat([first, second]).numpy()
    assert react.threshold == pytest.approx(float(np.percentile(both, 90.0)), rel=1e-6)

    knn = KNNDetector(k=10).fit([first, second])  # 16 bank rows, k = 10 needs both batches
    queries = torch.randn(4, 5, generator=g)
    expected = -knn_oracle_kth(queries, torch.cat([first, second]), 10)
    torch.testing.assert_close(knn.score(queries).double(), expected, rtol=1e-5, atol=1e-5)


def test_numpy_batches_are_accepted():
    logits = np.random.default_rng(0).normal(size=(7, 4)).astype(np.float32)
    scores = MSPDetector(backend="torch").score([logits[:3], logits[3:]])
    torch.testing.assert_close(scores.double(), exact_log_odds(torch.from_numpy(logits)),
                               rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# item 2: features that require grad
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", KNN_BACKENDS)
def test_knn_on_features_that_require_grad(backend):
    g = torch.Generator().manual_seed(2)
    layer = torch.nn.Linear(6, 8)
    bank = layer(torch.randn(60, 6, generator=g))  # carries a graph, outside no_grad
    queries = layer(torch.randn(9, 6, generator=g))
    assert bank.requires_grad and queries.requires_grad
    scorer = KNNScorer(k=5, backend=backend).fit(bank)
    scores = scorer.score(queries)
    assert not scores.requires_grad
    expected = -knn_oracle_kth(queries.detach(), bank.detach(), 5)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-5)
    distances, indices = scorer.kneighbors(queries, k=3)
    oracle = knn_oracle_sorted(queries.detach(), bank.detach())
    torch.testing.assert_close(distances.double(), oracle.values[:, :3].sqrt(), rtol=1e-5,
                               atol=1e-5)
    assert not distances.requires_grad


def test_kneighbors_accepts_numpy_integers_only():
    bank = torch.randn(30, 4)
    scorer = KNNScorer(k=2).fit(bank)
    distances, _ = scorer.kneighbors(bank[:3], k=np.int64(3))
    assert distances.shape == (3, 3)
    for bad in (3.0, True, np.float64(3.0), "3"):
        with pytest.raises(ValueError, match="k must be"):
            scorer.kneighbors(bank[:3], k=bad)
    KNNScorer(k=2, query_chunk=np.int32(8), bank_chunk=np.int64(16)).fit(bank).score(bank)
    with pytest.raises(ValueError, match="query_chunk"):
        KNNScorer(k=2, query_chunk=8.0)


# --------------------------------------------------------------------------------------------
# item 3: metrics, percentile, shaping, chunk sizes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 2), (1, 5), (5, 1), ()])
def test_metrics_reject_scores_that_are_not_1d(shape):
    bad = torch.rand(shape)
    good = torch.rand(6)
    for fn in (metrics.auroc, metrics.aupr_in, metrics.aupr_out, metrics.fpr_at_tpr,
               metrics.ood_report):
        with pytest.raises(ValueError, match=r"id_scores must be 1-D.*" + str(tuple(shape))
                           .replace("(", r"\(").replace(")", r"\)")):
            fn(bad, good)
        with pytest.raises(ValueError, match="ood_scores must be 1-D"):
            fn(good, bad.numpy())


def test_integer_scores_stay_distinct_beyond_float64_precision():
    # 2^60 and 2^60 + 1 are one float64: widening them would tie ID with OOD
    big = 2**60
    id_scores = np.array([big + 1, big + 3, -(2**63)], dtype=np.int64)
    ood_scores = np.array([big, big + 2, -(2**63) + 1], dtype=np.int64)
    y = np.r_[np.ones(3), np.zeros(3)]
    ranks = np.argsort(np.argsort(np.r_[id_scores, ood_scores]))  # exact integer order
    expected = roc_auc_score(y, ranks)
    assert metrics.auroc(id_scores, ood_scores) == pytest.approx(expected, abs=1e-12)
    report = metrics.ood_report(id_scores, ood_scores)
    p, r, _ = precision_recall_curve(1 - y, -ranks)
    assert report["aupr_out"] == pytest.approx(auc(r, p), abs=1e-12)
    assert metrics.aupr_out(id_scores, ood_scores) == pytest.approx(auc(r, p), abs=1e-12)


def test_ece_accepts_array_likes_and_checks_chunk_rows():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(50, 4)) * 2
    labels = rng.integers(0, 4, size=50)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, 16)
    expected = 0.0
    for b in range(15):
        inside = (conf > edges[b]) & (conf <= edges[b + 1])
        if inside.any():
            expected += inside.mean() * abs((pred[inside] == labels[inside]).mean()
                                            - conf[inside].mean())
    assert metrics.ece(logits, labels) == pytest.approx(expected, abs=1e-12)
    assert metrics.ece(logits.tolist(), labels.tolist()) == pytest.approx(expected, abs=1e-12)
    assert metrics.ece(logits, labels, chunk_rows=np.int64(7)) == pytest.approx(expected,
                                                                               abs=1e-12)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_rows"):
            metrics.ece(logits, labels, chunk_rows=bad)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="n_bins"):
            metrics.ece(logits, labels, n_bins=bad)
    with pytest.raises(ValueError, match="labels must hold integer"):
        metrics.ece(logits, labels + 0.5)
    for bad in (-100, 4):  # an ignore_index, a class past C
        message = f"labels must be class indices in \\[0, 4\\), got {bad}"
        with pytest.raises(ValueError, match=message):
            metrics.ece(logits, np.r_[labels[:-1], bad])


def test_react_threshold_refuses_nan_and_inf():
    features = torch.rand(10, 4)
    features[3, 2] = float("nan")
    with pytest.raises(ValueError, match="id_features contains NaN"):
        ReAct(90).fit(features)
    with pytest.raises(ValueError, match="id_features contains NaN"):
        ReActDetector(torch.randn(2, 4)).fit(features)
    features[3, 2] = float("inf")
    with pytest.raises(ValueError, match="id_features contains inf"):
        ReAct(90).fit(features)
    with pytest.raises(ValueError, match="threshold"):
        ReAct(90, threshold=float("nan"))


def test_ash_s_and_scale_on_all_zero_rows_take_the_limit():
    # h * exp(s1 / s2) with s1 / s2 bounded for non-negative rows tends to 0 as h -> 0: the
    # shaped row is 0 and the energy is logsumexp(bias).
    g = torch.Generator().manual_seed(4)
    features = torch.relu(torch.randn(3, 20, generator=g))
    features[1] = 0.0
    weight = torch.randn(5, 20, generator=g)
    bias = torch.randn(5, generator=g)
    for shaped in (ash_s(features, 90), scale_features(features, 85), ash_p(features, 90),
                   ash_b(features, 90)):
        assert torch.isfinite(shaped).all()
        assert torch.equal(shaped[1], torch.zeros(20))
    for shaped_row in (ash_s(features, 90)[0], scale_features(features, 85)[0]):
        assert torch.isfinite(shaped_row).all() and shaped_row.abs().sum() > 0
    energy = SCALEDetector(weight, bias).score(features)
    assert float(energy[1]) == pytest.approx(float(torch.logsumexp(bias.double(), 0)), rel=1e-6)
    assert torch.isfinite(energy).all()


def test_pruning_everything():
    features = torch.rand(3, 4) + 0.1
    # D = 4 at percentile 90 keeps round-half-even(0.4) = 0 entries
    assert torch.equal(ash_s(features, 90), torch.zeros(3, 4))
    assert torch.equal(ash_p(features, 90), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="percentile=90.0 keeps no activation of 4"):
        scale_features(features, 90)
    with pytest.raises(ValueError, match="percentile"):
        SCALE(90)(features)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_elogitnorm_scale_rejects_bad_chunk_rows(bad):
    logits = torch.randn(5, 3)
    weight = torch.randn(3, 2)
    with pytest.raises(ValueError, match="chunk_rows"):
        elogitnorm_scale(logits, weight, chunk_rows=bad)
    whole = elogitnorm_scale(logits, weight)
    torch.testing.assert_close(elogitnorm_scale(logits, weight, chunk_rows=np.int64(2)), whole)


@pytest.mark.parametrize("detector", ["ash", "scale"])
def test_shaped_energy_survives_a_factor_beyond_float32(detector):
    # exp(s1 / s2) = exp(94) overflows float32 although the energy (about 7e34) does not: the
    # factor multiplies the head's output in float64 instead of the float32 features
    features = torch.full((2, 190), 0.99)
    features[:, :2] = 1.0  # the two kept activations (percentile 98.95 keeps k = 2)
    weight = torch.zeros(3, 190)
    weight[:, 0], weight[:, 1] = 4e-6, -3e-6  # mixed signs: inf - inf in the float32 path
    bias = torch.tensor([0.5, -1.0, 2.0])
    cls = ASHDetector if detector == "ash" else SCALEDetector
    options = {"mode": "s"} if detector == "ash" else {}
    scores = cls(weight, bias, percentile=98.95, **options).score(features)
    f = features.double()
    ratio = f.sum(dim=1) / f.topk(2, dim=1).values.sum(dim=1)
    base = f.clone()
    if detector == "ash":
        base[:, 2:] = 0.0
    logits = torch.exp(ratio)[:, None] * (base @ weight.double().T) + bias.double()
    expected = torch.logsumexp(logits, dim=1)
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=0.0)
