"""The loss API checks every option before any work: one-line errors that name the argument and
the value, at construction for the modules, at each call for what depends on the logits' dtype.

Accepted values give a finite answer equal to the float64 reference: ``eps`` and ``tau`` are
accepted where they are normal numbers of the dtype the loss computes in (float32 for float16,
bfloat16 and float32 logits, float64 where the logits or the weight are float64).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import elogitnorm_fast as ef
from elogitnorm_fast.reference import elogitnorm_reference, logitnorm_reference

CPU_BACKENDS = [name for name in ("reference", "torch", "cpu") if name in
                ef.available_backends("cpu")]
#: The backends that compute with the margins ``v - z`` (not ``z / s``, which loses ``log C``
#: against ``z / eps`` when ``s`` is clamped at a small ``eps``): their values are checked at
#: every accepted ``eps``; the reference backend only for the rejections.
FAST_BACKENDS = [name for name in CPU_BACKENDS if name != "reference"]
INT64 = (-(2 ** 63), 2 ** 63 - 1)


def _inputs(n=5, c=4, d=3, dtype=torch.float32):
    return (torch.randn(n, c, dtype=dtype), torch.randn(c, d, dtype=dtype),
            torch.randint(0, c, (n,)))


def _compute_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _accepted(value, dtype) -> bool:
    """The documented rule, written independently of the package: a normal number of ``dtype``
    (finite, at least its smallest normal, at most its largest)."""
    info = torch.finfo(dtype)
    return math.isfinite(value) and info.tiny <= value <= info.max


# ---------------------------------------------------------------- backend names


@pytest.mark.parametrize("module", [ef.ELogitNormLoss, ef.LogitNormLoss])
@pytest.mark.parametrize("backend, error", [("foo", ValueError), ("CPU", ValueError),
                                            (3, TypeError), (None, TypeError),
                                            (["cpu"], TypeError)])
def test_module_rejects_an_unknown_backend_at_construction(module, backend, error):
    with pytest.raises(error, match=r"backend must be 'auto' or one of .*" +
                       re.escape(repr(backend))):
        module(backend=backend)


def test_functional_form_rejects_an_unhashable_backend_by_name():
    logits, weight, target = _inputs()
    with pytest.raises(TypeError, match=r"backend must be .*\['cpu'\]"):
        ef.elogitnorm_loss(logits, weight, target, backend=["cpu"])
    with pytest.raises(TypeError, match=r"backend must be .*\['cpu'\]"):
        ef.logitnorm_loss(logits, target, backend=["cpu"])


def test_known_backend_unavailable_here_still_constructs():
    """Availability is a property of the device a call runs on, decided per call."""
    module = ef.ELogitNormLoss(backend="cuda")
    logits, weight, target = _inputs()
    if "cuda" not in ef.available_backends("cpu"):
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available on cpu"):
            module(logits, weight, target)


# ---------------------------------------------------------------- ignore_index


@pytest.mark.parametrize("bad, error", [(2 ** 63, ValueError), (-(2 ** 63) - 1, ValueError),
                                        (10 ** 30, ValueError), (True, TypeError),
                                        (-100.0, TypeError), ("-100", TypeError),
                                        (None, TypeError)])
def test_ignore_index_outside_int64_or_not_an_int_is_named(bad, error):
    logits, weight, target = _inputs()
    pattern = r"ignore_index must be an integer in \[-2\*\*63, 2\*\*63\).*" + \
        re.escape(repr(bad))
    with pytest.raises(error, match=pattern):
        ef.elogitnorm_loss(logits, weight, target, ignore_index=bad)
    with pytest.raises(error, match=pattern):
        ef.logitnorm_loss(logits, target, ignore_index=bad)
    with pytest.raises(error, match=pattern):
        ef.ELogitNormLoss(ignore_index=bad)
    with pytest.raises(error, match=pattern):
        ef.LogitNormLoss(ignore_index=bad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("ignore_index", [INT64[0], INT64[1], np.int64(-100), np.int32(2)])
def test_ignore_index_anywhere_in_int64_works(backend, ignore_index):
    logits, weight, target = _inputs(6, 4, 3, dtype=torch.float64)
    target[::2] = int(ignore_index)
    expected = elogitnorm_reference(logits, weight, target, ignore_index=int(ignore_index))
    loss = ef.elogitnorm_loss(logits, weight, target, ignore_index=ignore_index, backend=backend)
    torch.testing.assert_close(loss, expected)
    expected = logitnorm_reference(logits, target, ignore_index=int(ignore_index))
    module = ef.LogitNormLoss(ignore_index=ignore_index, backend=backend)
    torch.testing.assert_close(module(logits, target), expected)


# ---------------------------------------------------------------- eps and tau


@pytest.mark.parametrize("name", ["eps", "tau"])
@pytest.mark.parametrize("bad, error", [(0.0, ValueError), (-1e-6, ValueError),
                                        (float("nan"), ValueError), (float("inf"), ValueError),
                                        ("1e-6", TypeError), (True, TypeError),
                                        (None, TypeError)])
def test_eps_and_tau_must_be_finite_positive_numbers(name, bad, error):
    module = ef.ELogitNormLoss if name == "eps" else ef.LogitNormLoss
    pattern = rf"{name} must be a finite number > 0, got " + re.escape(repr(bad))
    with pytest.raises(error, match=pattern):
        module(**{name: bad})
    logits, weight, target = _inputs()
    with pytest.raises(error, match=pattern):
        if name == "eps":
            ef.elogitnorm_loss(logits, weight, target, eps=bad)
        else:
            ef.logitnorm_loss(logits, target, tau=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_eps_that_is_zero_in_float32_is_rejected_naming_the_dtype(dtype):
    """float32(1e-50) == 0: the clamp s >= eps would not hold, and all-equal rows gave NaN."""
    logits, weight, target = _inputs()
    logits = logits.to(dtype)
    criterion = ef.ELogitNormLoss(eps=1e-50)  # fine until the dtype is known
    pattern = r"eps must lie in \[1.17549.*e-38, 3.40282.*e\+38\].*float32.*got 1e-50"
    for call in (lambda: criterion(logits, weight, target),
                 lambda: ef.elogitnorm_loss(logits, weight, target, eps=1e-50)):
        with pytest.raises(ValueError, match=pattern):
            call()
    with pytest.raises(ValueError, match=r"tau must lie in .*float32.*got 1e-50"):
        ef.logitnorm_loss(logits, target, tau=1e-50)
    with pytest.raises(ValueError, match=r"eps must lie in .*float32.*got 1e\+39"):
        ef.elogitnorm_loss(logits, weight, target, eps=1e39)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_eps_normal_in_float64_is_accepted_for_float64_inputs(backend):
    logits, weight, target = _inputs(dtype=torch.float64)
    logits[0] = 1.5  # all equal: s is clamped at eps
    loss = ef.elogitnorm_loss(logits, weight, target, eps=1e-50, reduction="none",
                              backend=backend)
    torch.testing.assert_close(loss[0], torch.tensor(math.log(4), dtype=torch.float64))
    expected = elogitnorm_reference(logits[1:], weight, target[1:], eps=1e-50, reduction="none")
    torch.testing.assert_close(loss[1:], expected)
    # float32 logits with a float64 weight compute in float64 too.
    loss = ef.elogitnorm_loss(logits.float(), weight, target, eps=1e-50, backend=backend)
    assert torch.isfinite(loss)


# ---------------------------------------------------------------- reduction, divisor


@pytest.mark.parametrize("bad", [None, 1, "MEAN", ["mean"], b"mean"])
def test_reduction_of_any_wrong_value_or_type_is_named(bad):
    logits, weight, target = _inputs()
    pattern = r"reduction must be one of \('mean', 'sum', 'none'\), got " + \
        re.escape(repr(bad))
    with pytest.raises(ValueError, match=pattern):
        ef.elogitnorm_loss(logits, weight, target, reduction=bad)
    with pytest.raises(ValueError, match=pattern):
        ef.LogitNormLoss(reduction=bad)


@pytest.mark.parametrize("bad", [None, 5, "C-1", ["paper"]])
def test_divisor_of_any_wrong_value_or_type_is_named(bad):
    logits, weight, target = _inputs()
    pattern = r"divisor must be one of \('classes', 'paper'\), got " + \
        re.escape(repr(bad))
    with pytest.raises(ValueError, match=pattern):
        ef.elogitnorm_loss(logits, weight, target, divisor=bad)
    with pytest.raises(ValueError, match=pattern):
        ef.ELogitNormLoss(divisor=bad)


# ---------------------------------------------------------------- properties

_ANY_FLOAT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=1e-320, max_value=1e-30),
    st.floats(min_value=1e30, max_value=1e320),
    st.sampled_from([1.1754943508222875e-38, 1.1754942e-38, 3.4028234663852886e38, 3.5e38,
                     2.2250738585072014e-308, 1e-6]),
)


@settings(max_examples=40, deadline=None)
@given(eps=_ANY_FLOAT, backend=st.sampled_from(FAST_BACKENDS),
       dtypes=st.sampled_from([(torch.float32, torch.float32), (torch.float64, torch.float64),
                               (torch.bfloat16, torch.float32), (torch.float32, torch.float64)]),
       seed=st.integers(0, 2 ** 16))
def test_any_eps_is_either_rejected_by_name_or_gives_the_reference(eps, backend, dtypes, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 4, generator=generator, dtype=torch.float64).to(dtypes[0])
    weight = torch.randn(4, 3, generator=generator, dtype=torch.float64).to(dtypes[1])
    logits[0] = 1.5  # an all-equal row: s is clamped at eps, the loss is log C exactly
    target = torch.randint(0, 4, (5,), generator=generator)
    logits.requires_grad_(True)
    weight.requires_grad_(True)
    if not _accepted(eps, _compute_dtype(logits, weight)):
        with pytest.raises(ValueError, match=r"eps must "):
            ef.elogitnorm_loss(logits, weight, target, eps=eps, backend=backend)
        return
    loss = ef.elogitnorm_loss(logits, weight, target, eps=eps, reduction="none", backend=backend)
    expected = elogitnorm_reference(logits.detach()[1:].double(), weight.detach().double(),
                                    target[1:], eps=eps, reduction="none")
    expected = torch.cat([torch.tensor([math.log(4)], dtype=torch.float64), expected])
    # bfloat16 keeps 8 bits of the loss; otherwise the fp32 parity bounds.
    rtol, atol = (1e-2, 1e-2) if logits.dtype == torch.bfloat16 else (2e-4, 2e-6)
    torch.testing.assert_close(loss.double(), expected, rtol=rtol, atol=atol)
    # No NaN; a gradient beyond the logits' dtype (1 / eps on the clamped row, float32 logits
    # with a float64 weight) rounds to inf as any overflow does.
    grads = torch.autograd.grad(loss.sum(), (logits, weight))
    assert not any(torch.isnan(grad).any() for grad in grads)


@settings(max_examples=30, deadline=None)
@given(tau=_ANY_FLOAT, backend=st.sampled_from(CPU_BACKENDS),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2 ** 16))
def test_any_tau_is_either_rejected_by_name_or_gives_the_reference(tau, backend, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 4, generator=generator, dtype=torch.float64).to(dtype)
    target = torch.randint(0, 4, (5,), generator=generator)
    if not _accepted(tau, dtype):
        with pytest.raises(ValueError, match=r"tau must "):
            ef.logitnorm_loss(logits, target, tau=tau, backend=backend)
        return
    loss = ef.logitnorm_loss(logits, target, tau=tau, reduction="none", backend=backend)
    expected = logitnorm_reference(logits.double(), target, tau=tau, reduction="none")
    torch.testing.assert_close(loss.double(), expected, rtol=2e-4, atol=2e-6)


@settings(max_examples=30, deadline=None)
@given(ignore_index=st.one_of(st.integers(-(2 ** 70), 2 ** 70), st.booleans(),
                              st.floats(allow_nan=False), st.text(max_size=3)),
       backend=st.sampled_from(CPU_BACKENDS))
def test_any_ignore_index_is_either_rejected_by_name_or_ignores_its_rows(ignore_index, backend):
    logits, weight, target = _inputs(6, 4, 3, dtype=torch.float64)
    valid_int = (isinstance(ignore_index, int) and not isinstance(ignore_index, bool)
                 and INT64[0] <= ignore_index <= INT64[1])
    if not valid_int:
        with pytest.raises((TypeError, ValueError), match=r"ignore_index must be an integer"):
            ef.elogitnorm_loss(logits, weight, target, ignore_index=ignore_index,
                               backend=backend)
        return
    if not 0 <= ignore_index < 4:
        target[1::2] = ignore_index
    expected = elogitnorm_reference(logits, weight, target, ignore_index=ignore_index,
                                    reduction="sum")
    loss = ef.elogitnorm_loss(logits, weight, target, ignore_index=ignore_index,
                              reduction="sum", backend=backend)
    torch.testing.assert_close(loss, expected)
