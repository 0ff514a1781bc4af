"""The compiled ``cpu`` backend at extreme but finite inputs, against float64 references.

Both losses are computed in the inputs' precision, so squaring a float32 logit or weight above
about 1e19 overflows unless the kernel rescales first. These tests pin the range the kernels
handle exactly (float32: any finite logits, weights up to 1e30 in magnitude; float64 alike) with
hand-picked cases and with hypothesis over shapes (both the direct and the GEMM distance paths),
dtypes, logit offsets and scales, weight scales, ties, ignore_index and reductions.

The float64 reference is independent of the code under test: :func:`lean_elogitnorm`, the
formula of ``elogitnorm_reference`` (checked against it here) with the distance rows of the
predicted classes only, so that C in the thousands fits in memory.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import elogitnorm_fast as ef
from elogitnorm_fast.reference import (
    DEFAULT_EPS,
    elogitnorm_reference,
    logitnorm_reference,
)

pytestmark = pytest.mark.skipif(
    ef.unavailable_reason("cpu", "cpu") is not None, reason="the cpu backend is not built"
)

FLOAT32_MAX = torch.finfo(torch.float32).max
#: Relative tolerance: gradients are compared entry by entry against ``rtol * (|ref| + m)``,
#: m the sum of the magnitudes of the terms that make the entry (they may cancel).
RTOL = {torch.float32: 2e-4, torch.float64: 1e-9}
#: Rounding noise of the float64 references, relative to the largest entry of a row.
REFERENCE_NOISE = 1e-13
#: Gradient entries this small are below float32's normal range, where no float32 kernel can
#: be relatively exact.
UNDERFLOW = {torch.float32: 1e-36, torch.float64: 1e-290}


def lean_elogitnorm(logits, weight, target, *, reduction="mean", ignore_index=-100,
                    eps=DEFAULT_EPS, divisor="classes"):
    """ELogitNorm from the distance rows of the predicted classes only (N x C x D memory).

    The cross-entropy sees the logits shifted by their (detached) maximum, which changes
    nothing in exact arithmetic but keeps float64's rounding noise out of gradients that are 0
    (the gradient with respect to s of a row whose target ties with its maximum)."""
    classes = logits.shape[1]
    values, predicted = logits.max(dim=1)
    differences = weight[predicted][:, None, :] - weight[None, :, :]
    self_entry = F.one_hot(predicted, classes).to(weight.dtype)
    distances = (torch.linalg.vector_norm(differences, dim=2) + self_entry).clamp_min(eps)
    count = classes if divisor == "classes" else max(classes - 1, 1)
    # |v - z_j| rather than v - z_j: ties with the maximum get no gradient through s.
    scale = (torch.abs(logits - values[:, None]) / distances).sum(dim=1) / count
    shifted = logits - values.detach()[:, None]
    return F.cross_entropy(shifted / scale.clamp_min(eps)[:, None], target,
                           reduction=reduction, ignore_index=ignore_index)


def _upstream_per_row(grad, target, ignore_index, reduction):
    """g_n: the upstream gradient each row's loss receives (0 on ignored rows)."""
    valid = (target != ignore_index).double()
    if reduction == "none":
        return grad * valid
    if reduction == "mean":
        return grad * valid / valid.sum().clamp_min(1)
    return grad * valid


def elogitnorm_magnitudes(logits, weight, target, grad, *, reduction, ignore_index=-100,
                          eps=DEFAULT_EPS, divisor="classes"):
    """Sums of the absolute values of the terms that make up each gradient entry (float64).

    Float32 results carry an error relative to these, not to the entries themselves: terms
    cancel (with C = 2 every logits gradient is 0 in exact arithmetic, made of terms of size
    1 / s)."""
    z = logits.detach().double()
    w = weight.detach().double()
    rows, classes = z.shape
    values, predicted = z.max(dim=1)
    differences = w[predicted][:, None, :] - w[None, :, :]  # (N, C, D): w_m - w_j
    distances = torch.linalg.vector_norm(differences, dim=2)
    own = F.one_hot(predicted, classes).bool()
    distances = distances.masked_fill(own, 1.0)
    clamped_distances = distances.clamp_min(eps)
    margins = values[:, None] - z
    count = classes if divisor == "classes" else max(classes - 1, 1)
    raw = (margins / clamped_distances).sum(dim=1) / count
    scale = raw.clamp_min(eps)
    p = torch.softmax(-margins / scale[:, None], dim=1)
    onehot = F.one_hot(target.clamp(0, classes - 1), classes).double()
    g = _upstream_per_row(grad.double(), target, ignore_index, reduction).abs()
    t_y = (margins * onehot).sum(dim=1) / scale
    dscale = ((p * margins).sum(dim=1) / scale + t_y) / scale  # |ds| up to sign
    r = torch.where(raw < eps, torch.zeros_like(raw), dscale / count) * g
    below = (margins > 0).double() / clamped_distances
    mag_z = g[:, None] * (p + onehot) / scale[:, None] + r[:, None] * below
    mag_z = mag_z + own.double() * (r * below.sum(dim=1))[:, None]
    unclamped = (distances >= eps) & ~own
    safe = torch.where(unclamped, distances, torch.ones_like(distances))
    c = torch.where(unclamped, r[:, None] * margins / safe**3, torch.zeros_like(safe))
    # |w_m| + |w_j| rather than |w_m - w_j|: the GEMM form of the weight gradient multiplies P
    # with the rows themselves.
    spans = w[predicted].abs()[:, None, :] + w.abs()[None, :, :]
    contributions = c[:, :, None] * spans  # (N, C, D)
    mag_w = contributions.sum(dim=0)  # the j rows
    mag_w = mag_w.index_add(0, predicted, contributions.sum(dim=1))  # the predicted rows
    return mag_z, mag_w


def logitnorm_magnitudes(logits, target, grad, *, reduction, ignore_index=-100, tau=0.04):
    """Sums of the absolute values of the terms of each LogitNorm gradient entry (float64)."""
    z = logits.detach().double()
    classes = z.shape[1]
    norm = torch.linalg.vector_norm(z, dim=1)
    a = 1.0 / (tau * (norm + 1e-7))
    p = torch.softmax(z * a[:, None], dim=1)
    onehot = F.one_hot(target.clamp(0, classes - 1), classes).double()
    g = _upstream_per_row(grad.double(), target, ignore_index, reduction).abs()
    first = (p + onehot) * a[:, None]
    dot = ((p + onehot) * z.abs()).sum(dim=1)
    second = torch.where(norm > 0, a * dot / ((norm + 1e-7) * norm), torch.zeros_like(norm))
    return g[:, None] * (first + second[:, None] * z.abs())


def _assert_close(name, actual, expected, dtype, magnitude, per_row=True):
    """|actual - expected| <= rtol (|expected| + magnitude) + UNDERFLOW, entry by entry, plus
    the float64 reference's own rounding noise (relative to the largest entry of its row, or of
    the whole tensor where rows mix, as in the weight gradient)."""
    rtol = RTOL[dtype]
    actual = actual.double()
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite entries {actual}"
    size = expected.abs() + magnitude
    if not size.numel():
        row_size = size
    elif per_row and size.dim() > 1:
        row_size = size.amax(dim=-1, keepdim=True)
    else:
        row_size = size.max()
    bound = rtol * size + REFERENCE_NOISE * row_size + UNDERFLOW[dtype]
    error = (actual - expected).abs()
    if error.numel() and not bool((error <= bound).all()):
        worst = (error / bound).argmax()
        raise AssertionError(
            f"{name}: entry {worst.item()} is {actual.flatten()[worst].item()!r}, expected "
            f"{expected.flatten()[worst].item()!r} (terms of size "
            f"{magnitude.flatten()[worst].item():.3e})"
        )


def _loss_magnitude(target, ignore_index, reduction):
    """A row's loss is log(sum of exponentials, at least 1) plus a margin: its rounding error is
    absolute, about eps * 1, so a loss near 0 is not relatively exact (nor is F.cross_entropy's)."""
    valid = (target != ignore_index).double()
    if reduction == "none":
        return valid
    return valid.sum().clamp_min(1) if reduction == "sum" else torch.ones((), dtype=torch.float64)


def _upstream(loss, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(loss.shape, generator=generator, dtype=torch.float64) + 0.5)


def check_elogitnorm(logits, weight, target, *, reduction="mean", ignore_index=-100,
                     divisor="classes", eps=DEFAULT_EPS, reference=None):
    """Loss and both gradients of the cpu backend against a float64 reference on the same
    (already rounded) inputs."""
    dtype = logits.dtype
    z = logits.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    loss = ef.elogitnorm_loss(z, w, target, reduction=reduction, ignore_index=ignore_index,
                              divisor=divisor, eps=eps, backend="cpu")
    grad = _upstream(loss)
    grad_z, grad_w = torch.autograd.grad(loss, (z, w), grad.to(loss.dtype))
    ref_z = logits.detach().double().requires_grad_(True)
    ref_w = weight.detach().double().requires_grad_(True)
    expected = (reference or lean_elogitnorm)(ref_z, ref_w, target, reduction=reduction,
                                              ignore_index=ignore_index, divisor=divisor,
                                              eps=eps)
    ref_grad_z, ref_grad_w = torch.autograd.grad(expected, (ref_z, ref_w), grad)
    mag_z, mag_w = elogitnorm_magnitudes(logits, weight, target, grad, reduction=reduction,
                                         ignore_index=ignore_index, eps=eps, divisor=divisor)
    if reduction == "mean" and not bool((target != ignore_index).any()):
        assert torch.isnan(loss) and torch.isnan(expected)
    else:
        _assert_close("loss", loss, expected, dtype, _loss_magnitude(target, ignore_index,
                                                                     reduction))
    _assert_close("grad_logits", grad_z, ref_grad_z, dtype, mag_z)
    _assert_close("grad_weight", grad_w, ref_grad_w, dtype, mag_w, per_row=False)
    return loss, grad_z, grad_w


def check_logitnorm(logits, target, *, reduction="mean", ignore_index=-100, tau=0.04):
    dtype = logits.dtype
    z = logits.detach().clone().requires_grad_(True)
    loss = ef.logitnorm_loss(z, target, tau=tau, reduction=reduction, ignore_index=ignore_index,
                             backend="cpu")
    grad = _upstream(loss)
    (grad_z,) = torch.autograd.grad(loss, (z,), grad.to(loss.dtype))
    ref_z = logits.detach().double().requires_grad_(True)
    expected = logitnorm_reference(ref_z, target, tau=tau, reduction=reduction,
                                   ignore_index=ignore_index)
    (ref_grad_z,) = torch.autograd.grad(expected, (ref_z,), grad)
    magnitude = logitnorm_magnitudes(logits, target, grad, reduction=reduction,
                                     ignore_index=ignore_index, tau=tau)
    if reduction == "mean" and not bool((target != ignore_index).any()):
        assert torch.isnan(loss) and torch.isnan(expected)
    else:
        _assert_close("loss", loss, expected, dtype, _loss_magnitude(target, ignore_index,
                                                                     reduction))
    _assert_close("grad_logits", grad_z, ref_grad_z, dtype, magnitude)
    return loss, grad_z


def _case(n, c, d, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=generator, dtype=torch.float64)
    weight = torch.randn(c, d, generator=generator, dtype=torch.float64)
    target = torch.randint(0, c, (n,), generator=generator)
    return logits, weight, target


# ---------------------------------------------------------------------------------------------
# Hand-written examples.


def test_lean_reference_matches_the_all_pairs_reference():
    logits, weight, target = _case(9, 7, 5)
    target[2] = -100
    logits[3] = 1.5  # an all-equal row: s clamped
    logits[5, :3] = logits[5].max() + 1  # ties with the maximum
    weight[4] = weight[1]  # coincident weight rows: Delta clamped
    for reduction in ("mean", "sum", "none"):
        for divisor in ("classes", "paper"):
            a_z = logits.clone().requires_grad_(True)
            a_w = weight.clone().requires_grad_(True)
            b_z = logits.clone().requires_grad_(True)
            b_w = weight.clone().requires_grad_(True)
            a = lean_elogitnorm(a_z, a_w, target, reduction=reduction, divisor=divisor)
            b = elogitnorm_reference(b_z, b_w, target, reduction=reduction, divisor=divisor)
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
            grads_a = torch.autograd.grad(a.sum(), (a_z, a_w))
            grads_b = torch.autograd.grad(b.sum(), (b_z, b_w))
            for x, y in zip(grads_a, grads_b, strict=True):
                torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", [1e19, 1e20, 1e30, 1e38])
def test_logitnorm_is_scale_invariant_at_huge_float32_logits(scale):
    """||z||^2 overflows float32 above about 1e19: the loss must stay the one at scale 1
    (LogitNorm is scale invariant up to its 1e-7), not drop to log C."""
    logits, _, target = _case(6, 10, 1)
    logits = (logits / logits.abs().amax(dim=1, keepdim=True) * scale).float()
    loss, _ = check_logitnorm(logits, target, reduction="none")
    unit = ef.logitnorm_loss(logits.double() / scale, target, reduction="none", backend="cpu")
    torch.testing.assert_close(loss.double(), unit, rtol=1e-5, atol=0)
    assert (loss - math.log(10)).abs().min() > 1.0


def test_logitnorm_at_the_float32_limit_and_at_tiny_logits():
    logits, _, target = _case(5, 8, 1)
    huge = logits.clone()
    huge[:, 0] = FLOAT32_MAX
    huge[:, 1] = -FLOAT32_MAX
    check_logitnorm(huge.float(), target, reduction="sum")
    check_logitnorm((logits * 1e-30).float(), target, reduction="sum")


@pytest.mark.parametrize("scale", [1e20, 1e30, 1e36, 1e38])
def test_elogitnorm_at_huge_float32_logits(scale):
    """s and its gradient scale with the logits: nothing may overflow up to float32's limit."""
    logits, weight, target = _case(6, 10, 5)
    logits = (logits / logits.abs().amax() * scale).float()
    check_elogitnorm(logits, weight.float(), target, reduction="none")


@pytest.mark.parametrize("weight_scale", [1.0, 1e-3])
def test_elogitnorm_at_the_float32_limit(weight_scale):
    """Margins up to twice float32's largest value, and margin / Delta far above it."""
    logits, weight, target = _case(6, 10, 5)
    logits[:, 0] = FLOAT32_MAX
    logits[:, 1] = -FLOAT32_MAX
    logits[:3, 2:] *= 1e37
    check_elogitnorm(logits.float(), (weight * weight_scale).float(), target, reduction="none")


def test_elogitnorm_all_equal_rows_of_huge_logits_give_log_c():
    logits = torch.full((4, 10), 3e38)
    weight = torch.randn(10, 5)
    target = torch.tensor([0, 1, 2, 3])
    loss = ef.elogitnorm_loss(logits, weight, target, reduction="none", backend="cpu")
    torch.testing.assert_close(loss, torch.full((4,), math.log(10)))


def test_elogitnorm_full_logits_give_log_c():
    """All-equal logits: s is clamped, every class equally likely."""
    loss = ef.elogitnorm_loss(torch.full((4, 10), 100.0), torch.randn(10, 5),
                              torch.tensor([0, 1, 2, 3]), backend="cpu")
    assert abs(loss.item() - math.log(10)) < 1e-6


def test_elogitnorm_small_margins_over_a_large_offset():
    """Logits 3 + 1e-3 * randn with C = 3: the max shift must keep the gradient exact."""
    generator = torch.Generator().manual_seed(3)
    logits = 3 + 1e-3 * torch.randn(16, 3, generator=generator, dtype=torch.float64)
    weight = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 3, (16,), generator=generator)
    z = logits.float().requires_grad_(True)
    loss = ef.elogitnorm_loss(z, weight.float(), target, backend="cpu")
    (grad,) = torch.autograd.grad(loss, z)
    ref_z = z.detach().double().requires_grad_(True)
    (expected,) = torch.autograd.grad(
        elogitnorm_reference(ref_z, weight.float().double(), target), ref_z)
    assert ((grad.double() - expected).norm() / expected.norm()).item() < 1e-6


@pytest.mark.parametrize("n,c,d", [(6, 10, 5), (7, 5000, 64)])
@pytest.mark.parametrize("scale", [1e13, 1e19, 1e20, 1e30])
def test_elogitnorm_at_huge_float32_weights(n, c, d, scale):
    """Distances from squared weights overflow float32 above about 1e19 (direct differences and
    the GEMM form ||a||^2 + ||b||^2 - 2 a.b alike), and Delta^3 in the weight gradient above
    about 1e12. Logits of comparable size keep s off its clamp, so every term matters."""
    logits, weight, target = _case(n, c, d)
    logits = (logits * scale).float()
    weight = (weight * scale).float()
    check_elogitnorm(logits, weight, target, reduction="sum")


@pytest.mark.parametrize("n,c,d", [(6, 10, 5), (7, 5000, 64)])
def test_elogitnorm_at_tiny_float32_weights_with_small_eps(n, c, d):
    """Squared distances of weights near 1e-25 underflow float32: with an eps below them the
    distances still count."""
    logits, weight, target = _case(n, c, d)
    check_elogitnorm((logits * 1e-25).float(), (weight * 1e-25).float(), target,
                     reduction="sum", eps=1e-30)


def test_elogitnorm_huge_float64_inputs():
    """The float64 reference itself overflows (s^2) beyond about 1e150, so logits at 1e300 are
    checked through the scale invariance: the loss and the weight gradient are those at scale
    1, the logits gradient is theirs divided by the scale."""
    logits, weight, target = _case(6, 10, 5)
    check_elogitnorm(logits * 1e100, weight * 1e-20, target, reduction="none")
    check_elogitnorm(logits * 1e-20, weight * 1e100, target, reduction="none")
    scale = 2.0**1000
    z = logits.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss = ef.elogitnorm_loss(z * scale, w, target, reduction="none", backend="cpu")
    grad_z, grad_w = torch.autograd.grad(loss.sum(), (z, w))  # chain rule gives d/dz of the op
    ref_z = logits.clone().requires_grad_(True)
    ref_w = weight.clone().requires_grad_(True)
    expected = elogitnorm_reference(ref_z, ref_w, target, reduction="none")
    ref_grad_z, ref_grad_w = torch.autograd.grad(expected.sum(), (ref_z, ref_w))
    ones = torch.ones_like(expected)
    _assert_close("loss", loss, expected, torch.float64, ones)
    mag_z, mag_w = elogitnorm_magnitudes(logits, weight, target, ones, reduction="none")
    _assert_close("grad_logits", grad_z, ref_grad_z, torch.float64, mag_z)
    _assert_close("grad_weight", grad_w, ref_grad_w, torch.float64, mag_w, per_row=False)


def test_logitnorm_huge_float64_logits():
    logits, _, target = _case(6, 10, 1)
    z = logits.clone().requires_grad_(True)
    loss = ef.logitnorm_loss(z * 2.0**1000, target, reduction="none", backend="cpu")
    (grad,) = torch.autograd.grad(loss.sum(), z)
    ref_z = logits.clone().requires_grad_(True)
    # At scale 2^1000 the norm's 1e-7 is negligible: the reference without it.
    expected = F.cross_entropy(ref_z / (0.04 * torch.linalg.vector_norm(ref_z, dim=1,
                                                                        keepdim=True)),
                               target, reduction="none")
    (ref_grad,) = torch.autograd.grad(expected.sum(), ref_z)
    ones = torch.ones_like(expected)
    _assert_close("loss", loss, expected, torch.float64, ones)
    _assert_close("grad_logits", grad, ref_grad, torch.float64,
                  logitnorm_magnitudes(logits, target, ones, reduction="none"))


# ---------------------------------------------------------------------------------------------
# Property-based parity. Shapes reach the GEMM distance path (U * C * D > 2^18) and both of its
# weight-gradient forms (C <= 2U and C > 2U).

LOG10_MAX = math.log10(FLOAT32_MAX)


def _with_magnitude(values, exponent):
    """``values`` rescaled so that their largest magnitude is 10**exponent (below float32's
    largest finite value when the exponent is LOG10_MAX)."""
    largest = values.abs().max()
    if largest == 0:
        return values
    return values / largest * min(10.0**exponent, FLOAT32_MAX)


SHAPES = st.one_of(
    st.tuples(st.integers(1, 12), st.integers(1, 40), st.integers(1, 24)),
    st.tuples(st.integers(3, 10), st.integers(300, 700), st.integers(60, 90)),
    st.tuples(st.integers(40, 70), st.integers(40, 70), st.integers(100, 140)),
)


@st.composite
def elogitnorm_cases(draw):
    n, c, d = draw(SHAPES)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    # float32: up to its largest finite value; float64: where the float64 reference's own s^2
    # and squared distances stay finite. The listed values are the edges of what a float32
    # formula without rescaling survives.
    top = LOG10_MAX if dtype == torch.float32 else 100
    logit_exponent = draw(st.one_of(st.sampled_from([-20.0, 0.0, 13.0, 19.5, 30.0, top]),
                                    st.floats(-20, top)))
    top = 30 if dtype == torch.float32 else 100
    weight_exponent = draw(st.one_of(st.sampled_from([-20.0, 0.0, 13.0, 19.5, top]),
                                     st.floats(-20, top)))
    offset = draw(st.sampled_from([0.0, 1.0, -1e3]))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=generator, dtype=torch.float64)
    if draw(st.booleans()):  # integer logits: ties with the maximum
        logits = torch.randint(-2, 3, (n, c), generator=generator).double()
    logits = _with_magnitude(logits + offset, logit_exponent)
    weight = torch.randn(c, d, generator=generator, dtype=torch.float64)
    weight = weight * 10.0 ** weight_exponent
    if c > 2 and draw(st.booleans()):
        weight[c // 2] = weight[0]  # coincident rows: Delta clamped
    target = torch.randint(0, c, (n,), generator=generator)
    if draw(st.booleans()):
        target[::3] = -100
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    return logits.to(dtype), weight.to(dtype), target, reduction


def _extreme_case(n, c, d, logit_exponent, weight_exponent, reduction):
    logits, weight, target = _case(n, c, d, seed=n * c)
    return (_with_magnitude(logits, logit_exponent).float(),
            _with_magnitude(weight, weight_exponent).float(), target, reduction)


# A fixed seed (derandomize) keeps the examples, and so the suite's outcome, the same from run to
# run; the explicit examples pin the GEMM path at the float32 edges.
@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(elogitnorm_cases())
@example(_extreme_case(7, 600, 64, 20.0, 20.0, "sum"))
@example(_extreme_case(9, 500, 70, LOG10_MAX, 0.0, "none"))
@example(_extreme_case(50, 60, 120, 13.0, 13.0, "mean"))
def test_elogitnorm_matches_float64_reference_property(case):
    logits, weight, target, reduction = case
    check_elogitnorm(logits, weight, target, reduction=reduction)


@st.composite
def logitnorm_cases(draw):
    n = draw(st.integers(1, 16))
    c = draw(st.integers(1, 300))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    top = LOG10_MAX if dtype == torch.float32 else 140
    exponent = draw(st.one_of(st.sampled_from([-30.0, 0.0, 19.5, top]), st.floats(-30, top)))
    offset = draw(st.sampled_from([0.0, 1.0, -1e3]))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=generator, dtype=torch.float64)
    if draw(st.booleans()):
        logits = torch.randint(-2, 3, (n, c), generator=generator).double()
    logits = _with_magnitude(logits + offset, exponent)
    target = torch.randint(0, c, (n,), generator=generator)
    if draw(st.booleans()):
        target[::3] = -100
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    return logits.to(dtype), target, reduction


@settings(max_examples=60, deadline=None, derandomize=True)
@given(logitnorm_cases())
def test_logitnorm_matches_float64_reference_property(case):
    logits, target, reduction = case
    check_logitnorm(logits, target, reduction=reduction)
