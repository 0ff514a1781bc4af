"""Property-based tests of the scoring family (hypothesis): logit scores over shapes, dtypes,
layouts and extremes against the mpmath oracle; batch containers; chunk sizes; shaping; KNN on
grad-carrying features; metrics' input checks. Each oracle is independent of the package."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from exact_scores import NAMES, exact_scores
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

import elogitnorm_fast as ef
from elogitnorm_fast import metrics
from elogitnorm_fast.knn import KNNScorer
from elogitnorm_fast.scoring import (
    ASH,
    SCALE,
    KNNDetector,
    MSPDetector,
    ReActDetector,
    ash_s,
    elogitnorm_scale,
    logit_scores,
    scale_features,
)

from parity import knn_oracle_kth

_CPU_OP = ef.unavailable_reason("cpu", "cpu", op="logit_scores") is None
BACKENDS = ["torch"] + (["cpu"] if _CPU_OP else [])
INF, NAN = math.inf, math.nan
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SPECIAL = [0.0, 1.0, -1.0, 25.0, -25.0, 1e4, -1e4, 1e30, -1e30, INF, -INF]


@st.composite
def logit_rows(draw, allow_nan: bool = True) -> torch.Tensor:
    """float64 logits (N x C) mixing ordinary values, extremes, infinities, all-equal rows and
    huge margins; NaN only when ``allow_nan``."""
    n = draw(st.integers(1, 6))
    c = draw(st.integers(1, 40))
    special = SPECIAL + ([NAN] if allow_nan else [])
    ordinary = st.floats(-60, 60, allow_nan=False, allow_infinity=False)
    element = st.one_of(ordinary, ordinary, ordinary, st.sampled_from(special))
    rows = []
    for _ in range(n):
        kind = draw(st.sampled_from(["mixed", "equal", "margin"]))
        if kind == "equal":
            rows.append([draw(st.one_of(ordinary, st.sampled_from(special)))] * c)
            continue
        row = draw(st.lists(element, min_size=c, max_size=c))
        if kind == "margin":
            where = draw(st.integers(0, c - 1))
            finite = [v for v in row if math.isfinite(v)] or [0.0]
            row[where] = max(finite) + draw(st.floats(10.0, 1e6))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def laid_out(z: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``z`` in another memory layout."""
    if layout == "transposed":
        return z.t().contiguous().t()
    if layout == "strided":
        wide = torch.zeros(z.shape[0] * 2, z.shape[1] * 3, dtype=z.dtype)
        wide[::2, ::3] = z
        return wide[::2, ::3]
    return z


def assert_scores_match(out: dict, exact: dict, dtype: torch.dtype) -> None:
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    for name in out:
        got, want = out[name].double(), exact[name]
        assert torch.equal(torch.isnan(got), torch.isnan(want)), (name, got, want)
        infinite = torch.isinf(want)
        assert torch.equal(got[infinite], want[infinite]), (name, got, want)
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite], want[finite], rtol=tol, atol=tol,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(z=logit_rows(), dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(["contiguous", "transposed", "strided"]),
       names=st.permutations(NAMES), temperature=st.sampled_from([1.0, 0.5, 3.0]))
def test_logit_scores_match_the_exact_scores(backend, z, dtype, layout, names, temperature):
    logits = laid_out(z.to(dtype), layout)
    if temperature != 1.0:
        names = [n for n in names if n != "energy"]  # checked separately below
    out = logit_scores(logits, names, backend=backend)
    assert list(out) == list(names)
    expected = exact_scores(logits)
    assert_scores_match(out, expected, dtype)
    if temperature != 1.0:
        hot = logit_scores(logits, ("energy",), temperature=temperature, backend=backend)
        want = exact_scores(logits, temperature=temperature)["energy"]
        assert_scores_match(hot, {"energy": want}, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(z=logit_rows(allow_nan=False), gamma=st.sampled_from([0.1, 0.5, 1.0]),
       top_m=st.integers(1, 50))
def test_gen_options_match_the_exact_gen(backend, z, gamma, top_m):
    out = logit_scores(z.float(), ("gen",), gamma=gamma, top_m=top_m, backend=backend)
    expected = exact_scores(z.float(), gamma=gamma, top_m=top_m)
    assert_scores_match(out, expected, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(margins=st.lists(st.floats(0.0, 5e3), min_size=4, max_size=30, unique=True),
       classes=st.integers(2, 12), seed=st.integers(0, 2**16))
def test_bounded_scores_order_rows_like_the_exact_scores(backend, margins, classes, seed):
    # whatever the margins (far beyond where float32 probabilities are 1), rows whose exact
    # scores differ by more than the rounding of the result are ordered like them
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(len(margins), classes, generator=g, dtype=torch.float64)
    z[:, 0] = z.max(dim=1).values + torch.tensor(margins, dtype=torch.float64)
    z = z.float()
    out = logit_scores(z, ("msp", "entropy", "gen"), backend=backend)
    exact = exact_scores(z)
    for name in out:
        got, want = out[name].double(), exact[name]
        gap = (want[:, None] - want[None, :]).abs()
        resolved = gap > 1e-5 * torch.maximum(want.abs()[:, None], want.abs()[None, :]) + 1e-5
        agree = torch.sign(got[:, None] - got[None, :]) == torch.sign(want[:, None] - want[None, :])
        assert bool(agree[resolved].all()), name


# --------------------------------------------------------------------------------------------
# batch containers
# --------------------------------------------------------------------------------------------

CONTAINERS = ["list", "list_of_pairs", "list_of_tuples", "list_of_dicts", "loader", "generator"]


def contain(batches: list[torch.Tensor], kind: str, key: str):
    """``batches`` in the container ``kind``, with labels where the container carries them."""
    labels = [torch.zeros(len(b), dtype=torch.long) for b in batches]
    if kind == "list":
        return list(batches)
    if kind == "list_of_pairs":
        return [[b, y] for b, y in zip(batches, labels, strict=True)]
    if kind == "list_of_tuples":
        return [(b, y) for b, y in zip(batches, labels, strict=True)]
    if kind == "list_of_dicts":
        return [{key: b, "label": y} for b, y in zip(batches, labels, strict=True)]
    if kind == "generator":
        return (b for b in batches)
    data = torch.cat(batches)  # a loader re-batches the rows with its own batch size
    return DataLoader(TensorDataset(data, torch.zeros(len(data))), batch_size=3)


@st.composite
def batch_list(draw, dim: int) -> list[torch.Tensor]:
    if draw(st.booleans()):  # equal sizes: a 2-list of them once passed for (inputs, labels)
        sizes = [draw(st.integers(1, 5))] * draw(st.integers(1, 4))
    else:
        sizes = draw(st.lists(st.integers(0, 5), min_size=1, max_size=4).filter(sum))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, dim, generator=g) * 4 for size in sizes]


@FAST
@given(batches=batch_list(dim=5), kind=st.sampled_from(CONTAINERS))
def test_every_row_of_every_batch_is_scored_in_order(batches, kind):
    everything = torch.cat(batches)
    scores = MSPDetector(backend="torch").score(contain(batches, kind, "logits"))
    assert scores.shape == (len(everything),)
    expected = exact_scores(everything)["msp"]
    torch.testing.assert_close(scores.double(), expected, rtol=2e-5, atol=2e-5)


@FAST
@given(batches=batch_list(dim=4), kind=st.sampled_from(CONTAINERS))
def test_fit_uses_every_row_of_every_batch(batches, kind):
    bank = torch.relu(torch.cat(batches))
    relu_batches = [torch.relu(b) for b in batches]
    react = ReActDetector(torch.randn(3, 4)).fit(contain(relu_batches, kind, "features"))
    assert react.threshold == pytest.approx(float(np.percentile(bank.double().numpy(), 90.0)),
                                            rel=1e-6, abs=1e-6)
    k = len(bank)  # the farthest bank row: wrong whenever a row is missing
    knn = KNNDetector(k=k, backend="torch").fit(contain(batches, kind, "features"))
    queries = torch.randn(3, 4)
    expected = -knn_oracle_kth(queries, torch.cat(batches), k)
    torch.testing.assert_close(knn.score(queries).double(), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# chunk sizes, shaping, KNN
# --------------------------------------------------------------------------------------------


@FAST
@given(n=st.integers(1, 30), c=st.integers(2, 8), chunk=st.integers(1, 35),
       seed=st.integers(0, 2**16))
def test_ece_and_scale_do_not_depend_on_the_chunk_size(n, c, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, c, (n,), generator=g)
    p = torch.softmax(logits, dim=1)
    conf, pred = p.max(dim=1)
    bins = torch.clamp(torch.ceil(conf * 15).long() - 1, 0, 14)
    expected = sum(
        abs(float(((pred == labels).double() - conf)[bins == b].sum())) for b in range(15)
    ) / n
    assert metrics.ece(logits, labels, chunk_rows=chunk) == pytest.approx(expected, abs=1e-12)
    weight = torch.randn(c, 3, generator=g, dtype=torch.float64)
    whole = elogitnorm_scale(logits, weight, chunk_rows=n)
    torch.testing.assert_close(elogitnorm_scale(logits, weight, chunk_rows=chunk), whole)


def shaped_reference(x: torch.Tensor, pct: float, prune: bool) -> torch.Tensor:
    """ASH-S (``prune``) or SCALE per row in float64, zero rows mapped to their zero limit."""
    out = torch.zeros_like(x, dtype=torch.float64)
    d = x.shape[1]
    k = d - int(np.round(d * pct / 100.0))
    for i, row in enumerate(x.double()):
        if not bool(row.any()):
            continue
        kept, where = torch.topk(row, k)
        factor = math.exp(float(row.sum()) / float(kept.sum()))
        if prune:
            out[i, where] = kept * factor
        else:
            out[i] = row * factor
    return out


@FAST
@given(n=st.integers(1, 8), d=st.integers(8, 40), pct=st.sampled_from([50.0, 65.0, 85.0, 90.0]),
       zero_rows=st.lists(st.integers(0, 7), max_size=4), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_ash_s_and_scale_are_finite_and_exact_on_zero_rows(n, d, pct, zero_rows, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(n, d, generator=g, dtype=dtype))
    for row in zero_rows:
        x[row % n] = 0.0
    for fn, prune in ((ash_s, True), (scale_features, False)):
        if not prune and d - int(np.round(d * pct / 100.0)) == 0:
            continue
        shaped = fn(x, pct)
        assert torch.isfinite(shaped).all()
        reference = shaped_reference(x, pct, prune)
        torch.testing.assert_close(shaped.double(), reference, rtol=1e-5, atol=1e-6)
        weight = torch.randn(3, d, generator=g, dtype=dtype)
        bias = torch.randn(3, generator=g, dtype=dtype)
        shaping = ASH(pct, "s") if prune else SCALE(pct)
        expected = torch.logsumexp(reference @ weight.double().T + bias.double(), dim=1)
        torch.testing.assert_close(shaping.energy(x, weight, bias).double(), expected,
                                   rtol=1e-5, atol=1e-5)


@FAST
@given(n_bank=st.integers(1, 40), n_query=st.integers(0, 6), dim=st.integers(1, 9),
       k_kind=st.sampled_from([int, np.int32, np.int64]), seed=st.integers(0, 2**16),
       backend=st.sampled_from(["torch", "auto"]))
def test_knn_on_grad_features_matches_the_oracle(n_bank, n_query, dim, k_kind, seed, backend):
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(dim, requires_grad=True)
    bank = torch.randn(n_bank, dim, generator=g) * scale  # part of a graph
    queries = torch.randn(n_query, dim, generator=g) * scale
    k = k_kind(1 + seed % n_bank)
    scorer = KNNScorer(k=3 if n_bank >= 3 else 1, backend=backend).fit(bank)
    distances, _ = scorer.kneighbors(queries, k=k)
    assert distances.shape == (n_query, int(k)) and not distances.requires_grad
    if n_query:
        expected = knn_oracle_kth(queries.detach(), bank.detach(), int(k))
        torch.testing.assert_close(distances[:, -1].double(), expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(0, 4), min_size=0, max_size=3).filter(lambda s: len(s) != 1),
       side=st.sampled_from(["id", "ood"]))
def test_metrics_name_any_score_array_that_is_not_1d(shape, side):
    bad = np.random.default_rng(0).normal(size=shape)
    good = np.arange(5.0)
    args = (bad, good) if side == "id" else (good, bad)
    for fn in (metrics.auroc, metrics.aupr_in, metrics.aupr_out, metrics.fpr_at_tpr,
               metrics.ood_report):
        with pytest.raises(ValueError, match=f"{side}_scores must be 1-D.*{tuple(shape)}"
                           .replace("(", r"\(").replace(")", r"\)")):
            fn(*args)
