"""The weight-gradient GEMMs (``geometry.weight_gradient``) against the pairwise formula."""

import pytest
import torch

from elogitnorm_fast.geometry import predicted_rows, weight_gradient


def pairwise_weight_gradient(weight, predicted, coefficients):
    """dW in float64 from its definition: each (sample n, class j) adds ``c_nj (w_m - w_j)`` to
    ``dw_m`` (``m = predicted[n]``) and subtracts it from ``dw_j``."""
    w = weight.double()
    c = coefficients.double()
    terms = c[:, :, None] * (w[predicted][:, None, :] - w[None, :, :])  # N x C x D
    grad = torch.zeros_like(w).index_add_(0, predicted, terms.sum(dim=1))
    return grad - terms.sum(dim=0)


@pytest.mark.parametrize("n,c", [(5, 12), (12, 5), (7, 7)])  # rows per sample / per class
def test_weight_gradient_matches_pairwise_formula(n, c):
    generator = torch.Generator().manual_seed(n * 100 + c)
    weight = torch.randn(c, 6, generator=generator)
    predicted = torch.randint(0, c, (n,), generator=generator)
    predicted[:2] = predicted[0]  # two samples sharing a class
    coefficients = torch.randn(n, c, generator=generator)
    expected = pairwise_weight_gradient(weight, predicted, coefficients)
    rows, per_sample = predicted_rows(weight, predicted)
    assert per_sample == (n < c)

    # The entry at a sample's own class multiplies w_m - w_m: any value gives the same dW ...
    got = weight_gradient(weight, rows, per_sample, predicted, coefficients)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)

    # ... and with minus the rest of the row there, the row sums drop out.
    own = torch.arange(n), predicted
    folded = coefficients.clone()
    folded[own] = 0.0
    folded[own] = -folded.sum(dim=1)
    got = weight_gradient(weight, rows, per_sample, predicted, folded, rows_sum_to_zero=True)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    if per_sample:  # the flag does drop them: rows that do not sum to zero come out wrong
        wrong = weight_gradient(weight, rows, per_sample, predicted, coefficients,
                                rows_sum_to_zero=True)
        assert not torch.allclose(wrong.double(), expected, rtol=1e-3, atol=1e-3)
