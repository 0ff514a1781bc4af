"""The ``torch`` backend: memory-lean ELogitNorm and LogitNorm in plain PyTorch, any device.

ELogitNorm never builds the C x C x D difference tensor of the released code: only the distance
rows of the predicted classes (:mod:`elogitnorm_fast.geometry`), ``O(N C + C D)`` memory, and a
closed-form backward that reaches both the logits and the weight.

Everything is written with the margins ``d_j = v - z_j >= 0`` (``v`` the row maximum) and the
normalised margins ``u_j = d_j / s``, never with ``z / s``: ``logsumexp(z / s) - z_y / s`` equals
``log sum_j exp(-u_j) + u_y``, whose terms are bounded, where ``z / s`` is huge when the margins
are small against the logits (``3 + 1e-3 * randn``: ``z / s`` near 1e4 leaves fp32 a few bits
of the differences that matter). Each row is first multiplied by a power of two that brings
its largest entry below 4 (exact, :func:`elogitnorm_fast.geometry.power_of_two_reciprocal`), so
margins and sums stay finite for every finite fp32 logit; ``eps`` is scaled with it, which keeps
the clamp of ``s`` where it was. Gradients, with ``G = g (softmax(-u) - onehot(y))`` for the
row's upstream gradient ``g``, ``r = 1 / s`` and ``q = sum_j G_j u_j`` (0 where ``s`` is
clamped; ``sum_j G_j = 0``, so ``q s`` is ``-sum_j G_j z_j``)::

    k_j  = [z_j < v] q r / (divisor Delta_j)
    dz_j = r G_j - k_j + [j = m] sum_i k_i
    c_j  = -(q / divisor) (u_j / Delta_j) / Delta_j / Delta_j   (0 where Delta_j is clamped)

with ``c_j = dL/dDelta_j / Delta_j`` the weight gradient's coefficients; ``u_j / Delta_j`` is at
most ``divisor``, so nothing there overflows either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..geometry import (
    accumulation_dtype,
    as_dtype,
    distance_rows,
    power_of_two_reciprocal,
    weight_gradient,
)
from ..reduction import reduce_rows, row_gradient_weights, valid_count
from ..reference import LOGITNORM_NORM_EPS
from ..validation import check_first_derivative

NAME = "torch"


def unavailable_reason(device: torch.device) -> str | None:
    """Always available."""
    return None


def _safe_target(target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, target, torch.zeros_like(target))


def _row_scales(z: torch.Tensor) -> torch.Tensor:
    """Per row, the power of two (<= 1) that brings the row's largest magnitude below 4."""
    return power_of_two_reciprocal(z.abs().amax(dim=1), at_most_one=True)


def _scaled_margins(z: torch.Tensor, predicted: torch.Tensor, row_scale: torch.Tensor):
    """``(v - z) * row_scale`` (N x C) without forming ``v - z`` (which overflows for logits of
    both signs near the fp32 limit), and the top values ``v`` (N, 1). Both products are exact,
    so this rounds once, as ``v - z`` would."""
    top = z.gather(1, predicted[:, None])
    return torch.addcmul(top * row_scale[:, None], z, row_scale[:, None], value=-1.0), top


def _normalise(margins: torch.Tensor, raw_scale: torch.Tensor, row_scale: torch.Tensor,
               eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``u = d / max(s, eps)`` in place on the scaled margins, whether the clamp is active, and
    ``1 / max(s, eps)`` in the logits' units (at most ``1 / eps``).

    ``raw_scale`` is ``s`` in the row's scaled units. A clamped row divides by ``eps`` and then
    by ``row_scale``, not by their product, which is subnormal for rows near the fp32 limit.
    """
    clamped = raw_scale / row_scale < eps  # s itself: exact, or inf (never clamped); NaN: no
    divide = raw_scale.masked_fill(clamped, eps)
    unscale = row_scale.reciprocal().masked_fill_(clamped.logical_not(), 1.0)
    normalised = margins.div_(divide[:, None]).mul_(unscale[:, None])
    inverse = (row_scale / raw_scale).masked_fill_(clamped, 1.0 / eps)
    return normalised, clamped, inverse


class _ELogitNorm(torch.autograd.Function):
    """Inputs: logits, weight, target, then the no-grad geometry (predicted classes, raw
    distances, the scaled weight, its rows (None where they are the weight itself), its scale
    and the refined entries: :class:`~..geometry.DistanceRows`), and the options. The geometry
    comes in as inputs so that torch.compile traces its data-dependent refinement outside the
    Function."""

    @staticmethod
    def forward(ctx, logits, weight, target, predicted, raw_distances, scaled_weight, rows,
                weight_scale, refined_rows, refined_columns, per_sample, reduction,
                ignore_index, eps, divisor):
        dtype = raw_distances.dtype
        z = as_dtype(logits, dtype)
        row_scale = _row_scales(z)
        margins, _ = _scaled_margins(z, predicted, row_scale)
        # s in the row's scaled units (margins at most 8: no overflow in the sum).
        raw_scale = (margins / raw_distances.clamp_min(eps)).sum(dim=1) / divisor
        normalised, _, _ = _normalise(margins, raw_scale, row_scale, eps)
        log_norm = torch.log(torch.exp(-normalised).sum(dim=1))
        valid = target != ignore_index
        target_safe = _safe_target(target, valid)
        picked = normalised.gather(1, target_safe[:, None])[:, 0]
        row_losses = torch.where(valid, log_norm + picked, torch.zeros_like(log_norm))
        ctx.save_for_backward(logits, scaled_weight, rows, weight_scale, target_safe, valid,
                              predicted, row_scale, raw_scale, log_norm, raw_distances,
                              refined_rows, refined_columns)
        ctx.options = (reduction, eps, divisor, per_sample)
        ctx.weight_dtype = weight.dtype
        count = valid_count(valid, dtype) if reduction == "mean" else None
        return reduce_rows(row_losses, reduction, count).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        check_first_derivative(NAME, "ELogitNorm")
        (logits, scaled_weight, rows, weight_scale, target, valid, predicted, row_scale,
         raw_scale, log_norm, raw_distances, refined_rows, refined_columns) = ctx.saved_tensors
        reduction, eps, divisor, per_sample = ctx.options
        dtype = raw_distances.dtype
        z = as_dtype(logits, dtype)
        g = row_gradient_weights(grad_output, valid, reduction, dtype)
        margins, top = _scaled_margins(z, predicted, row_scale)
        normalised, clamped, inverse_scale = _normalise(margins, raw_scale, row_scale, eps)
        # G_j = g (p_j - [j = y]), p = softmax(-u) = softmax(z / s).
        grad_scaled = torch.exp(-normalised - log_norm[:, None]) * g[:, None]
        grad_scaled.scatter_add_(1, target[:, None], -g[:, None])
        grad_logits = grad_scaled * inverse_scale[:, None]
        # q = sum_j G_j u_j, so ds = q / s; zero where the clamp s >= eps is active. u beyond
        # the dtype (inf) has p = 0: kept finite so that 0 * u stays 0.
        normalised.clamp_max_(torch.finfo(dtype).max)
        dot = (grad_scaled * normalised).sum(dim=1)
        dot = torch.where(clamped, torch.zeros_like(dot), dot)
        distances = raw_distances.clamp_min(eps)
        # Through s = (1/divisor) sum_j (v - z_j) / Delta_j, for z_j strictly below the max
        # (compared unscaled: a tiny margin may round to 0 once scaled).
        below = z < top
        # (1 / s) / Delta first: 1 / s alone can be near the subnormal range (s ~ 1e36).
        per_class = inverse_scale[:, None] / distances
        per_class = torch.where(below, per_class, torch.zeros_like(per_class))
        per_class.mul_((dot / divisor)[:, None])
        grad_logits = grad_logits - per_class
        grad_logits.scatter_add_(1, predicted[:, None], per_class.sum(dim=1, keepdim=True))
        grad_weight = None
        if ctx.needs_input_grad[1]:
            # c_j / weight_scale for the GEMMs on the scaled weight (geometry.DistanceRows);
            # u_j / Delta_j <= divisor, so each step stays in range.
            coefficients = (normalised / distances).div_(distances).div_(
                distances * weight_scale).mul_((-dot / divisor)[:, None])
            coefficients = torch.where(
                below & (raw_distances >= eps), coefficients, torch.zeros_like(coefficients)
            )
            rows = scaled_weight if rows is None else rows
            exact = None if refined_rows is None else (refined_rows, refined_columns)
            grad_weight = weight_gradient(scaled_weight, rows, per_sample, predicted,
                                          coefficients, exact=exact).to(ctx.weight_dtype)
        return (grad_logits.to(logits.dtype), grad_weight) + (None,) * 13


def elogitnorm_loss(
    logits: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    reduction: str,
    ignore_index: int,
    eps: float,
    divisor: int,
) -> torch.Tensor:
    """ELogitNorm (inputs already validated); ``divisor`` is the number, C or C - 1."""
    dtype = accumulation_dtype(logits, weight)
    with torch.no_grad():
        predicted = logits.argmax(dim=1)  # first index on ties, as torch.max
        # CPU: recompute near-coincident weight rows exactly (the check is a sync elsewhere).
        geometry = distance_rows(weight.detach(), predicted, dtype,
                                 refine=weight.device.type == "cpu")
    refined = geometry.refined
    if refined is not None and not torch.compiler.is_compiling() and refined[0].numel() == 0:
        refined = None  # eager and nothing refined: the backward skips the exact entries' ops
    return _ELogitNorm.apply(
        logits, weight, target, predicted, geometry.for_samples(predicted), geometry.weight,
        geometry.rows if geometry.per_sample else None,  # else the weight itself: not twice
        geometry.weight_scale, *(refined or (None, None)), geometry.per_sample,
        reduction, ignore_index, eps, divisor,
    )


def logitnorm_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    tau: float,
    reduction: str,
    ignore_index: int,
) -> torch.Tensor:
    """LogitNorm with fp32 (or fp64) accumulation; autograd gives the closed-form gradient.

    The reference formula on rows divided by their largest magnitude where it exceeds 1 (the
    norm's ``1e-7`` divided with them): the same value up to one rounding, without the
    overflow of ``||z||^2`` past ~1e19 in fp32 (the loss is scale invariant up to that
    ``1e-7``). Any positive divisor does: no margins are formed, so no power of two is needed.
    """
    z = as_dtype(logits, accumulation_dtype(logits))
    with torch.no_grad():
        # abs().amax(), not the inf-norm: several times faster on the CPU, same NaN.
        largest = z.abs().amax(dim=1, keepdim=True).clamp_min_(1.0)
    z = z / largest
    norms = torch.linalg.vector_norm(z, dim=1, keepdim=True) + LOGITNORM_NORM_EPS / largest
    loss = F.cross_entropy(z / (norms * tau), target, reduction=reduction,
                           ignore_index=ignore_index)
    return loss.to(logits.dtype)
