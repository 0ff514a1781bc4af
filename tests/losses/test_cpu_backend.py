"""The compiled ``cpu`` backend against the all-pairs reference (docs/design.md).

The same tests run for the ``cuda`` backend: ``test_cuda_backend.py`` imports them and overrides
the ``backend_device`` fixture. Tolerances: float64 rtol 1e-9 / atol 1e-10 (the C = 2 gradient is
0 in exact arithmetic and lands at ~1e-11 after cancellation), float32 rtol 2e-4 / atol 2e-6,
bf16 / fp16 by comparison with plain PyTorch's own low-precision error.
"""

from __future__ import annotations

import pytest
import torch

import elogitnorm_fast as ef
from elogitnorm_fast.backends import compiled
from elogitnorm_fast.reference import elogitnorm_reference

from parity import (
    KINDS,
    REDUCTIONS,
    check_bf16_error,
    check_elogitnorm,
    check_logitnorm,
    make_case,
)

F64 = {"rtol": 1e-9, "atol": 1e-10}
F32 = {"rtol": 2e-4, "atol": 2e-6}
SIZES = [(1, 1, 3), (7, 2, 5), (7, 3, 4), (128, 10, 16), (7, 100, 8), (128, 100, 8),
         (1, 1000, 4), (7, 1000, 6), (300, 40, 700), (3, 2500, 3)]


@pytest.fixture
def backend_device():
    """(backend name, device) under test; test_cuda_backend.py overrides it."""
    reason = ef.unavailable_reason("cpu", "cpu")
    if reason is not None:
        pytest.skip(reason)
    return "cpu", "cpu"


def _ops():
    return torch.ops.elogitnorm_fast


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n,c,d", SIZES)
def test_elogitnorm_float64_matches_reference(backend_device, n, c, d, reduction):
    backend, device = backend_device
    logits, weight, target = make_case(n, c, d, device=device)
    check_elogitnorm(backend, logits, weight, target, reduction, **F64)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_elogitnorm_special_rows_float64(backend_device, kind, reduction):
    backend, device = backend_device
    logits, weight, target = make_case(9, 6, 5, kind, device=device)
    loss, grad_logits, grad_weight = check_elogitnorm(
        backend, logits, weight, target, reduction, **F64
    )
    if kind != "all_ignored" or reduction != "mean":
        assert torch.isfinite(loss).all()
    assert torch.isfinite(grad_logits).all() and torch.isfinite(grad_weight).all()


@pytest.mark.parametrize("kind", KINDS)
def test_elogitnorm_special_rows_float32(backend_device, kind):
    backend, device = backend_device
    logits, weight, target = make_case(40, 12, 300, kind, dtype=torch.float32, device=device)
    check_elogitnorm(backend, logits, weight, target, "sum", **F32)


@pytest.mark.parametrize("n,c,d", [(128, 10, 64), (128, 1000, 32), (33, 257, 20), (200, 60, 600)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_elogitnorm_float32_matches_reference(backend_device, n, c, d, reduction):
    backend, device = backend_device
    logits, weight, target = make_case(n, c, d, dtype=torch.float32, device=device)
    check_elogitnorm(backend, logits, weight, target, reduction, **F32)


@pytest.mark.parametrize("n,c,d", [(64, 80, 24), (64, 300, 256), (400, 40, 512)])
def test_elogitnorm_near_duplicate_weight_rows_float32(backend_device, n, c, d):
    """Distances far below the weight norms keep their precision (no GEMM cancellation), in
    the direct, two-GEMM and one-GEMM weight-gradient paths."""
    backend, device = backend_device
    logits, weight, target = make_case(n, c, d, dtype=torch.float32, device=device)
    with torch.no_grad():
        weight[1] = weight[0] + 1e-3 * torch.randn_like(weight[0])
        logits[::2, 0] += 12.0  # class 0 predicted in half the rows: its distance to 1 matters
    check_elogitnorm(backend, logits, weight, target, "mean", **F32)


def test_elogitnorm_paper_divisor_matches_reference(backend_device):
    backend, device = backend_device
    logits, weight, target = make_case(16, 7, 5, device=device)
    check_elogitnorm(backend, logits, weight, target, "mean", divisor="paper", **F64)


@pytest.mark.parametrize("kind", ["elogitnorm", "logitnorm"])
def test_bf16_logits_error_at_most_twice_plain_pytorch(backend_device, kind):
    """bf16 logits, fp32 weight: loss and gradients against fp64 on the same (bf16-rounded)
    inputs, at most 2x the error of the reference formula evaluated in bf16 by plain PyTorch."""
    backend, device = backend_device
    check_bf16_error(backend, kind, 64, 50, 16, device)


def test_elogitnorm_fp16_logits(backend_device):
    backend, device = backend_device
    logits, weight, target = make_case(
        16, 10, 8, dtype=torch.float16, weight_dtype=torch.float32, device=device
    )
    check_elogitnorm(backend, logits, weight, target, "mean", rtol=2e-2, atol=2e-3)


def test_noncontiguous_inputs_and_expanded_upstream_gradient(backend_device):
    backend, device = backend_device
    logits, weight, target = make_case(12, 9, 6, device=device)
    logits_t = logits.detach().t().contiguous().t().requires_grad_(True)  # column-major
    weight_strided = torch.stack([weight.detach()] * 2, dim=2)[:, :, 0].requires_grad_(True)
    target_strided = torch.stack([target, target], dim=1)[:, 0].to(torch.int32)
    assert not logits_t.is_contiguous() and not weight_strided.is_contiguous()
    loss = ef.elogitnorm_loss(logits_t, weight_strided, target_strided, reduction="none",
                              backend=backend)
    loss.sum().backward()  # upstream gradient: a stride-0 expanded tensor of ones
    ref_z = logits.detach().requires_grad_(True)
    ref_w = weight.detach().requires_grad_(True)
    elogitnorm_reference(ref_z, ref_w, target, reduction="none").sum().backward()
    torch.testing.assert_close(logits_t.grad, ref_z.grad, **F64)
    torch.testing.assert_close(weight_strided.grad, ref_w.grad, **F64)


def test_caller_logits_are_not_modified(backend_device):
    backend, device = backend_device
    logits, weight, target = make_case(8, 5, 4, dtype=torch.float32, device=device)
    logits_before, weight_before = logits.detach().clone(), weight.detach().clone()
    ef.elogitnorm_loss(logits, weight, target, backend=backend).backward()
    ef.logitnorm_loss(logits, target, backend=backend).backward()
    assert torch.equal(logits.detach(), logits_before)
    assert torch.equal(weight.detach(), weight_before)


def test_nan_logits_propagate_without_crashing(backend_device):
    backend, device = backend_device
    logits, weight, target = make_case(6, 5, 4, device=device)
    with torch.no_grad():
        logits[2, 3] = float("nan")
    loss = ef.elogitnorm_loss(logits, weight, target, reduction="none", backend=backend)
    expected = elogitnorm_reference(logits.detach(), weight.detach(), target, reduction="none")
    assert torch.isnan(loss[2]) and torch.isnan(expected[2])
    keep = torch.arange(6, device=device) != 2
    torch.testing.assert_close(loss[keep], expected[keep], **F64)
    assert torch.isnan(ef.logitnorm_loss(logits, target, backend=backend))


def test_all_ignored_mean_is_nan_with_zero_gradient(backend_device):
    backend, device = backend_device
    logits, weight, target = make_case(5, 4, 3, "all_ignored", device=device)
    for loss in (
        ef.elogitnorm_loss(logits, weight, target, backend=backend),
        ef.logitnorm_loss(logits, target, backend=backend),
    ):
        assert torch.isnan(loss)
        grads = torch.autograd.grad(loss, logits)
        assert torch.equal(grads[0], torch.zeros_like(logits))


def test_no_grad_and_inference_calls_return_the_same_loss(backend_device):
    backend, device = backend_device
    logits, weight, target = make_case(20, 7, 5, device=device)
    with_grad = ef.elogitnorm_loss(logits, weight, target, backend=backend)
    with torch.no_grad():
        without = ef.elogitnorm_loss(logits, weight, target, backend=backend)
    only_logits = ef.elogitnorm_loss(logits, weight.detach(), target, backend=backend)
    assert without.grad_fn is None and with_grad.grad_fn is not None
    assert torch.equal(with_grad.detach(), without) and torch.equal(with_grad, only_logits)
    (grad_logits,) = torch.autograd.grad(only_logits, logits)
    (expected,) = torch.autograd.grad(elogitnorm_reference(logits, weight, target), logits)
    torch.testing.assert_close(grad_logits, expected, **F64)


def test_kernel_checks_out_of_range_target(backend_device):
    """The kernels guard the read themselves: the CPU kernel raises ValueError like the Python
    check (which the API skips for this backend), the CUDA kernel (which must not sync the host)
    returns a NaN loss."""
    _, device = backend_device
    logits, weight, target = make_case(4, 3, 2, device=device)
    target[1] = 7
    if device == "cpu":
        with pytest.raises(ValueError, match=r"target\[1\] = 7 must be in \[0, 3\)"):
            _ops().elogitnorm_forward(logits, weight, target, "mean", -100, 1e-6, 3.0, True, True)
        with pytest.raises(ValueError, match=r"target\[1\] = 7 must be in \[0, 3\)"):
            _ops().logitnorm_forward(logits, target, 0.04, "mean", -100, True)
    else:
        loss = _ops().elogitnorm_forward(logits, weight, target, "none", -100, 1e-6, 3.0, True,
                                         True)[0]
        assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()
        loss = _ops().logitnorm_forward(logits, target, 0.04, "none", -100, True)[0]
        assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n,c", [(1, 1), (7, 3), (128, 10), (33, 1000)])
def test_logitnorm_matches_reference(backend_device, n, c, reduction):
    backend, device = backend_device
    logits, _, target = make_case(n, c, 1, device=device)
    target[::4] = -100
    check_logitnorm(backend, logits, target, reduction, **F64)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_logitnorm_float32_and_zero_row(backend_device, reduction):
    backend, device = backend_device
    logits, _, target = make_case(50, 300, 1, dtype=torch.float32, device=device)
    with torch.no_grad():
        logits[3] = 0.0  # ||z|| = 0: the norm's gradient is taken as 0, like autograd's
    check_logitnorm(backend, logits, target, reduction, **F32)


def test_gradcheck_float64(backend_device):
    backend, device = backend_device
    logits, weight, target = make_case(6, 5, 3, device=device)
    target[4] = -100
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda z, w, r=reduction: ef.elogitnorm_loss(z, w, target, reduction=r,
                                                         backend=backend),
            (logits, weight),
        )
        assert torch.autograd.gradcheck(
            lambda z, r=reduction: ef.logitnorm_loss(z, target, reduction=r, backend=backend),
            (logits,),
        )


def _forward_samples(device):
    samples = []
    for (n, c, d), dtype, reduction in [
        ((8, 5, 3), torch.float64, "mean"),
        ((3, 12, 4), torch.float32, "none"),
        ((16, 4, 6), torch.float32, "sum"),
        ((1, 1, 2), torch.float64, "mean"),
    ]:
        logits, weight, target = make_case(n, c, d, dtype=dtype, device=device)
        if n > 1:  # (an all-ignored mean is NaN, which opcheck's comparison rejects)
            target[0] = -100
        for need_logits, need_weight in [(True, True), (True, False), (False, True)]:
            z = logits.detach().requires_grad_(need_logits)
            w = weight.detach().requires_grad_(need_weight)
            samples.append((z, w, target, reduction, -100, 1e-6, float(c), need_logits,
                            need_weight))
        samples.append((logits.detach(), weight.detach(), target, reduction, -100, 1e-6,
                        float(c), False, False))
    return samples


def test_opcheck_elogitnorm_ops(backend_device):
    _, device = backend_device
    for args in _forward_samples(device):
        torch.library.opcheck(_ops().elogitnorm_forward.default, args)
        outputs = _ops().elogitnorm_forward.default(*[
            a.detach() if isinstance(a, torch.Tensor) else a for a in args
        ])
        logits, weight, _, reduction, _, eps, _, need_logits, need_weight = args
        if not (need_logits or need_weight):
            continue
        grad_output = outputs[0].detach() * 0 + 0.7
        torch.library.opcheck(
            _ops().elogitnorm_backward.default,
            (grad_output, logits.detach(), weight.detach(), *outputs[1:], reduction, eps,
             need_logits, need_weight),
        )


def test_opcheck_logitnorm_ops(backend_device):
    _, device = backend_device
    for (n, c), dtype, reduction in [((8, 5), torch.float64, "mean"),
                                     ((3, 40), torch.float32, "none"),
                                     ((6, 1), torch.float32, "sum")]:
        logits, _, target = make_case(n, c, 1, dtype=dtype, device=device)
        target[-1] = -100
        for need_grad in (True, False):
            args = (logits.detach().requires_grad_(need_grad), target, 0.04, reduction, -100,
                    need_grad)
            torch.library.opcheck(_ops().logitnorm_forward.default, args)
        outputs = _ops().logitnorm_forward.default(logits.detach(), target, 0.04, reduction,
                                                   -100, True)
        torch.library.opcheck(
            _ops().logitnorm_backward.default,
            (outputs[0] * 0 + 1.3, logits.detach(), target, outputs[1], outputs[2], reduction,
             -100),
        )


def _train_compiled_and_eager(device, loss_fn):
    """Three SGD steps of a small model, eager and with torch.compile(fullgraph=True) of the
    forward (model + loss); backward and the optimiser step as usual. Parameters must agree."""
    torch._dynamo.reset()

    def make_model():
        torch.manual_seed(1)
        return torch.nn.Sequential(
            torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 7, bias=False)
        ).to(device)

    eager_model, compiled_model = make_model(), make_model()
    compiled_loss = torch.compile(loss_fn, fullgraph=True)
    eager_opt = torch.optim.SGD(eager_model.parameters(), lr=0.1)
    compiled_opt = torch.optim.SGD(compiled_model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.randn(32, 12, generator=generator).to(device)
        y = torch.randint(0, 7, (32,), generator=generator).to(device)
        for model, opt, fn in ((eager_model, eager_opt, loss_fn),
                               (compiled_model, compiled_opt, compiled_loss)):
            opt.zero_grad()
            fn(model, x, y).backward()
            opt.step()
        torch.testing.assert_close(compiled_loss(compiled_model, x, y),
                                   loss_fn(eager_model, x, y), rtol=1e-5, atol=1e-6)
    for eager_p, compiled_p in zip(eager_model.parameters(), compiled_model.parameters(),
                                   strict=True):
        torch.testing.assert_close(compiled_p, eager_p, rtol=1e-5, atol=1e-6)


def test_compiled_training_step_with_backend_module_matches_eager(backend_device):
    backend, device = backend_device
    module = ef.resolve_backend(backend, torch.device(device))

    def loss_fn(model, x, y):
        logits = model(x)
        return module.elogitnorm_loss(
            logits, model[2].weight, y, reduction="mean", ignore_index=-100, eps=1e-6, divisor=7
        ) + 0.5 * module.logitnorm_loss(logits, y, tau=0.04, reduction="mean", ignore_index=-100)

    _train_compiled_and_eager(device, loss_fn)


def test_compiled_training_step_with_loss_modules_matches_eager(backend_device):
    backend, device = backend_device
    criterion_e = ef.ELogitNormLoss(backend=backend)
    criterion_l = ef.LogitNormLoss(backend=backend)

    def loss_fn(model, x, y):
        logits = model(x)
        return criterion_e(logits, model[2].weight, y) + 0.5 * criterion_l(logits, y)

    _train_compiled_and_eager(device, loss_fn)


def test_same_result_with_one_and_two_threads(backend_device):
    """Row work is split across threads but every sum runs in a fixed order: bitwise equal."""
    backend, device = backend_device
    if device != "cpu":
        pytest.skip("thread count applies to the CPU kernels")
    logits, weight, target = make_case(600, 300, 64, dtype=torch.float32)
    target[::7] = -100
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            loss = ef.elogitnorm_loss(logits, weight, target, backend=backend)
            grads = torch.autograd.grad(loss, (logits, weight))
            lognorm = ef.logitnorm_loss(logits, target, backend=backend)
            results.append((loss, *grads, lognorm, *torch.autograd.grad(lognorm, logits)))
    finally:
        torch.set_num_threads(previous)
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


def test_backend_is_listed_and_preferred_by_auto(backend_device):
    backend, device = backend_device
    assert backend in ef.available_backends()
    assert backend in ef.available_backends(device)
    assert ef.resolve_backend("auto", torch.device(device)).NAME in (backend, "triton")
    assert compiled.kernel_reason("losses", backend.upper()) is None
