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


# ------------------------------------------------------------------------------------------
# one backend vocabulary and one resolver for losses, logit scores and KNN
# ------------------------------------------------------------------------------------------

OPS = ("losses", "linear_losses", "logit_scores", "knn")
#: The documented "auto" order per op family on CUDA (docs/backends.md).
CUDA_PREFERENCE = {"losses": ("triton", "cuda", "torch"),
                   "linear_losses": ("triton", "cuda", "torch"),
                   "logit_scores": ("triton", "torch"), "knn": ("torch",)}


def test_one_vocabulary_for_every_op_family():
    from elogitnorm_fast.backends import BACKENDS, IMPLEMENTS
    from elogitnorm_fast.backends import OPS as REGISTRY_OPS

    assert REGISTRY_OPS == OPS
    assert BACKENDS == ("reference", "torch", "cpu", "cuda", "triton")
    assert IMPLEMENTS == {"losses": BACKENDS,
                          "linear_losses": ("torch", "cpu", "cuda", "triton"),
                          "logit_scores": ("torch", "cpu", "triton"), "knn": ("torch", "cpu")}
    assert ef.available_backends() == ef.available_backends(op="losses")
    for op in OPS:
        names = ef.available_backends("cpu", op=op)
        assert "torch" in names and set(names) <= set(IMPLEMENTS[op])
        assert set(ef.available_backends(op=op)) >= set(names)


@pytest.mark.parametrize("device", [None, "cpu", "cuda", "meta"])
@pytest.mark.parametrize("name", ["reference", "torch", "cpu", "cuda", "triton"])
def test_a_backend_gives_the_same_reason_for_every_op_family_it_implements(name, device):
    from elogitnorm_fast.backends import IMPLEMENTS

    reasons = {op: ef.unavailable_reason(name, device, op=op) for op in OPS
               if name in IMPLEMENTS[op]}
    assert len(set(reasons.values())) == 1, reasons
    for op in OPS:
        if name not in IMPLEMENTS[op]:
            reason = ef.unavailable_reason(name, device, op=op)
            assert f"the {name} backend does not implement {op}" in reason
            assert name not in ef.available_backends(device, op=op)


@pytest.mark.parametrize("op", OPS)
def test_auto_picks_the_first_available_backend_of_the_device(op):
    cpu_expected = "cpu" if ef.unavailable_reason("cpu", "cpu", op=op) is None else "torch"
    assert ef.resolve_backend("auto", "cpu", op=op).NAME == cpu_expected
    assert ef.resolve_backend("auto", torch.device("cpu"), op=op).NAME == cpu_expected
    running = ef.available_backends("cuda", op=op)
    cuda_expected = next(name for name in CUDA_PREFERENCE[op] if name in running)
    assert ef.resolve_backend("auto", "cuda", op=op).NAME == cuda_expected
    # a device no kernel is built for: the torch backend, which runs everywhere
    assert ef.resolve_backend("auto", "meta", op=op).NAME == "torch"


@pytest.mark.parametrize("op", OPS)
def test_unknown_names_and_families_error_in_one_line(op):
    with pytest.raises(ValueError, match=r"^backend must be 'auto' or one of .*, got 'nope'$"):
        ef.resolve_backend("nope", "cpu", op=op)
    with pytest.raises(TypeError, match=r"^backend must be .*, got \['torch'\]$"):
        ef.resolve_backend(["torch"], "cpu", op=op)
    # "native" was the KNN scorer's own name of the cpu backend; the registry does not know it
    with pytest.raises(ValueError, match=r"got 'native'$"):
        ef.unavailable_reason("native", "cpu", op=op)
    with pytest.raises(ValueError, match=r"^backend must be one of .*, got 'auto'$"):
        ef.unavailable_reason("auto", op=op)
    with pytest.raises(ValueError, match=r"^op must be one of .*, got 'training'$"):
        ef.available_backends("cpu", op="training")


def test_a_named_backend_outside_the_family_or_device_is_refused():
    with pytest.raises(ValueError, match=r"backend must be .* for knn, got 'triton'$"):
        ef.resolve_backend("triton", "cpu", op="knn")
    with pytest.raises(RuntimeError, match=r"^backend 'cpu' is not available on meta: the cpu "
                       r"backend runs on CPU tensors, got device meta$"):
        ef.resolve_backend("cpu", "meta", op="logit_scores")


def test_dispatch_traces_in_a_full_graph():
    logits, weight, target = _inputs(n=6, c=5, d=4)

    def losses(z, w, y):
        return (ef.elogitnorm_loss(z, w, y, backend="auto")
                + ef.logitnorm_loss(z, y, backend="torch"))

    compiled = torch.compile(losses, fullgraph=True, backend="eager")
    expected = (elogitnorm_reference(logits, weight, target)
                + logitnorm_reference(logits, target))
    torch.testing.assert_close(compiled(logits, weight, target), expected, rtol=1e-5, atol=1e-6)
