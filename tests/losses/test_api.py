"""Public API: names, modules, dispatch, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import elogitnorm_fast as ef
from elogitnorm_fast.reference import elogitnorm_reference, logitnorm_reference


def _inputs(n=5, c=4, d=3):
    return torch.randn(n, c), torch.randn(c, d), torch.randint(0, c, (n,))


def test_available_backends_lists_the_always_present_ones():
    names = ef.available_backends()
    assert "reference" in names and "torch" in names
    assert set(names) <= {"reference", "torch", "cpu", "cuda", "triton"}


def test_auto_backend_on_cpu_is_an_available_cpu_backend():
    chosen = ef.resolve_backend("auto", torch.device("cpu"))
    assert chosen.NAME in ef.available_backends("cpu")
    assert chosen.NAME in ("cpu", "torch")


def test_unknown_backend_names_itself():
    logits, weight, target = _inputs()
    with pytest.raises(ValueError, match="'nope'"):
        ef.elogitnorm_loss(logits, weight, target, backend="nope")


def test_unavailable_backend_says_which_and_why():
    logits, weight, target = _inputs()
    # CUDA kernels cannot take CPU tensors; the error names the backend and the device.
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is not available on cpu"):
        ef.elogitnorm_loss(logits, weight, target, backend="cuda")


@pytest.mark.parametrize("backend", ["reference", "torch", "auto"])
def test_modules_match_functions(backend):
    logits, weight, target = _inputs()
    module = ef.ELogitNormLoss(reduction="sum", backend=backend)
    expected = elogitnorm_reference(logits, weight, target, reduction="sum")
    torch.testing.assert_close(module(logits, weight, target), expected)
    torch.testing.assert_close(
        ef.LogitNormLoss(tau=0.1, backend=backend)(logits, target),
        logitnorm_reference(logits, target, tau=0.1),
    )
    assert "sum" in repr(module)


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (lambda z, w, y: (z[0], w, y), ValueError, r"logits must be 2-D.*\(4,\)"),
        (lambda z, w, y: (z.long(), w, y), TypeError, "logits must be float"),
        (lambda z, w, y: (z, w[:3], y), ValueError, r"C=4 classes, weight has 3 rows"),
        (lambda z, w, y: (z, w[0], y), ValueError, r"weight must be 2-D"),
        (lambda z, w, y: (z, w, y[:2]), ValueError, r"target must have shape \(N,\) = \(5,\)"),
        (lambda z, w, y: (z, w, y.float()), TypeError, "target must hold class indices"),
        (lambda z, w, y: (z, w, torch.full_like(y, 4)), ValueError, r"\[0, 4\).*got \[4, 4"),
        (lambda z, w, y: (z, w, torch.full_like(y, -3)), ValueError, r"ignore_index=-100.*-3"),
    ],
)
def test_bad_input_errors_name_argument_and_value(change, error, pattern):
    with pytest.raises(error, match=pattern):
        ef.elogitnorm_loss(*change(*_inputs()), backend="torch")


def test_bad_options_are_named():
    logits, weight, target = _inputs()
    with pytest.raises(ValueError, match="reduction must be one of.*'avg'"):
        ef.elogitnorm_loss(logits, weight, target, reduction="avg")
    with pytest.raises(ValueError, match="tau must be a finite number > 0, got 0"):
        ef.logitnorm_loss(logits, target, tau=0)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        ef.ELogitNormLoss(eps=0.0)
    with pytest.raises(ValueError, match="divisor must be one of.*'c-1'"):
        ef.elogitnorm_loss(logits, weight, target, divisor="c-1")
    with pytest.raises(ValueError, match="logits must be 2-D"):
        ef.logitnorm_loss(logits[0], target)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_all_ignored_batch_behaves_like_cross_entropy(backend):
    logits, weight, _ = _inputs()
    logits.requires_grad_(True)
    target = torch.full((5,), -100)
    expected = F.cross_entropy(logits, target)  # NaN for mean, zero gradient
    loss = ef.elogitnorm_loss(logits, weight, target, backend=backend)
    assert torch.isnan(loss) and torch.isnan(expected)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.equal(grad, torch.zeros_like(grad))
    assert ef.elogitnorm_loss(logits, weight, target, reduction="sum", backend=backend) == 0


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_nan_logits_propagate_to_their_row_only(backend):
    logits, weight, target = _inputs(6, 5, 3)
    logits[2, 1] = float("nan")
    loss = ef.elogitnorm_loss(logits, weight, target, reduction="none", backend=backend)
    assert torch.isnan(loss[2])
    keep = torch.tensor([0, 1, 3, 4, 5])
    torch.testing.assert_close(
        loss[keep], elogitnorm_reference(logits[keep], weight, target[keep], reduction="none")
    )


def test_degenerate_inputs_stay_finite():
    logits = torch.ones(4, 6)  # s would be 0
    weight = torch.ones(6, 3)  # every distance would be 0
    target = torch.arange(4)
    loss = ef.elogitnorm_loss(logits.requires_grad_(True), weight.requires_grad_(True), target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert torch.isfinite(weight.grad).all()


@pytest.mark.parametrize("backend", ["torch", "auto", "reference"])
@pytest.mark.parametrize("bad", [4, -3])
def test_out_of_range_target_raises_value_error_on_every_cpu_backend(backend, bad):
    logits, weight, target = _inputs()
    target[2] = bad
    with pytest.raises(ValueError, match=r"must be in \[0, 4\)") as error:
        ef.elogitnorm_loss(logits, weight, target, backend=backend)
    assert str(bad) in str(error.value)
    with pytest.raises(ValueError, match=r"must be in \[0, 4\)") as error:
        ef.logitnorm_loss(logits, target, backend=backend)
    assert str(bad) in str(error.value)


def _hessian_vector(loss_fn, logits, direction):
    """d/dz <dloss/dz, direction>: one gradient-penalty-style double backward."""
    (grad,) = torch.autograd.grad(loss_fn(logits), logits, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * direction).sum(), logits)
    return hvp


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_create_graph_through_a_closed_form_backward_is_refused(backend):
    """A closed-form backward has no second derivative: create_graph=True raises instead of
    returning a gradient that a penalty would silently treat as constant."""
    if backend not in ef.available_backends("cpu"):
        pytest.skip(ef.unavailable_reason(backend, "cpu"))
    logits, weight, target = _inputs()
    logits = logits.double().requires_grad_(True)
    cases = [lambda z: ef.elogitnorm_loss(z, weight.double(), target, backend=backend)]
    if backend == "cpu":
        cases.append(lambda z: ef.logitnorm_loss(z, target, backend=backend))
    for loss_fn in cases:
        with pytest.raises(RuntimeError, match="first derivatives.*backend='reference'"):
            _hessian_vector(loss_fn, logits, torch.randn_like(logits))


def test_second_derivatives_where_autograd_computes_them():
    """The reference backend (both losses) and the torch backend's LogitNorm are plain autograd:
    their Hessian-vector products agree with a finite difference of the gradient."""
    logits, weight, target = _inputs(6, 5, 4)
    logits = logits.double().requires_grad_(True)
    direction = torch.randn_like(logits)
    cases = [
        lambda z: ef.elogitnorm_loss(z, weight.double(), target, backend="reference"),
        lambda z: ef.logitnorm_loss(z, target, backend="reference"),
        lambda z: ef.logitnorm_loss(z, target, backend="torch"),
    ]
    for loss_fn in cases:
        step = 1e-6

        def gradient(z, loss_fn=loss_fn):
            return torch.autograd.grad(loss_fn(z), z)[0]

        plus = gradient((logits + step * direction).detach().requires_grad_(True))
        minus = gradient((logits - step * direction).detach().requires_grad_(True))
        finite = (plus - minus) / (2 * step)
        torch.testing.assert_close(_hessian_vector(loss_fn, logits, direction), finite,
                                   rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "cpu", "reference"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
def test_every_integer_target_dtype_matches_int64(backend, dtype):
    if backend not in ef.available_backends("cpu"):
        pytest.skip(ef.unavailable_reason(backend, "cpu"))
    logits, weight, target = _inputs(7, 5, 3)
    logits.requires_grad_(True)
    for loss_fn in (lambda t: ef.elogitnorm_loss(logits, weight, t, backend=backend),
                    lambda t: ef.logitnorm_loss(logits, t, backend=backend)):
        expected = loss_fn(target)
        (expected_grad,) = torch.autograd.grad(expected, logits)
        loss = loss_fn(target.to(dtype))
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.equal(loss, expected) and torch.equal(grad, expected_grad)
