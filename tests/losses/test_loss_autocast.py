"""Under autocast both losses return what ``F.cross_entropy`` returns there: float32 for float16
/ bfloat16 logits, computed in float32 from the 16-bit logits (not a 16-bit loss cast up), the
logits' gradient in their own dtype; autocast never lowers the precision of a backend's own
matrix products. Outside autocast the loss keeps the logits' dtype.

The CPU backends run here under ``torch.autocast("cpu")``; the ``triton`` backend's eager paths
under the Triton interpreter in ``tests/triton/test_autocast_interpreted.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import elogitnorm_fast as ef
from elogitnorm_fast.reference import (
    DEFAULT_TAU,
    elogitnorm_reference,
    elogitnorm_scale_reference,
    logitnorm_reference,
)

REDUCTIONS = ("mean", "sum", "none")
#: The loss in float32 from the same 16-bit logits against float64: the parity bounds.
RTOL, ATOL = 2e-4, 2e-6


def _call(backend, kind):
    if kind == "elogitnorm":
        return lambda z, w, y, r: ef.elogitnorm_loss(z, w, y, reduction=r, backend=backend)
    return lambda z, w, y, r: ef.logitnorm_loss(z, y, reduction=r, backend=backend)


def check_autocast(call, kind, *, shape=(6, 5, 8), reduction="mean", amp=torch.bfloat16,
                   logits_dtype=None, backward_inside=False, seed=0):
    """A classifier head under ``torch.autocast("cpu", amp)`` feeds ``call``: the loss has
    ``F.cross_entropy``'s dtype there and the float64 reference's value for the same logits;
    the logits' gradient has their dtype, the weight's (a float32 parameter) float32."""
    n, c, d = shape
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=generator)
    weight = torch.randn(c, d, generator=generator).requires_grad_(True)
    target = torch.randint(0, c, (n,), generator=generator)
    with torch.autocast("cpu", dtype=amp):
        logits = F.linear(features, weight) * 2
        if logits_dtype is not None:
            logits = logits.to(logits_dtype)
        # A leaf, so that the weight's gradient is the loss's own (not the head's as well).
        logits = logits.detach().requires_grad_(True)
        loss = call(logits, weight, target, reduction)
        assert loss.dtype == F.cross_entropy(logits, target, reduction=reduction).dtype
        inputs = (logits, weight) if kind == "elogitnorm" else (logits,)
        upstream = torch.rand(loss.shape, generator=generator, dtype=torch.float64) + 0.5
        if backward_inside:
            grads = torch.autograd.grad(loss, inputs, upstream.to(loss.dtype))
    if not backward_inside:
        grads = torch.autograd.grad(loss, inputs, upstream.to(loss.dtype))
    ref_logits = logits.detach().double().requires_grad_(True)
    ref_weight = weight.detach().double().requires_grad_(True)
    if kind == "elogitnorm":
        expected = elogitnorm_reference(ref_logits, ref_weight, target, reduction=reduction)
    else:
        expected = logitnorm_reference(ref_logits, target, reduction=reduction)
    torch.testing.assert_close(loss.double(), expected, rtol=RTOL, atol=ATOL)
    expected_grads = torch.autograd.grad(expected, (ref_logits, ref_weight)[:len(inputs)],
                                         upstream)
    assert grads[0].dtype == logits.dtype
    # The logits' gradient: float32 arithmetic on terms of size g / s (they cancel exactly for
    # C = 2, where the loss does not depend on the logits), then one rounding to the logits'
    # dtype (8 significant bits for bfloat16).
    if kind == "elogitnorm":
        scales = elogitnorm_scale_reference(ref_logits.detach(), ref_weight.detach())
    else:
        scales = DEFAULT_TAU * (torch.linalg.vector_norm(ref_logits.detach(), dim=1) + 1e-7)
    terms = upstream.max().item() / scales.min().item()
    bits = {torch.bfloat16: 8, torch.float16: 11}.get(logits.dtype, 22)
    largest = expected_grads[0].abs().max().item()
    torch.testing.assert_close(grads[0].double(), expected_grads[0], rtol=2.0 ** -bits,
                               atol=largest * 2.0 ** -bits + ATOL * terms)
    if kind == "elogitnorm":
        assert grads[1].dtype == torch.float32
        torch.testing.assert_close(grads[1].double(), expected_grads[1], rtol=RTOL,
                                   atol=ATOL * max(1.0, expected_grads[1].abs().max().item()))


CPU_BACKENDS = [name for name in ("reference", "torch", "cpu", "auto")
                if name == "auto" or name in ef.available_backends("cpu")]
#: The reference backend divides z by s as the formula does, which in float32 loses
#: digits where s is small against z: the random cases check the other backends' values.
FAST_BACKENDS = [name for name in CPU_BACKENDS if name != "reference"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["elogitnorm", "logitnorm"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bfloat16_autocast_gives_a_float32_loss_like_cross_entropy(backend, kind,
                                                                   reduction):
    check_autocast(_call(backend, kind), kind, reduction=reduction)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_outside_autocast_the_loss_keeps_the_logits_dtype(backend):
    logits = torch.randn(4, 3).to(torch.bfloat16)
    weight, target = torch.randn(3, 2), torch.tensor([0, 1, 2, 0])
    assert ef.elogitnorm_loss(logits, weight, target, backend=backend).dtype == torch.bfloat16
    assert ef.logitnorm_loss(logits, target, backend=backend).dtype == torch.bfloat16


@settings(max_examples=30, deadline=None)
@given(
    backend=st.sampled_from(FAST_BACKENDS),
    kind=st.sampled_from(["elogitnorm", "logitnorm"]),
    reduction=st.sampled_from(REDUCTIONS),
    amp=st.sampled_from([torch.bfloat16, torch.float16]),
    logits_dtype=st.sampled_from([None, torch.float32, torch.float64]),
    shape=st.tuples(st.integers(1, 9), st.sampled_from([1, 2, 7, 130]), st.integers(1, 40)),
    backward_inside=st.booleans(),
    seed=st.integers(0, 2 ** 16),
)
def test_any_autocast_case_matches_cross_entropy_dtype_and_the_reference(
        backend, kind, reduction, amp, logits_dtype, shape, backward_inside, seed):
    check_autocast(_call(backend, kind), kind, shape=shape, reduction=reduction, amp=amp,
                   logits_dtype=logits_dtype, backward_inside=backward_inside, seed=seed)
