"""Right values where plain formulas lose them: the ``torch`` backend (and the shared geometry)
against the float64 reference on the same input values, over random shapes, offsets, scales,
ties, ignored rows, reductions, dtypes and layouts (hypothesis), and the hand-picked extremes:
rows of equal logits, small margins on large logits, logits and weights near the fp32 limits.

The oracle is :func:`parity.elogitnorm_oracle`: the reference in float64 on the same values
(fp32 inputs are exact in float64), each row shifted by its maximum.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import elogitnorm_fast as ef
from elogitnorm_fast.geometry import distance_rows
from elogitnorm_fast.reference import elogitnorm_reference, logitnorm_reference

from parity import REDUCTIONS, assert_close_to_scale, elogitnorm_oracle, logitnorm_oracle

#: fp32 results against the float64 oracle: relative to the size of the terms, plus the
#: subnormal range, where fp32 itself has fewer digits. The weight gradient gets more: its
#: distances come from the GEMM form, whose rounding (relative to ``|a|^2 + |b|^2``) grows by
#: up to 100x in rows closer than 0.1 of their norms before the exact recomputation sets in.
RTOL_32, FLOOR_32 = 2e-5, 1e-36
RTOL_32_WEIGHT = 2e-4
RTOL_64, FLOOR_64 = 1e-10, 1e-300
LOW_PRECISION = {torch.bfloat16: 1e-2, torch.float16: 2e-3}

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layout(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout."""
    if layout == "column_major":
        return tensor.t().contiguous().t()
    if layout == "strided":  # every other column of a wider tensor
        wide = torch.stack([tensor, torch.full_like(tensor, float("nan"))], dim=2)
        return wide.flatten(1)[:, ::2]
    return tensor


@st.composite
def elogitnorm_cases(draw, max_classes=300, max_rows=64, max_features=64):
    """``(logits, weight, target, reduction, options)``: logits ``offset + spread * randn``
    (some with ties or equal rows), weights random, with duplicate rows, or scaled; some rows
    ignored (rarely all). Small spreads on large offsets first: the margins that matter are
    then far below the logits."""
    n = draw(st.integers(1, max_rows))
    c = draw(st.integers(1, max_classes))
    d = draw(st.integers(1, max_features))
    gen = _generator(draw(st.integers(0, 2**31 - 1)))
    offset = draw(st.sampled_from([1e4, 3.0, -1e4, 100.0, -7.5, 0.0]))
    spread = 10.0 ** draw(st.integers(-4, 1))
    logits = offset + spread * torch.randn(n, c, generator=gen, dtype=torch.float64)
    pattern = draw(st.sampled_from(["gauss", "ties", "gauss", "equal_rows"]))
    if pattern == "ties":
        logits = offset + spread * torch.randint(-2, 3, (n, c), generator=gen).double()
    elif pattern == "equal_rows":
        logits[::2] = offset
    weight = torch.randn(c, d, generator=gen, dtype=torch.float64)
    weight_kind = draw(st.sampled_from(["gauss", "duplicates", "small", "large"]))
    if weight_kind == "duplicates" and c > 1:
        weight[c // 2] = weight[0]
    elif weight_kind == "small":
        weight *= 1e-3
    elif weight_kind == "large":
        weight *= 1e3
    target = torch.randint(0, c, (n,), generator=gen)
    ignored = draw(st.sampled_from(["some", "none", "some", "all"]))
    if ignored == "some":
        target[::3] = -100
    elif ignored == "all":
        target[:] = -100
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float32, torch.bfloat16]))
    weight_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    logits = _layout(logits.to(dtype), draw(st.sampled_from(["contiguous", "column_major",
                                                             "strided"])))
    weight = _layout(weight.to(weight_dtype), draw(st.sampled_from(["contiguous",
                                                                    "column_major"])))
    options = {"divisor": draw(st.sampled_from(["classes", "paper"])),
               "eps": draw(st.sampled_from([1e-6, 1e-3]))}
    return (logits.requires_grad_(True), weight.requires_grad_(True), target,
            draw(st.sampled_from(REDUCTIONS)), options)


def _upstream(loss: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A random upstream gradient (one per row for ``none``), not all ones."""
    gen = _generator(seed)
    return (torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5).to(loss.dtype)


def _tolerances(*tensors: torch.Tensor) -> tuple[float, float]:
    dtypes = {t.dtype for t in tensors}
    if torch.float64 in dtypes and len(dtypes) == 1:
        return RTOL_64, FLOOR_64
    return RTOL_32, FLOOR_32


def check_elogitnorm_against_oracle(backend, logits, weight, target, reduction, **options):
    """Loss and both gradients of ``backend`` against :func:`parity.elogitnorm_oracle`."""
    loss = ef.elogitnorm_loss(logits, weight, target, reduction=reduction, backend=backend,
                              **options)
    grad = _upstream(loss)
    grad_logits, grad_weight = torch.autograd.grad(loss, (logits, weight), grad)
    expected = elogitnorm_oracle(logits, weight, target, reduction, grad, **options)
    rtol, floor = _tolerances(logits, weight)
    # Outputs in bf16 / fp16 are the fp32 result rounded once more.
    out_rtol = LOW_PRECISION.get(logits.dtype, rtol)
    assert loss.dtype == logits.dtype and grad_logits.dtype == logits.dtype
    assert grad_weight.dtype == weight.dtype
    assert_close_to_scale("loss", loss, expected[0], rtol=out_rtol,
                          floor=floor + (1e-6 if out_rtol != RTOL_64 else 1e-12), per_row=False)
    assert_close_to_scale("grad_logits", grad_logits, expected[1], rtol=out_rtol, floor=floor,
                          per_row=True, terms=expected[3])
    weight_rtol = RTOL_32_WEIGHT if rtol == RTOL_32 else rtol
    assert_close_to_scale("grad_weight", grad_weight, expected[2], rtol=weight_rtol, floor=floor)
    return loss, grad_logits, grad_weight


# ------------------------------------------------------------------ property-based parity


@SETTINGS
@given(elogitnorm_cases())
def test_torch_elogitnorm_matches_float64_oracle(case):
    logits, weight, target, reduction, options = case
    check_elogitnorm_against_oracle("torch", logits, weight, target, reduction, **options)


@SETTINGS
@given(
    st.integers(1, 24), st.integers(1, 40), st.integers(1, 16), st.integers(0, 2**31 - 1),
    st.integers(-30, 38), st.integers(-12, 30), st.sampled_from(REDUCTIONS),
)
def test_torch_elogitnorm_extreme_magnitudes_fp32(n, c, d, seed, logit_exp, weight_exp,
                                                  reduction):
    """fp32 logits of magnitude 1e-30 .. 1e38 and weights of 1e-12 .. 1e30: finite, and the
    float64 answer on the same values."""
    gen = _generator(seed)
    logits = (torch.randn(n, c, generator=gen) * 10.0**logit_exp).float()
    weight = (torch.randn(c, d, generator=gen) * 10.0**weight_exp).float()
    logits = logits.clamp(-3e38, 3e38).requires_grad_(True)
    weight = weight.requires_grad_(True)
    target = torch.randint(0, c, (n,), generator=gen)
    loss, grad_logits, grad_weight = check_elogitnorm_against_oracle(
        "torch", logits, weight, target, reduction)
    assert loss.isfinite().all() and grad_logits.isfinite().all()
    assert grad_weight.isfinite().all()


@SETTINGS
@given(
    st.integers(1, 64), st.integers(1, 300), st.integers(0, 2**31 - 1),
    st.sampled_from([0.0, 3.0, 1e4, -1e4]), st.integers(-30, 37),
    st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), st.sampled_from(REDUCTIONS),
    st.sampled_from(["contiguous", "column_major", "strided"]),
)
def test_torch_logitnorm_matches_float64_oracle(n, c, seed, offset, exponent, dtype, reduction,
                                                layout):
    gen = _generator(seed)
    magnitude = 10.0**exponent / (1.0 + abs(offset))  # finite in fp32 up to exponent 37
    logits = magnitude * (offset + torch.randn(n, c, generator=gen, dtype=torch.float64))
    logits = _layout(logits.to(dtype), layout).requires_grad_(True)
    target = torch.randint(0, c, (n,), generator=gen)
    target[::4] = -100
    loss = ef.logitnorm_loss(logits, target, reduction=reduction, backend="torch")
    grad = _upstream(loss)
    (grad_logits,) = torch.autograd.grad(loss, logits, grad)
    expected_loss, expected_grad, terms = logitnorm_oracle(logits, target, reduction, grad)
    rtol = LOW_PRECISION.get(dtype, RTOL_64 if dtype == torch.float64 else RTOL_32)
    floor = FLOOR_64 if dtype == torch.float64 else FLOOR_32
    assert_close_to_scale("loss", loss, expected_loss, rtol=rtol, floor=floor + rtol)
    assert_close_to_scale("grad_logits", grad_logits, expected_grad, rtol=rtol, floor=floor,
                          per_row=True, terms=terms)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.sampled_from([torch.float32, torch.float64]),
       st.floats(0.0, 1e300, allow_subnormal=True) | st.sampled_from([0.0, 1.0, 3.9, 4.0]),
       st.booleans())
def test_power_of_two_reciprocal(dtype, value, at_most_one):
    from elogitnorm_fast.geometry import power_of_two_reciprocal

    magnitude = torch.tensor(value, dtype=torch.float64).to(dtype)
    p = power_of_two_reciprocal(magnitude, at_most_one=at_most_one)
    mantissa, _ = torch.frexp(p.double())
    assert mantissa.item() == 0.5 and p.isfinite() and p > 0, p  # a finite power of two
    product = (magnitude.double() * p.double()).item()
    assert product == (magnitude * p).item()  # exact in the dtype
    tiny = torch.finfo(dtype).tiny
    if not magnitude.isfinite():
        return
    if at_most_one and magnitude < 1:
        assert p.item() == 1.0
    elif magnitude >= tiny:
        assert 1.0 <= product < 4.0
    else:
        assert product < 4.0


# ------------------------------------------------------------------ hand-picked examples


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [100.0, -3.0, 1e30, 3e38, 1e-30])
def test_rows_of_equal_logits_give_log_c(dtype, value):
    """Every margin is 0, so ``s`` is clamped and every class is equally likely: log C, and the
    logits gradient ``(1/C - onehot) / eps`` (the clamp passes no gradient to ``s``)."""
    weight = torch.randn(10, 8, dtype=dtype, requires_grad=True)
    logits = torch.full((4, 10), value, dtype=dtype, requires_grad=True)
    target = torch.tensor([0, 3, 9, 5])
    loss = ef.elogitnorm_loss(logits, weight, target, reduction="sum", backend="torch")
    torch.testing.assert_close(loss, torch.tensor(4 * math.log(10), dtype=dtype))
    grad_logits, grad_weight = torch.autograd.grad(loss, (logits, weight))
    expected = (torch.full((4, 10), 0.1, dtype=torch.float64)
                - torch.nn.functional.one_hot(target, 10)) / 1e-6
    torch.testing.assert_close(grad_logits.double(), expected, rtol=1e-5, atol=1e-2)
    assert torch.count_nonzero(grad_weight) == 0


def test_small_margins_on_large_logits_fp32():
    """``3 + 1e-3 * randn`` with C = 3: ``z / s`` is near 1e4, where fp32 keeps too few digits
    of the margins; the answer is the float64 one on the same fp32 values."""
    logits = (3 + 1e-3 * torch.randn(64, 3)).requires_grad_(True)
    weight = torch.randn(3, 5, requires_grad=True)
    target = torch.randint(0, 3, (64,))
    for reduction in REDUCTIONS:
        check_elogitnorm_against_oracle("torch", logits, weight, target, reduction)


def test_large_logits_keep_the_weight_gradient_fp32():
    """Logits near 1e30: ``s`` near 1e30 and ``s^2`` beyond fp32, which zeroed dW."""
    logits = (1e30 * torch.randn(8, 10)).requires_grad_(True)
    weight = torch.randn(10, 8, requires_grad=True)
    target = torch.randint(0, 10, (8,))
    _, _, grad_weight = check_elogitnorm_against_oracle("torch", logits, weight, target, "mean")
    assert grad_weight.abs().max() > 1e-3


@pytest.mark.parametrize("logit_magnitude", [1.0, 1e20])
def test_large_weights_fp32(logit_magnitude):
    """Weights near 1e20: their squared norms overflow fp32, which gave NaN distances."""
    logits = (logit_magnitude * torch.randn(16, 10)).requires_grad_(True)
    weight = (1e20 * torch.randn(10, 8)).requires_grad_(True)
    target = torch.randint(0, 10, (16,))
    loss, grad_logits, grad_weight = check_elogitnorm_against_oracle(
        "torch", logits, weight, target, "mean")
    assert loss.isfinite() and grad_logits.isfinite().all() and grad_weight.isfinite().all()


def test_distance_rows_of_huge_and_tiny_weights_fp32():
    """The distance rows equal the float64 differences for weights from 1e-30 to 1e37."""
    gen = _generator(3)
    for magnitude in (1e-30, 1.0, 1e20, 1e37):
        weight = (magnitude * torch.randn(6, 4, generator=gen)).float()
        predicted = torch.tensor([0, 2, 5])
        rows = distance_rows(weight, predicted, torch.float32, refine=True)
        w = weight.double()
        expected = torch.linalg.vector_norm(w[predicted][:, None] - w[None], dim=2)
        expected[torch.arange(3), predicted] = 1.0
        torch.testing.assert_close(rows.for_samples(predicted).double(), expected, rtol=1e-5,
                                   atol=0)


@pytest.mark.parametrize("magnitude", [1e20, 1e37, 1e-20])
def test_logitnorm_is_scale_invariant_fp32(magnitude):
    """LogitNorm of ``a z`` is LogitNorm of ``z`` (up to the norm's 1e-7): at 1e20 ``||z||^2``
    overflows fp32, which gave log C."""
    logits = torch.randn(8, 10, dtype=torch.float64)
    target = torch.randint(0, 10, (8,))
    scaled = (logits * magnitude).float().requires_grad_(True)
    loss = ef.logitnorm_loss(scaled, target, reduction="none", backend="torch")
    expected = logitnorm_reference(scaled.detach().double(), target, reduction="none")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    if magnitude > 1:
        at_one = logitnorm_reference(logits, target, reduction="none")
        torch.testing.assert_close(loss.double(), at_one, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss.sum(), scaled)
    _, expected_grad, terms = logitnorm_oracle(scaled, target, "sum", torch.tensor(1.0))
    assert_close_to_scale("grad", grad, expected_grad, rtol=1e-5, floor=FLOOR_32, per_row=True,
                          terms=terms)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_logits_give_nan_in_their_row_only(bad):
    """A NaN or infinite logit makes its row's loss NaN (as the reference does), and leaves the
    other rows' losses and logits gradients exact."""
    logits = torch.randn(5, 7, dtype=torch.float64)
    logits[2, 4] = bad
    logits.requires_grad_(True)
    weight = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 7, (5,))
    loss = ef.elogitnorm_loss(logits, weight, target, reduction="none", backend="torch")
    expected = elogitnorm_reference(logits.detach(), weight.detach(), target, reduction="none")
    assert loss[2].isnan() and expected[2].isnan()
    keep = torch.tensor([0, 1, 3, 4])
    torch.testing.assert_close(loss[keep], expected[keep], rtol=1e-10, atol=1e-12)
    (grad_logits,) = torch.autograd.grad(loss[keep].sum(), logits)
    ref = logits.detach().requires_grad_(True)
    (expected_grad,) = torch.autograd.grad(
        elogitnorm_reference(ref, weight.detach(), target, reduction="none")[keep].sum(), ref)
    torch.testing.assert_close(grad_logits[keep], expected_grad[keep], rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ the oracle itself


def test_float64_reference_is_an_oracle_where_the_tests_use_it():
    """The plain formula in float64 agrees with itself shifted by the row maximum (which the
    loss does not see) on the small-margin case, and gives log C on equal rows at 100."""
    gen = _generator(5)
    logits = (3 + 1e-3 * torch.randn(32, 3, generator=gen)).float().double()
    weight = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 3, (32,), generator=gen)
    plain = elogitnorm_reference(logits, weight, target, reduction="none")
    shifted = elogitnorm_reference(logits - logits.amax(1, keepdim=True), weight, target,
                                   reduction="none")
    torch.testing.assert_close(plain, shifted, rtol=1e-10, atol=1e-12)
    equal = elogitnorm_reference(torch.full((4, 10), 100.0, dtype=torch.float64),
                                 torch.randn(10, 8, generator=gen, dtype=torch.float64),
                                 torch.tensor([0, 1, 2, 3]), reduction="none")
    torch.testing.assert_close(equal, torch.full((4,), math.log(10), dtype=torch.float64),
                               rtol=1e-7, atol=0)
