"""elogitnorm_scale (memory-lean) against the all-pairs reference."""

from __future__ import annotations

import pytest
import torch

from elogitnorm_fast.reference import elogitnorm_scale_reference
from elogitnorm_fast.scoring import elogitnorm_scale


@pytest.mark.parametrize("n,c,d", [(1, 1, 3), (5, 2, 4), (64, 10, 16), (40, 100, 32), (9, 257, 7)])
@pytest.mark.parametrize("divisor", ["classes", "paper"])
def test_matches_reference_float64(n, c, d, divisor):
    logits = torch.randn(n, c, dtype=torch.float64) * 3
    weight = torch.randn(c, d, dtype=torch.float64)
    ours = elogitnorm_scale(logits, weight, divisor=divisor)
    ref = elogitnorm_scale_reference(logits, weight, divisor=divisor)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_matches_reference_float32_and_half():
    logits = torch.randn(100, 50) * 3
    weight = torch.randn(50, 64)
    ref = elogitnorm_scale_reference(logits.double(), weight.double())
    torch.testing.assert_close(elogitnorm_scale(logits, weight).double(), ref, rtol=1e-5, atol=1e-6)
    half = elogitnorm_scale(logits.half(), weight.half())
    assert half.dtype == torch.float32
    ref_half = elogitnorm_scale_reference(logits.half().double(), weight.half().double())
    torch.testing.assert_close(half.double(), ref_half, rtol=1e-4, atol=1e-5)


def test_chunking_ties_and_degenerate_rows():
    logits = torch.randn(50, 6, dtype=torch.float64)
    logits[0] = 2.0  # all equal: s clamps to eps
    logits[1, :2] = 5.0  # tie for the max: first index wins
    weight = torch.randn(6, 3, dtype=torch.float64)
    weight[4] = weight[5]  # coincident rows: distance clamps to eps
    ref = elogitnorm_scale_reference(logits, weight)
    torch.testing.assert_close(elogitnorm_scale(logits, weight, chunk_rows=7), ref)
    assert float(elogitnorm_scale(logits, weight)[0]) == pytest.approx(1e-6)
    assert torch.isfinite(elogitnorm_scale(logits, weight)).all()


def test_no_grad_and_errors():
    logits = torch.randn(4, 3, requires_grad=True)
    weight = torch.randn(3, 2, requires_grad=True)
    assert not elogitnorm_scale(logits, weight).requires_grad
    with pytest.raises(ValueError, match="one row per class"):
        elogitnorm_scale(logits, torch.randn(4, 2))
    with pytest.raises(ValueError, match="2-D"):
        elogitnorm_scale(torch.randn(3), weight)
    # eps that is 0 (or not a number) in the dtype the scale computes in is refused, named.
    for eps in (0.0, -1.0, float("nan"), float("inf"), 1e-50):
        with pytest.raises(ValueError, match=r"eps .*" + repr(eps).replace("+", r"\+")):
            elogitnorm_scale(logits, weight, eps=eps)
    assert torch.isfinite(elogitnorm_scale(logits.double(), weight, eps=1e-50)).all()


def test_near_duplicate_weight_rows_stay_exact_in_float32():
    # |a|^2 + |b|^2 - 2 a.b cancels for nearly equal rows (fp32 gives ~1e-3 instead of ~1e-5):
    # the CPU path recomputes those distances from the difference, like the loss backends.
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 8, generator=g) * 3
    logits[::2, 0] += 10.0  # class 0 predicted often: its distance to class 1 matters
    weight = torch.randn(8, 32, generator=g) * 4
    weight[1] = weight[0] + 1e-5 * torch.randn(32, generator=g)
    ref = elogitnorm_scale_reference(logits.double(), weight.double())
    torch.testing.assert_close(elogitnorm_scale(logits, weight).double(), ref, rtol=1e-4,
                               atol=1e-6)
