"""Shared parity harness: any backend against ``reference.py`` on fresh random inputs.

Backend test modules import :func:`check_elogitnorm` / :func:`check_logitnorm` and the case
lists, so the list of cases (odd sizes, ties, degenerate rows, ignore_index, reductions, random
upstream gradients) exists once.
"""

from __future__ import annotations

import torch

import elogitnorm_fast as ef
from elogitnorm_fast.reference import (
    elogitnorm_reference,
    elogitnorm_scale_reference,
    logitnorm_reference,
)

REDUCTIONS = ("mean", "sum", "none")
#: Logit patterns: gaussian, integer-valued (ties with the max), all-equal rows, a few ignored
#: rows, all rows ignored, duplicate weight rows.
KINDS = ("random", "ties", "equal_rows", "some_ignored", "all_ignored", "duplicate_weights")


def make_case(
    n: int,
    c: int,
    d: int,
    kind: str = "random",
    *,
    dtype: torch.dtype = torch.float64,
    weight_dtype: torch.dtype | None = None,
    device: str = "cpu",
    generator: torch.Generator | None = None,
):
    """Fresh random (logits, weight, target) for one case; leaves require grad."""
    gen = generator
    logits = torch.randn(n, c, generator=gen, dtype=torch.float64) * 3
    weight = torch.randn(c, d, generator=gen, dtype=torch.float64)
    target = torch.randint(0, c, (n,), generator=gen)
    if kind == "ties":
        logits = torch.randint(-2, 3, (n, c), generator=gen).to(torch.float64)
    elif kind == "equal_rows":
        logits[: max(1, n // 2)] = 1.5
    elif kind == "some_ignored":
        target[::3] = -100
    elif kind == "all_ignored":
        target[:] = -100
    elif kind == "duplicate_weights" and c > 1:
        weight[c // 2] = weight[0]
        logits[:, c // 2] = logits[:, 0] + 0.5  # forces a nonzero margin over a zero distance
    logits = logits.to(device=device, dtype=dtype).requires_grad_(True)
    weight = weight.to(device=device, dtype=weight_dtype or dtype).requires_grad_(True)
    return logits, weight, target.to(device)


def upstream(loss: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random upstream gradient of the loss's shape (not all ones)."""
    return (torch.rand(loss.shape, generator=generator, dtype=torch.float64) + 0.5).to(
        device=loss.device, dtype=loss.dtype
    )


def _grads(loss, inputs, grad):
    return torch.autograd.grad(loss, inputs, grad, allow_unused=True)


def _close(name, actual, expected, rtol, atol):
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{name}: {m}"
    )


def check_elogitnorm(backend, logits, weight, target, reduction, *, rtol, atol, divisor="classes"):
    """Loss and both gradients of ``backend`` equal the reference computed in float64."""
    loss = ef.elogitnorm_loss(logits, weight, target, reduction=reduction, backend=backend,
                              divisor=divisor)
    ref_logits = logits.detach().double().requires_grad_(True)
    ref_weight = weight.detach().double().requires_grad_(True)
    expected = elogitnorm_reference(ref_logits, ref_weight, target, reduction=reduction,
                                    divisor=divisor)
    grad = upstream(loss)
    grad_logits, grad_weight = _grads(loss, (logits, weight), grad)
    ref_grad_logits, ref_grad_weight = _grads(expected, (ref_logits, ref_weight), grad.double())
    assert loss.dtype == logits.dtype and loss.shape == expected.shape
    _close("loss", loss.double(), expected, rtol, atol)
    _close("grad_logits", grad_logits.double(), ref_grad_logits, rtol, atol)
    _close("grad_weight", grad_weight.double(), ref_grad_weight, rtol, atol)
    assert grad_logits.dtype == logits.dtype and grad_weight.dtype == weight.dtype
    return loss, grad_logits, grad_weight


def check_logitnorm(backend, logits, target, reduction, *, rtol, atol, tau=0.04):
    """LogitNorm loss and logits gradient of ``backend`` equal the float64 reference."""
    loss = ef.logitnorm_loss(logits, target, tau=tau, reduction=reduction, backend=backend)
    ref_logits = logits.detach().double().requires_grad_(True)
    expected = logitnorm_reference(ref_logits, target, tau=tau, reduction=reduction)
    grad = upstream(loss)
    (grad_logits,) = _grads(loss, (logits,), grad)
    (ref_grad,) = _grads(expected, (ref_logits,), grad.double())
    _close("loss", loss.double(), expected, rtol, atol)
    _close("grad_logits", grad_logits.double(), ref_grad, rtol, atol)
    assert grad_logits.dtype == logits.dtype
    return loss, grad_logits


def check_bf16_error(backend, kind, n, c, d, device="cpu"):
    """bf16 logits with an fp32 weight: the loss and every gradient of ``backend`` against the
    float64 reference on the same (bf16-rounded) inputs, at most twice the error of plain
    PyTorch (the reference formula evaluated in bf16). ``kind``: "elogitnorm" or "logitnorm"."""
    logits, weight, target = make_case(n, c, d, dtype=torch.float32, device=device)
    low = logits.detach().bfloat16().requires_grad_(True)
    weight = weight.detach().requires_grad_(True)
    exact_z = low.detach().double().requires_grad_(True)
    exact_w = weight.detach().double().requires_grad_(True)
    plain_z = low.detach().clone().requires_grad_(True)
    plain_w = weight.detach().bfloat16().requires_grad_(True)
    if kind == "elogitnorm":
        ours = ef.elogitnorm_loss(low, weight, target, reduction="none", backend=backend)
        exact = elogitnorm_reference(exact_z, exact_w, target, reduction="none")
        plain = elogitnorm_reference(plain_z, plain_w, target, reduction="none")
        inputs = ((low, weight), (exact_z, exact_w), (plain_z, plain_w))
    else:
        ours = ef.logitnorm_loss(low, target, reduction="none", backend=backend)
        exact = logitnorm_reference(exact_z, target, reduction="none")
        plain = logitnorm_reference(plain_z, target, reduction="none")
        inputs = ((low,), (exact_z,), (plain_z,))
    assert ours.dtype == torch.bfloat16

    def error(value, truth):
        return ((value.double() - truth).norm() / truth.norm()).item()

    grad = torch.rand(ours.shape, dtype=torch.float64, device=device) + 0.5
    ours_grads = torch.autograd.grad(ours, inputs[0], grad.bfloat16())
    exact_grads = torch.autograd.grad(exact, inputs[1], grad)
    plain_grads = torch.autograd.grad(plain, inputs[2], grad.bfloat16())
    assert [g.dtype for g in ours_grads] == [t.dtype for t in inputs[0]]
    for value, truth, baseline in zip((ours, *ours_grads), (exact, *exact_grads),
                                      (plain, *plain_grads), strict=True):
        assert error(value, truth) <= 2 * error(baseline, truth) + 1e-4


def elogitnorm_oracle(logits, weight, target, reduction, grad, *, eps=1e-6, divisor="classes"):
    """Loss and both gradients of the reference in float64 on the same input values, each row
    shifted by its maximum first (the loss is shift invariant, so the values are the same; the
    shift keeps ``z / s`` small, where the plain formula would lose the small margins of large
    logits even in float64). ``grad``: the upstream gradient.

    Also returns each row's term size ``|g_n| / s_n`` (N, 1): the logits gradient is a sum of
    terms ``G_j / s`` and can cancel far below them, so a rounding error is relative to this.
    """
    z = logits.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    shifted = z - z.detach().amax(dim=1, keepdim=True)
    loss = elogitnorm_reference(shifted, w, target, reduction=reduction, eps=eps,
                                divisor=divisor)
    grads = torch.autograd.grad(loss, (z, w), grad.double())
    scale = elogitnorm_scale_reference(shifted.detach(), w.detach(), eps=eps, divisor=divisor)
    valid = target != -100
    per_row = grad.double().expand(valid.shape) if grad.dim() == 0 and reduction == "none" \
        else grad.double()
    if reduction == "mean":
        per_row = per_row / valid.sum().clamp_min(1)
    per_row = torch.where(valid, per_row.expand(valid.shape), torch.zeros_like(scale))
    return loss.detach(), grads[0], grads[1], (per_row.abs() / scale)[:, None]


def logitnorm_oracle(logits, target, reduction, grad, *, tau=0.04):
    """Loss and logits gradient of the LogitNorm reference in float64 on the same values, and
    each row's term size ``|g_n| a_n`` (N, 1), ``a = 1 / (tau (||z|| + 1e-7))``: the gradient
    ``a (p - onehot) - coupling z`` cancels far below its terms where the softmax saturates."""
    z = logits.detach().double().requires_grad_(True)
    loss = logitnorm_reference(z, target, tau=tau, reduction=reduction)
    gradient = torch.autograd.grad(loss, z, grad.double())[0]
    valid = target != -100
    per_row = grad.double().expand(valid.shape) if grad.dim() == 0 and reduction == "none" \
        else grad.double()
    if reduction == "mean":
        per_row = per_row / valid.sum().clamp_min(1)
    per_row = torch.where(valid, per_row.expand(valid.shape), torch.zeros(valid.shape,
                                                                          dtype=torch.float64))
    a = 1.0 / (tau * (torch.linalg.vector_norm(z.detach(), dim=1) + 1e-7))
    return loss.detach(), gradient, (per_row.abs() * a)[:, None]


def assert_close_to_scale(name, actual, expected, *, rtol, floor=0.0, per_row=False,
                          terms=None):
    """``|actual - expected| <= rtol * (|expected| + M) + floor`` elementwise, with ``M`` the
    largest ``|expected|`` of the tensor (of the row with ``per_row``), or ``terms`` (broadcast
    against it) where larger: entries that are sums of larger terms are held to the size of
    those terms, not to their own. ``floor``: an absolute allowance (the subnormal range of the
    output dtype). NaN must match NaN."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    finite = torch.where(e.isfinite(), e.abs(), torch.zeros_like(e))
    if per_row and e.dim() == 2:
        top = finite.amax(dim=1, keepdim=True) if e.shape[1] else finite
    else:
        top = finite.max() if e.numel() else finite
    if terms is not None:
        top = torch.maximum(top, torch.nan_to_num(terms.double(), posinf=0.0))
    allowed = rtol * (e.abs() + top) + floor
    ok = ((a - e).abs() <= allowed) | (a.isnan() & e.isnan()) | (a == e)
    if not bool(ok.all()):
        bad = (~ok).nonzero()[0].tolist()
        index = tuple(bad)
        raise AssertionError(
            f"{name}: {int((~ok).sum())} of {ok.numel()} entries off, e.g. at {index}: "
            f"{a[index].item()!r} against {e[index].item()!r} (allowed {allowed[index].item():.3g})"
        )


def knn_oracle_sorted(queries, bank, normalize=True):
    """KNN oracle: squared distances of every query to every bank row in float64 (rows
    L2-normalised first unless ``normalize`` is False), sorted per row, and the neighbour
    indices (stable sort: equal distances keep the smaller index first)."""
    q = torch.as_tensor(queries).double()
    b = torch.as_tensor(bank).double()
    if normalize:
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
        b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    rows = max(1, 2**23 // max(1, b.numel()))  # query rows per chunk: <= 64 MiB of differences
    d2 = torch.cat([(q[i:i + rows].unsqueeze(1) - b.unsqueeze(0)).pow(2).sum(-1)
                    for i in range(0, q.shape[0], rows)])
    return torch.sort(d2, dim=1, stable=True)


def knn_oracle_kth(queries, bank, k):
    """Euclidean distance of each query to its k-th nearest bank row, normalised rows, float64."""
    return knn_oracle_sorted(queries, bank).values[:, k - 1].sqrt()
