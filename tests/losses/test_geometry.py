"""The weight-gradient GEMMs (``geometry.weight_gradient``) against the pairwise formula."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elogitnorm_fast.geometry import distance_rows, predicted_rows, weight_gradient


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


def _pairwise_distances(weight, predicted):
    """Distance rows from the definition, float64: ``||w_m - w_j||``, self-distance 1."""
    w = weight.double()
    distances = torch.linalg.vector_norm(w[predicted][:, None, :] - w[None, :, :], dim=2)
    distances[torch.arange(len(predicted)), predicted] = 1.0
    return distances


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 40), st.integers(1, 60), st.integers(1, 24), st.integers(0, 2**31 - 1),
       st.integers(-30, 36), st.sampled_from([torch.float32, torch.float64]),
       st.sampled_from(["gauss", "clustered", "duplicates"]))
def test_distance_rows_and_weight_gradient_match_the_definition(n, c, d, seed, exponent, dtype,
                                                                 kind):
    """Both row layouts, weights from 1e-30 to 1e36 (fp32 squares overflow past ~1e19), rows
    clustered far below their norms (the GEMM forms cancel there) and exact duplicates: the
    distances and dW agree with the float64 definitions to a few roundings."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(c, d, generator=generator, dtype=torch.float64)
    if kind == "clustered":  # every row within 1e-3 of a common centre of norm ~10
        weight = 10 + 1e-3 * weight
    elif kind == "duplicates" and c > 1:
        weight[1::2] = weight[0]
    weight = (weight * 10.0**exponent).to(dtype)
    predicted = torch.randint(0, c, (n,), generator=generator)
    geometry = distance_rows(weight, predicted, dtype, refine=True)
    expected = _pairwise_distances(weight, predicted)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(geometry.for_samples(predicted).double(), expected, rtol=rtol,
                               atol=0)
    # Coefficients like the loss's, c ~ 1 / Delta^3 (0 on duplicates, as the clamp makes them),
    # given for the scaled weight the GEMMs run on (c / weight_scale, which fp32 holds).
    scaled_distances = expected * geometry.weight_scale.double()
    scaled = torch.randn(n, c, generator=generator, dtype=torch.float64) / (
        scaled_distances.clamp_min(1e-300) ** 3)
    scaled = torch.where(expected > 0, scaled, torch.zeros_like(scaled))
    scaled[torch.arange(n), predicted] = 0.0  # multiplies w_m - w_m, as in the loss
    scaled = scaled.to(dtype)
    got = weight_gradient(geometry.weight, geometry.rows, geometry.per_sample, predicted, scaled,
                          exact=geometry.refined)
    want = pairwise_weight_gradient(weight, predicted,
                                    scaled.double() * geometry.weight_scale.double())
    top = want.abs().max()
    assert ((got.double() - want).abs() <= rtol * 20 * (want.abs() + top) + 1e-300).all()


def test_weight_gradient_of_close_rows_needs_the_exact_entries():
    """Rows 1e-4 apart at norm ~10: the GEMM form cancels 5 digits in fp32; the entries listed
    by distance_rows are added from the difference instead."""
    generator = torch.Generator().manual_seed(0)
    weight = (10 + 1e-4 * torch.randn(6, 3, generator=generator, dtype=torch.float64)).float()
    predicted = torch.tensor([0, 3, 5])
    coefficients = torch.randn(3, 6, generator=generator)
    want = pairwise_weight_gradient(weight, predicted, coefficients)
    geometry = distance_rows(weight, predicted, torch.float32, refine=True)
    assert geometry.refined is not None and geometry.refined[0].numel() == 15
    scaled = coefficients / geometry.weight_scale
    exact = weight_gradient(geometry.weight, geometry.rows, True, predicted, scaled,
                            exact=geometry.refined)
    plain = weight_gradient(geometry.weight, geometry.rows, True, predicted, scaled)
    torch.testing.assert_close(exact.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max())
    assert not torch.allclose(plain.double(), want, rtol=1e-3, atol=1e-3 * want.abs().max())
