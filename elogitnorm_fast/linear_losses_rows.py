"""Row computations of the fused linear losses: a chunk of logits in, its losses and gradients out.

:mod:`elogitnorm_fast.linear_losses` forms the logits of a chunk of rows, hands them to one of
the functions here, and turns the logits gradient they return into the gradients of the
features, the weight and the bias. Each function runs the same computation as a backend of the
unfused losses, so the fused loss is that backend's loss on ``F.linear(features, weight, bias)``:

* ``torch``: :mod:`elogitnorm_fast.backends.torch_backend`'s ELogitNorm forward and closed-form
  backward, run as plain functions on the chunk (no nested autograd graph), and LogitNorm's
  gradient in closed form (the ``torch`` backend leaves that one to autograd);
* ``cpu`` / ``cuda``: the compiled ops ``elogitnorm_forward`` / ``elogitnorm_backward`` /
  ``logitnorm_forward`` / ``logitnorm_backward`` (schemas in ``csrc/ops.cpp``), called directly;
* ``triton``: the Triton kernels' ``triton_op`` s (:mod:`elogitnorm_fast.kernels.elogitnorm`,
  :mod:`elogitnorm_fast.kernels.logitnorm`): per-row losses and unit-upstream gradients, then
  the rows scaled by their upstream gradient. The kernels compute in fp32, so float64 chunks
  take the ``torch`` rows, as the ``triton`` backend does.

Every function takes the chunk's logits ``z`` (accumulation dtype), the targets, the reduction
the chunk is computed with (``"sum"``, or ``"none"``), and ``upstream``: None for the loss alone,
else the upstream gradient (0-d for ``"sum"``, one per row for ``"none"``). It returns
``(loss, grad_logits)``; ELogitNorm's functions add the weight gradient through the class
distances (the part that does not pass through the logits) to ``weight_grad``
(:class:`~.linear_losses_weight.WeightGradient`, None where not needed).
"""

from __future__ import annotations

import math

import torch

from .backends.torch_backend import _ELogitNorm
from .geometry import distance_rows
from .reference import LOGITNORM_NORM_EPS

Rows = tuple[torch.Tensor, torch.Tensor | None]
# The Function's forward and backward as plain functions: torch.compile treats a call through
# the class as autograd's own and would demand a real context.
_ELOGITNORM_FORWARD = _ELogitNorm.__dict__["forward"].__func__
_ELOGITNORM_BACKWARD = _ELogitNorm.__dict__["backward"].__func__


class _Context:
    """The part of an autograd context that ``torch_backend._ELogitNorm`` reads and writes, so
    that its forward and backward run as functions on one chunk."""

    def __init__(self, need_weight_grad: bool) -> None:
        self.needs_input_grad = (True, need_weight_grad)
        self.saved_tensors: tuple = ()

    def save_for_backward(self, *tensors) -> None:
        self.saved_tensors = tensors


def elogitnorm_rows_torch(z, weight, target, *, reduction, upstream, weight_grad, ignore_index,
                          eps, divisor, own_pairs=False) -> Rows:
    """ELogitNorm rows as the ``torch`` backend computes them (``weight`` in ``z``'s dtype);
    the distance term's weight gradient goes to ``weight_grad`` (a
    :class:`~.linear_losses_weight.WeightGradient`, or None where not needed)."""
    need_weight_grad = weight_grad is not None
    with torch.no_grad():
        predicted = z.argmax(dim=1)
        # CPU: near-coincident weight rows recomputed exactly, as the torch backend does there;
        # not under torch.compile, whose data-dependent sizes cannot stay inside a Function
        # (the GEMM distances then, as on CUDA).
        refine = weight.device.type == "cpu" and not torch.compiler.is_compiling()
        geometry = distance_rows(weight, predicted, z.dtype, refine=refine)
    refined = geometry.refined
    if refined is not None and refined[0].numel() == 0:
        refined = None
    ctx = _Context(need_weight_grad)
    loss = _ELOGITNORM_FORWARD(
        ctx, z, weight, target, predicted, geometry.for_samples(predicted), geometry.weight,
        geometry.rows if geometry.per_sample else None, geometry.weight_scale,
        *(refined or (None, None)), geometry.per_sample, reduction, ignore_index, eps, divisor,
    )
    if upstream is None:
        return loss, None
    grad_logits, grad_weight = _ELOGITNORM_BACKWARD(ctx, upstream)[:2]
    if need_weight_grad:
        weight_grad.add(grad_weight)
    return loss, grad_logits


#: The row bits of the compiled ops' ``sample_slot`` (``kFactorShift`` in
#: csrc/cpu/elogitnorm_loss.cpp); the bits above hold the row's logit rescale exponent.
_SLOT_ROW_BITS = 40


def weight_is_unscaled(weight: torch.Tensor) -> bool:
    """Whether the CPU kernels compute distances from ``weight`` as it is (their rescale factor
    is 1: the largest magnitude within ``[2^-31, 2^30)`` in float32, ``[2^-301, 2^300)`` in
    float64, or 0 / not finite; ``rescale_factor`` in csrc/cpu/loss_math.h). A host sync."""
    window = 300 if weight.dtype == torch.float64 else 30
    largest = float(weight.abs().amax()) if weight.numel() else 0.0
    return (largest == 0.0 or not math.isfinite(largest)
            or 2.0 ** (-window - 1) <= largest < 2.0 ** window)


def _per_sample_rows(sample_slot, row_class):
    """Each sample's row of the compiled forward's distances (0 for ignored samples, whose
    upstream gradient is 0) and its predicted class."""
    rows = torch.where(sample_slot >= 0, sample_slot, torch.zeros_like(sample_slot))
    return rows, row_class.index_select(0, rows).clamp_min_(0)  # -1: no valid row (g = 0)


def _distance_coefficients(z, upstream, scale_grad, sample_slot, predicted, inverse, eps,
                           weight_grad):
    """The distance term's coefficients ``c_nj = -g_n r_n (v_n - z_nj) / Delta_nj^3`` per
    sample (0 at clamped distances and at the sample's own class) and the close pairs, from
    the compiled forward's outputs, for rows whose logits and weight the kernels did not
    rescale (``r``: ``scale_grad``). ``inverse``: the samples' distance rows, overwritten."""
    valid = sample_slot >= 0
    clamped = inverse < eps
    exact = weight_grad.close_pairs(inverse, predicted)
    inverse.reciprocal_()
    g = upstream.to(z.dtype).expand(valid.shape) * scale_grad
    g = torch.where(valid, g, torch.zeros_like(g))
    # One factor of 1 / Delta at a time, as the kernels: Delta^3 alone may overflow.
    coefficients = (z.gather(1, predicted[:, None]) - z).mul_(g[:, None])
    coefficients.mul_(inverse).mul_(inverse).mul_(inverse).neg_()
    coefficients.masked_fill_(clamped, 0.0).scatter_(1, predicted[:, None], 0.0)
    return coefficients, exact


def elogitnorm_rows_compiled(z, weight, target, *, reduction, upstream, weight_grad,
                             ignore_index, eps, divisor, own_pairs=False) -> Rows:
    """ELogitNorm rows through the compiled ops (the dispatcher picks the device's kernel).

    ``own_pairs`` (CPU, where :func:`weight_is_unscaled`): the distance term's weight gradient
    is formed here from the forward's outputs and accumulated in place by GEMMs of the whole
    weight, rather than by the kernel's own C x D gradient per chunk; the kernel's is used for
    rows whose logits it rescaled.
    """
    want = upstream is not None
    weight_wanted = want and weight_grad is not None
    (loss, grad_unit, scale_grad, sample_slot, row_class, distances,
     count) = torch.ops.elogitnorm_fast.elogitnorm_forward.default(
        z, weight, target, reduction, ignore_index, float(eps), float(divisor), want,
        weight_wanted)
    if not want:
        return loss, None
    own = weight_wanted and own_pairs and bool(sample_slot.max() < (1 << _SLOT_ROW_BITS))
    grad_logits, grad_weight = torch.ops.elogitnorm_fast.elogitnorm_backward.default(
        upstream, z, weight, grad_unit, scale_grad, sample_slot, row_class, distances, count,
        reduction, float(eps), True, weight_wanted and not own)
    del grad_unit
    if own:
        rows, predicted = _per_sample_rows(sample_slot, row_class)
        inverse = distances.index_select(0, rows)
        del distances  # one rows x C buffer fewer while the coefficients are formed
        coefficients, exact = _distance_coefficients(
            z, upstream, scale_grad, sample_slot, predicted, inverse, eps, weight_grad)
        weight_grad.defer_distance_pairs(coefficients, predicted, exact)
    elif weight_wanted:
        weight_grad.add(grad_weight)
    return loss, grad_logits


def logitnorm_rows_torch(z, target, *, reduction, upstream, ignore_index, tau) -> Rows:
    """LogitNorm rows as the ``torch`` backend computes them, with the gradient in closed form.

    With ``y = z / a`` (``a`` the row's largest magnitude, at least 1, a constant as in the
    torch backend), ``n = ||y|| + 1e-7 / a``, ``t = y / (tau n)`` and ``G = g (softmax(t) -
    onehot)``: ``dz = (G - (G . y) y / (n ||y||)) / (tau n a)``; the second term is 0 at
    ``y = 0``, as autograd's subgradient of the norm there.
    """
    largest = z.abs().amax(dim=1, keepdim=True).clamp_min_(1.0)
    y = z / largest
    norm = torch.linalg.vector_norm(y, dim=1, keepdim=True)
    shifted = norm + LOGITNORM_NORM_EPS / largest
    scaled = y / (shifted * tau)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    log_norm = torch.logsumexp(scaled, dim=1)
    row_losses = torch.where(valid, log_norm - scaled.gather(1, safe[:, None])[:, 0],
                             torch.zeros_like(log_norm))
    loss = row_losses if reduction == "none" else row_losses.sum()
    if upstream is None:
        return loss, None
    g = torch.where(valid, upstream.to(z.dtype).expand(valid.shape), torch.zeros_like(log_norm))
    grad = torch.exp(scaled - log_norm[:, None]).mul_(g[:, None])
    grad.scatter_add_(1, safe[:, None], -g[:, None])
    dot = (grad * y).sum(dim=1, keepdim=True)
    radial = torch.where(norm > 0, dot / (shifted * norm), torch.zeros_like(dot))
    grad = grad.addcmul_(radial, y, value=-1.0).div_(shifted * (tau * largest))
    return loss, grad


def logitnorm_rows_compiled(z, target, *, reduction, upstream, ignore_index, tau) -> Rows:
    """LogitNorm rows through the compiled ops."""
    want = upstream is not None
    loss, grad_unit, count = torch.ops.elogitnorm_fast.logitnorm_forward.default(
        z, target, float(tau), reduction, ignore_index, want)
    if not want:
        return loss, None
    grad_logits = torch.ops.elogitnorm_fast.logitnorm_backward.default(
        upstream, z, target, grad_unit, count, reduction, ignore_index)
    return loss, grad_logits


def _row_upstream(upstream: torch.Tensor, rows: int) -> torch.Tensor:
    """One fp32 upstream gradient per row (the kernels zero the ignored rows themselves)."""
    return upstream.float().expand(rows).contiguous()


def elogitnorm_rows_triton(z, weight, target, *, reduction, upstream, weight_grad,
                           ignore_index, eps, divisor, own_pairs=False) -> Rows:
    """ELogitNorm rows through the Triton kernels; the distance term's weight gradient is
    accumulated into ``weight_grad`` by its GEMMs (no C x D temporary per chunk)."""
    if z.dtype == torch.float64:
        return elogitnorm_rows_torch(z, weight, target, reduction=reduction, upstream=upstream,
                                     weight_grad=weight_grad, ignore_index=ignore_index, eps=eps,
                                     divisor=divisor)
    from .kernels import elogitnorm  # noqa: F401  (registers the ops; imports triton)

    # From here z, the weight and the kernels' outputs are all fp32.
    want = upstream is not None
    weight_wanted = want and weight_grad is not None
    target = target.contiguous()
    losses, grad_unit, coefficient_unit, predicted = (
        torch.ops.elogitnorm_fast.triton_elogitnorm_rows.default(
            z, weight, target, ignore_index, float(eps), int(divisor), want, weight_wanted, 0))
    loss = losses if reduction == "none" else losses.sum()
    if not want:
        return loss, None
    grad_logits, coefficients = torch.ops.elogitnorm_fast.triton_scale_rows.default(
        grad_unit, coefficient_unit, _row_upstream(upstream, z.shape[0]), target, ignore_index)
    del grad_unit, coefficient_unit
    if weight_wanted:
        # The kernels may store minus the row's sum at the predicted class, where any value
        # multiplies w_m - w_m = 0; the GEMM form needs it to be 0.
        coefficients.scatter_(1, predicted[:, None], 0.0)
        weight_grad.add_distance_pairs(coefficients, predicted)
    return loss, grad_logits


def logitnorm_rows_triton(z, target, *, reduction, upstream, ignore_index, tau) -> Rows:
    """LogitNorm rows through the Triton kernels (float64 chunks: the ``torch`` rows)."""
    if z.dtype == torch.float64:
        return logitnorm_rows_torch(z, target, reduction=reduction, upstream=upstream,
                                    ignore_index=ignore_index, tau=tau)
    from .kernels import logitnorm  # noqa: F401  (registers the ops; imports triton)

    target = target.contiguous()
    losses, stats = torch.ops.elogitnorm_fast.triton_logitnorm_rows.default(
        z, target, 1.0 / tau, ignore_index, 0)  # z is fp32 here, as the losses and gradient
    loss = losses if reduction == "none" else losses.sum()
    if upstream is None:
        return loss, None
    grad = torch.ops.elogitnorm_fast.triton_logitnorm_grad.default(
        z, target, stats, _row_upstream(upstream, z.shape[0]), ignore_index)
    return loss, grad
