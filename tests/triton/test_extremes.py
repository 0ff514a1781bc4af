"""Extremes and property-based parity of every kernel path (issue 22) against float64 oracles.

Logits near the fp32 limit, tiny margins on huge logits, weights whose squared norms overflow,
ties and equal rows, on the fused, GEMM and streamed paths (chosen through ``block_cols``).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_paths import KERNEL_PATHS, block_cols

from elogitnorm_fast.backends import triton_backend
from elogitnorm_fast.reference import logitnorm_reference

from parity import REDUCTIONS, assert_close_to_scale, elogitnorm_oracle, logitnorm_oracle

INTERPRETER_SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                                suppress_health_check=[HealthCheck.too_slow])


def _triton_elogitnorm(logits, weight, target, reduction, path, eps=1e-6):
    return triton_backend.elogitnorm_loss(
        logits, weight, target, reduction=reduction, ignore_index=-100, eps=eps,
        divisor=logits.shape[1], block_cols=block_cols(path, logits.shape[1]))


def _check_against_oracle(logits, weight, target, reduction, path, rtol=2e-5,
                          weight_rtol=2e-4):
    """Loss and both gradients against the float64 oracle on the same fp32 values."""
    loss = _triton_elogitnorm(logits, weight, target, reduction, path)
    grad = (torch.rand(loss.shape, dtype=torch.float64) + 0.5).float()
    grad_logits, grad_weight = torch.autograd.grad(loss, (logits, weight), grad)
    expected = elogitnorm_oracle(logits, weight, target, reduction, grad)
    assert_close_to_scale("loss", loss, expected[0], rtol=rtol, floor=1e-6)
    assert_close_to_scale("grad_logits", grad_logits, expected[1], rtol=rtol, floor=1e-36,
                          per_row=True, terms=expected[3])
    assert_close_to_scale("grad_weight", grad_weight, expected[2], rtol=weight_rtol,
                          floor=1e-36)
    return loss, grad_logits, grad_weight


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("value", [100.0, 1e30, 3e38])
def test_rows_of_equal_logits_give_log_c(path, value):
    """All margins 0: s is clamped, every class equally likely, log C per row."""
    weight = torch.randn(10, 8, requires_grad=True)
    logits = torch.full((4, 10), value, requires_grad=True)
    target = torch.tensor([0, 3, 9, 5])
    loss = _triton_elogitnorm(logits, weight, target, "sum", path)
    torch.testing.assert_close(loss, torch.tensor(4 * math.log(10)))
    grad_logits, _ = torch.autograd.grad(loss, (logits, weight))
    expected = (0.1 - torch.nn.functional.one_hot(target, 10)) / 1e-6
    torch.testing.assert_close(grad_logits, expected.float(), rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_small_margins_large_logits_and_large_weights(path):
    """3 + 1e-3 randn (C = 3 and 40); logits near 1e30 (s^2 overflowed, zeroing dW);
    weights near 1e19 and 1e20 (|w|^2, or an inner product's partial sums, overflowed:
    NaN or wrong distances)."""
    generator = torch.Generator().manual_seed(11)
    for c, logit_scale, offset, weight_scale in ((3, 1e-3, 3.0, 1.0), (40, 1e-3, 3.0, 1.0),
                                                 (40, 1e30, 0.0, 1.0),
                                                 (40, 1e20, 0.0, 1e19),
                                                 (40, 1e20, 0.0, 1e20)):
        logits = (offset + logit_scale * torch.randn(12, c, generator=generator))
        weight = weight_scale * torch.randn(c, 6, generator=generator)
        target = torch.randint(0, c, (12,), generator=generator)
        _check_against_oracle(logits.requires_grad_(True), weight.requires_grad_(True),
                              target, "mean", path)


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("magnitude", [1e20, 1e37])
def test_logitnorm_is_scale_invariant(streamed, magnitude):
    """LogitNorm at 1e20 and 1e37 is LogitNorm at 1 (||z||^2 overflowed: log C)."""
    generator = torch.Generator().manual_seed(12)
    base = torch.randn(6, 40, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 40, (6,), generator=generator)
    logits = (base * magnitude).float().requires_grad_(True)
    for reduction in REDUCTIONS:
        loss = triton_backend.logitnorm_loss(
            logits, target, tau=0.04, reduction=reduction, ignore_index=-100,
            block_cols=8 if streamed else None)
        grad = torch.ones_like(loss) * 1.5
        (grad_logits,) = torch.autograd.grad(loss, logits, grad)
        expected, expected_grad, terms = logitnorm_oracle(logits, target, reduction, grad)
        at_one = logitnorm_reference(base, target, reduction=reduction)
        assert_close_to_scale("loss", loss, at_one, rtol=2e-5, floor=1e-6)
        assert_close_to_scale("loss", loss, expected, rtol=2e-5, floor=1e-6)
        assert_close_to_scale("grad", grad_logits, expected_grad, rtol=2e-5, floor=1e-36,
                              per_row=True, terms=terms)


@INTERPRETER_SETTINGS
@given(st.integers(1, 12), st.integers(1, 160), st.integers(4, 12), st.integers(0, 2**31 - 1),
       st.sampled_from([1e4, 3.0, -7.5, 0.0]), st.integers(-4, 1), st.integers(-20, 37),
       st.sampled_from(KERNEL_PATHS), st.sampled_from(REDUCTIONS),
       st.sampled_from(["gauss", "ties", "equal_rows"]))
def test_elogitnorm_kernels_match_float64_oracle(n, c, d, seed, offset, spread, magnitude,
                                                 path, reduction, pattern):
    """Random shapes, offsets and spreads (small margins on large logits), overall
    magnitudes up to 1e37, ties, equal rows, ignored rows, every reduction and path.
    D >= 4 keeps random weight rows apart: the weight gradient's GEMMs lose digits in
    ``c w_m - c w_j`` for rows much closer than their norms (as every fp32 GEMM form)."""
    generator = torch.Generator().manual_seed(seed)
    scale = 10.0 ** magnitude if offset == 0.0 else 1.0
    logits = offset + 10.0 ** spread * torch.randn(n, c, generator=generator,
                                                   dtype=torch.float64)
    if pattern == "ties":
        logits = offset + torch.randint(-2, 3, (n, c), generator=generator).double()
    elif pattern == "equal_rows":
        logits[::2] = offset
    logits = (logits * scale).float().requires_grad_(True)
    weight = torch.randn(c, d, generator=generator).requires_grad_(True)
    target = torch.randint(0, c, (n,), generator=generator)
    target[1::3] = -100
    _check_against_oracle(logits, weight, target, reduction, path)


@INTERPRETER_SETTINGS
@given(st.integers(1, 12), st.integers(1, 160), st.integers(0, 2**31 - 1),
       st.sampled_from([0.0, 3.0, 1e4]), st.integers(-30, 37), st.booleans(),
       st.sampled_from(REDUCTIONS))
def test_logitnorm_kernels_match_float64_oracle(n, c, seed, offset, exponent, streamed,
                                                reduction):
    generator = torch.Generator().manual_seed(seed)
    magnitude = 10.0 ** exponent / (1.0 + abs(offset))  # finite in fp32 up to 1e37
    logits = (magnitude * (offset + torch.randn(n, c, generator=generator,
                                                dtype=torch.float64)))
    logits = logits.float().requires_grad_(True)
    target = torch.randint(0, c, (n,), generator=generator)
    target[::4] = -100
    loss = triton_backend.logitnorm_loss(logits, target, tau=0.04, reduction=reduction,
                                         ignore_index=-100,
                                         block_cols=4 if streamed else None)
    grad = (torch.rand(loss.shape, dtype=torch.float64) + 0.5).float()
    (grad_logits,) = torch.autograd.grad(loss, logits, grad)
    expected, expected_grad, terms = logitnorm_oracle(logits, target, reduction, grad)
    assert_close_to_scale("loss", loss, expected, rtol=2e-5, floor=1e-6)
    assert_close_to_scale("grad", grad_logits, expected_grad, rtol=2e-5, floor=1e-36,
                          per_row=True, terms=terms)
