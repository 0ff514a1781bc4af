"""Every backend returns a loss that ordinary training code may change: in place (``/=`` for
gradient accumulation, ``*=``, ``+=``, ``-=``), scaled, added to another loss, or handed to a
``GradScaler``, with the gradients of the float64 reference put through the same code.

The CPU backends run here; the ``triton`` backend's paths run on CPU tensors under the Triton
interpreter in ``tests/triton/test_in_place_interpreted.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import elogitnorm_fast as ef
from elogitnorm_fast.reference import (
    elogitnorm_reference,
    logitnorm_reference,
)

REDUCTIONS = ("mean", "sum", "none")
OPS = ("/=", "*=", "+=", "-=", "scale", "add loss")
#: fp32 losses against the float64 reference (the bounds of the backends' parity tests).
RTOL, ATOL = 2e-4, 2e-6


def _apply(loss, ops, logits, target):
    """``ops`` applied to ``loss`` the way training code writes them."""
    for op in ops:
        if op == "/=":
            loss /= 4.0
        elif op == "*=":
            loss *= 0.5
        elif op == "+=":
            loss += 1.5
        elif op == "-=":
            loss -= 0.25
        elif op == "scale":
            loss = loss * 3.0
        else:  # another loss on the same logits, of the same shape
            reduction = "none" if loss.dim() else "sum"
            loss = loss + F.cross_entropy(logits, target, reduction=reduction)
    return loss


def _case(n, c, d, *, dtype=torch.float32, logits_grad=True, weight_grad=True, ignored=False,
          generator=None):
    logits = (torch.randn(n, c, generator=generator, dtype=torch.float64) * 3).to(dtype)
    weight = torch.randn(c, d, generator=generator, dtype=torch.float64).to(dtype)
    target = torch.randint(0, c, (n,), generator=generator)
    if ignored:
        target[1::3] = -100
    return logits.requires_grad_(logits_grad), weight.requires_grad_(weight_grad), target


def _reference(kind, logits, weight, target, reduction):
    if kind == "elogitnorm":
        return elogitnorm_reference(logits, weight, target, reduction=reduction)
    return logitnorm_reference(logits, target, reduction=reduction)


def check_ops(call, kind, logits, weight, target, reduction, ops, *, rtol=RTOL, atol=ATOL,
              generator=None):
    """``call(logits, weight, target, reduction)`` then ``ops``: its value and the gradients of
    every input that requires grad (for a random upstream gradient drawn from ``generator``)
    equal the float64 reference's after the same ``ops``."""
    loss = _apply(call(logits, weight, target, reduction), ops, logits, target)
    ref_logits = logits.detach().double().requires_grad_(logits.requires_grad)
    ref_weight = weight.detach().double().requires_grad_(weight.requires_grad)
    expected = _apply(_reference(kind, ref_logits, ref_weight, target, reduction), ops,
                      ref_logits, target)
    torch.testing.assert_close(loss.double(), expected, rtol=rtol, atol=atol, equal_nan=True)
    inputs = [x for x in (logits, weight) if x.requires_grad and (kind == "elogitnorm"
                                                                  or x is logits)]
    if not inputs:
        return
    refs = [ref_logits if x is logits else ref_weight for x in inputs]
    upstream = torch.rand(loss.shape, dtype=torch.float64, generator=generator) + 0.5
    grads = torch.autograd.grad(loss, inputs, upstream.to(loss.dtype))
    expected_grads = torch.autograd.grad(expected, refs, upstream)
    for grad, want, x in zip(grads, expected_grads, inputs, strict=True):
        assert grad.dtype == x.dtype
        # float32 rounding is relative to the gradient's size, which the ops scale (81 x).
        size = max(1.0, want.abs().max().item())
        torch.testing.assert_close(grad.double(), want, rtol=rtol, atol=atol * size)


def _public(backend, kind):
    if kind == "elogitnorm":
        return lambda z, w, y, r: ef.elogitnorm_loss(z, w, y, reduction=r, backend=backend)
    return lambda z, w, y, r: ef.logitnorm_loss(z, y, reduction=r, backend=backend)


def _grad_scaler_step(backend, enabled, generator):
    """Two micro-batches accumulated through ``loss /= steps`` and a GradScaler; returns the
    unscaled gradients and the float64 reference's."""
    logits, weight, _ = _case(6, 5, 3, generator=generator)
    logits, weight = torch.nn.Parameter(logits.detach()), torch.nn.Parameter(weight.detach())
    targets = [torch.randint(0, 5, (6,), generator=generator) for _ in range(2)]
    optimizer = torch.optim.SGD([logits, weight], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, enabled=enabled)
    ref_logits = logits.detach().double().requires_grad_(True)
    ref_weight = weight.detach().double().requires_grad_(True)
    expected = 0
    for target in targets:
        loss = ef.elogitnorm_loss(logits, weight, target, backend=backend)
        loss /= len(targets)
        other = ef.logitnorm_loss(logits, target, backend=backend)
        other *= 1.0 / len(targets)
        scaler.scale(loss + other).backward()
        expected = expected + (elogitnorm_reference(ref_logits, ref_weight, target)
                               + logitnorm_reference(ref_logits, target)) / len(targets)
    scaler.unscale_(optimizer)
    got = (logits.grad.clone(), weight.grad.clone())
    scaler.step(optimizer)
    scaler.update()
    return got, torch.autograd.grad(expected, (ref_logits, ref_weight))


def check_grad_scaler(backend, generator=None, enabled_values=(True, False)):
    """Gradients through a GradScaler with each of ``enabled_values`` (its ``enabled``) equal the
    float64 reference's."""
    for enabled in enabled_values:
        got, expected = _grad_scaler_step(backend, enabled, generator)
        for grad, want in zip(got, expected, strict=True):
            torch.testing.assert_close(grad.double(), want, rtol=RTOL, atol=ATOL)


CPU_BACKENDS = [name for name in ("reference", "torch", "cpu", "auto")
                if name == "auto" or name in ef.available_backends("cpu")]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["elogitnorm", "logitnorm"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradient_accumulation_divides_in_place(backend, kind, reduction):
    logits, weight, target = _case(7, 5, 3)
    check_ops(_public(backend, kind), kind, logits, weight, target, reduction, ["/="])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_scaler_with_accumulation(backend):
    check_grad_scaler(backend)


@settings(max_examples=25, deadline=None)
@given(
    backend=st.sampled_from(CPU_BACKENDS),
    kind=st.sampled_from(["elogitnorm", "logitnorm"]),
    reduction=st.sampled_from(REDUCTIONS),
    ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=4),
    shape=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 5)),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    grads=st.sampled_from([(True, True), (True, False), (False, True)]),
    ignored=st.booleans(),
    seed=st.integers(0, 2 ** 16),
)
def test_any_in_place_sequence_matches_the_reference(backend, kind, reduction, ops, shape,
                                                      dtype, grads, ignored, seed):
    n, c, d = shape
    generator = torch.Generator().manual_seed(seed)
    logits, weight, target = _case(n, c, d, dtype=dtype, logits_grad=grads[0],
                                   weight_grad=grads[1], ignored=ignored and n > 1,
                                   generator=generator)
    check_ops(_public(backend, kind), kind, logits, weight, target, reduction, ops,
              generator=generator)
