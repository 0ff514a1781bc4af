"""The Triton logit-score kernel on the CPU under the interpreter (the ``tests/triton``
interpreter suite: ``TRITON_INTERPRET=1 pytest tests/triton``; see conftest.py), against the
score formulas, the torch path and the exact scores."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_scoring_properties import NAMES, assert_scores_match, laid_out, logit_rows

ALL = ("msp", "max_logit", "energy", "entropy", "gen")


def _formula(z, name, temperature=1.0, gamma=0.1, top_m=100):
    from test_logit_scores import formula

    return formula(z, name, temperature, gamma, top_m)


@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (17, 10), (70, 100), (5, 1000), (4, 2500)])
def test_triton_matches_formula(shape):
    from elogitnorm_fast.scoring import logit_scores

    logits = torch.randn(*shape) * 4
    out = logit_scores(logits, ALL, backend="triton")
    for name in ALL:
        tol = 5e-4 if name == "gen" else 2e-5
        torch.testing.assert_close(out[name].double(), _formula(logits, name), rtol=tol, atol=tol)


def test_triton_matches_torch_path_and_temperature():
    from elogitnorm_fast.scoring import logit_scores

    logits = torch.randn(40, 1500) * 3
    a = logit_scores(logits, ALL, backend="triton")
    b = logit_scores(logits, ALL, backend="torch")
    for name in ALL:
        torch.testing.assert_close(a[name], b[name], rtol=2e-5, atol=2e-5)
    hot = logit_scores(logits, ("energy",), temperature=2.5, backend="triton")["energy"]
    torch.testing.assert_close(hot.double(), _formula(logits, "energy", 2.5), rtol=2e-5, atol=2e-5)


def test_triton_masked_rows_strides_and_fp16():
    from elogitnorm_fast.scoring import logit_scores

    logits = torch.randn(9, 1100)
    logits[:, 5:] = -float("inf")
    out = logit_scores(logits, ALL, backend="triton")
    for name in ALL:
        torch.testing.assert_close(
            out[name].double(), _formula(logits[:, :5], name), rtol=1e-5, atol=1e-5
        )
    base = torch.randn(30, 60)
    view = base[::3, ::2]
    out = logit_scores(view, ALL, backend="triton")
    torch.testing.assert_close(out["energy"].double(), _formula(view, "energy"))
    half = (torch.randn(12, 50) * 3).half()
    out = logit_scores(half, ("msp", "energy"), backend="triton")
    torch.testing.assert_close(
        out["energy"].double(), _formula(half, "energy"), rtol=2e-5, atol=2e-5
    )


def test_triton_infinite_nan_and_tied_rows_across_blocks():
    # +inf, ties for the maximum, all -inf and NaN placed in different column blocks of a row
    # that streams (C = 2500 > one block of 1024): the documented limits, from mpmath
    from exact_scores import exact_scores

    from elogitnorm_fast.scoring import logit_scores

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 2500, generator=g) * 3
    inf = float("inf")
    logits[0, 2000] = inf
    logits[1, 10] = inf
    logits[1, 2400] = inf
    logits[2] = -inf
    logits[3, 100] = 50.0  # a tie for the maximum in two blocks
    logits[3, 1500] = 50.0
    logits[4, 2499] = float("nan")
    logits[5, :1024] = -inf  # a first block of masked classes
    logits[6, 1030] = 1e4  # a margin that underflows exp in float32
    logits[7, :] = 0.0
    logits[7, 2048:] = -inf
    out = logit_scores(logits, ALL, backend="triton")
    expected = exact_scores(logits)
    for name in ALL:
        got, want = out[name].double(), expected[name]
        assert torch.equal(torch.isnan(got), torch.isnan(want)), name
        finite = torch.isfinite(want)
        infinite = torch.isinf(want)
        assert torch.equal(got[infinite], want[infinite]), name
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)


def test_triton_ranking_matches_exact_scores_and_order_asked():
    from exact_scores import exact_scores
    from test_score_ranking import confident_logits, sklearn_report

    from elogitnorm_fast import metrics
    from elogitnorm_fast.scoring import logit_scores

    id_logits = confident_logits(120, 10, (20.0, 3000.0), seed=0)
    ood_logits = confident_logits(120, 10, (5.0, 2500.0), seed=1)
    asked = ("gen", "entropy", "msp")
    ours_id = logit_scores(id_logits, asked, backend="triton")
    ours_ood = logit_scores(ood_logits, asked, backend="triton")
    assert list(ours_id) == list(asked)
    exact_id, exact_ood = exact_scores(id_logits), exact_scores(ood_logits)
    for name in asked:
        oracle = sklearn_report(exact_id[name], exact_ood[name])
        ours = metrics.ood_report(ours_id[name], ours_ood[name])
        for key in ("auroc", "aupr_in", "aupr_out", "fpr_at_tpr"):
            assert ours[key] == pytest.approx(oracle[key], abs=1e-12), (name, key)


@settings(max_examples=15, deadline=None)
@given(z=logit_rows(), wide=st.booleans(), names=st.permutations(NAMES),
       layout=st.sampled_from(["contiguous", "transposed", "strided"]))
def test_triton_matches_the_exact_scores_on_extremes(z, wide, names, layout):
    # wide: the same rows padded past one column block with -inf (masked classes), so the
    # running merge of blocks sees every kind of row
    from exact_scores import exact_scores

    from elogitnorm_fast.scoring import logit_scores

    if wide:
        pad = torch.full((z.shape[0], 1100), float("-inf"), dtype=z.dtype)
        z = torch.cat([pad[:, :700], z, pad[:, 700:]], dim=1)
    logits = laid_out(z.float(), layout)
    out = logit_scores(logits, names, backend="triton")
    assert list(out) == list(names)
    assert_scores_match(out, exact_scores(logits), torch.float32)
