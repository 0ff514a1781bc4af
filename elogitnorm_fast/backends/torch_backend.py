"""The ``torch`` backend: memory-lean ELogitNorm and LogitNorm in plain PyTorch, any device.

ELogitNorm never builds the C x C x D difference tensor of the released code: only the distance
rows of the predicted classes (:mod:`elogitnorm_fast.geometry`), ``O(N C + C D)`` memory, and a
closed-form backward (design.md section 2.1) that reaches both the logits and the weight.
"""

from __future__ import annotations

import torch

from ..geometry import accumulation_dtype, distance_rows, unclamped_scale, weight_gradient
from ..reduction import reduce_rows, row_gradient_weights, valid_count
from ..reference import logitnorm_reference
from ..validation import check_first_derivative

NAME = "torch"


def unavailable_reason(device: torch.device) -> str | None:
    """Always available."""
    return None


def _safe_target(target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, target, torch.zeros_like(target))


class _ELogitNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, weight, target, reduction, ignore_index, eps, divisor):
        dtype = accumulation_dtype(logits, weight)
        z = logits.to(dtype)
        values, predicted = z.max(dim=1)
        # CPU: recompute near-coincident weight rows exactly (the check is a sync elsewhere).
        geometry = distance_rows(weight, predicted, dtype, refine=weight.device.type == "cpu")
        raw_distances = geometry.for_samples(predicted)
        raw_scale = unclamped_scale(z, values, raw_distances, eps, divisor)
        scale = raw_scale.clamp_min(eps)
        scaled = z / scale[:, None]
        log_norm = torch.logsumexp(scaled, dim=1)
        valid = target != ignore_index
        target_safe = _safe_target(target, valid)
        picked = scaled.gather(1, target_safe[:, None])[:, 0]
        row_losses = torch.where(valid, log_norm - picked, torch.zeros_like(log_norm))
        ctx.save_for_backward(
            z, weight, target_safe, valid, predicted, raw_scale, log_norm, raw_distances
        )
        # the weight gradient needs the rows, not the distances (C x C when N >= C)
        ctx.rows, ctx.per_sample = geometry.rows, geometry.per_sample
        ctx.options = (reduction, eps, divisor)
        ctx.logits_dtype = logits.dtype
        count = valid_count(valid, dtype) if reduction == "mean" else None
        return reduce_rows(row_losses, reduction, count).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        check_first_derivative(NAME, "ELogitNorm")
        z, weight, target, valid, predicted, raw_scale, log_norm, raw_distances = ctx.saved_tensors
        reduction, eps, divisor = ctx.options
        dtype = z.dtype
        g = row_gradient_weights(grad_output, valid, reduction, dtype)
        scale = raw_scale.clamp_min(eps)
        # G_j = g (p_j - [j = y]), p = softmax(z / s).
        grad_scaled = torch.exp(z / scale[:, None] - log_norm[:, None]) * g[:, None]
        grad_scaled.scatter_add_(1, target[:, None], -g[:, None])
        grad_logits = grad_scaled / scale[:, None]
        # ds = -(sum_j G_j z_j) / s^2, zero where the clamp s >= eps is active.
        grad_scale = -(grad_scaled * z).sum(dim=1) / (scale * scale)
        grad_scale = torch.where(raw_scale >= eps, grad_scale, torch.zeros_like(grad_scale))
        distances = raw_distances.clamp_min(eps)
        values = z.gather(1, predicted[:, None])
        margins = values - z
        # Through s = (1/divisor) sum_j (v - z_j) / Delta_j, for z_j strictly below the max.
        per_class = grad_scale[:, None] / (divisor * distances)
        per_class = torch.where(margins > 0, per_class, torch.zeros_like(per_class))
        grad_logits = grad_logits - per_class
        grad_logits.scatter_add_(1, predicted[:, None], per_class.sum(dim=1, keepdim=True))
        grad_weight = None
        if ctx.needs_input_grad[1]:
            # c_j = ds * (-(v - z_j) / (divisor Delta_j^2)) / Delta_j, zero where Delta is clamped.
            coefficients = -per_class * margins / (distances * distances)
            coefficients = torch.where(
                raw_distances >= eps, coefficients, torch.zeros_like(coefficients)
            )
            grad_weight = weight_gradient(weight, ctx.rows, ctx.per_sample, predicted,
                                          coefficients)
            grad_weight = grad_weight.to(weight.dtype)
        return grad_logits.to(ctx.logits_dtype), grad_weight, None, None, None, None, None


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
    return _ELogitNorm.apply(logits, weight, target, reduction, ignore_index, eps, divisor)


def logitnorm_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    tau: float,
    reduction: str,
    ignore_index: int,
) -> torch.Tensor:
    """LogitNorm with fp32 (or fp64) accumulation: the reference formula (one row-wise norm,
    no all-pairs term to avoid) on widened logits; autograd gives the closed-form gradient."""
    z = logits.to(accumulation_dtype(logits))
    loss = logitnorm_reference(z, target, tau=tau, reduction=reduction,
                               ignore_index=ignore_index)
    return loss.to(logits.dtype)
