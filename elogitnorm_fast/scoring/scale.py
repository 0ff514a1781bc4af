"""ELogitNorm's per-row scale ``s`` at test time, memory-lean (no C x C matrix).

For logits ``z`` (N x C) and head weight ``W`` (C x D), per row (design.md section 2.1)::

    m = argmax_j z_j (first on ties),  v = z_m
    Delta_j = max(||w_m - w_j||_2, eps) for j != m,  Delta_m = 1
    s = max((1 / divisor) * sum_j (v - z_j) / Delta_j, eps)

``divisor`` is ``C`` (``"classes"``, the released code, default) or ``C - 1`` (``"paper"``).
``logits / s[:, None]`` are the normalised logits the model was trained on, usable for
calibrated confidence (e.g. ``msp(logits / s[:, None])``).

Only the distance rows of the classes a chunk of rows predicts are computed, from ``W`` on the
fly as ``sqrt(max(||w_m||^2 + ||w_j||^2 - 2 w_m . w_j, 0))`` in float32 (float64 when the logits
or ``W`` are float64): memory ``O(rows_per_chunk * C + C * D)``, never ``C x C``.
"""

from __future__ import annotations

import torch

from elogitnorm_fast.reference import DEFAULT_EPS, divisor_value

__all__ = ["elogitnorm_scale"]

_CHUNK_ELEMENTS = 1 << 22


@torch.no_grad()
def elogitnorm_scale(
    logits: torch.Tensor,
    weight: torch.Tensor,
    *,
    eps: float = DEFAULT_EPS,
    divisor: str = "classes",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """The per-row ELogitNorm scale ``s`` (N,), float32 (float64 for float64 inputs).

    Example: ``s = elogitnorm_scale(logits, model.fc.weight); conf = msp(logits / s[:, None])``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (N, C), got shape {tuple(logits.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (C, D), got shape {tuple(weight.shape)}")
    n_rows, n_cols = logits.shape
    if weight.shape[0] != n_cols:
        raise ValueError(
            f"weight must have one row per class: logits have C = {n_cols}, weight has "
            f"{weight.shape[0]} rows"
        )
    if logits.device != weight.device:
        raise ValueError(
            f"logits and weight must be on one device, got {logits.device} and {weight.device}"
        )
    div = divisor_value(n_cols, divisor)
    acc = torch.float64 if torch.float64 in (logits.dtype, weight.dtype) else torch.float32
    out = torch.empty(n_rows, dtype=acc, device=logits.device)
    if n_rows == 0:
        return out
    w = weight.detach().to(acc)
    sq_norms = (w * w).sum(dim=1)
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_ELEMENTS // n_cols)
    for start in range(0, n_rows, chunk_rows):
        z = logits[start : start + chunk_rows].detach().to(acc)
        top, predicted = z.max(dim=1)
        classes, row_of = torch.unique(predicted, return_inverse=True)
        w_u = w[classes]
        squared = sq_norms[classes, None] + sq_norms[None, :] - 2.0 * (w_u @ w.T)
        dist = squared.clamp_min_(0.0).sqrt_().clamp_min_(eps)
        dist[torch.arange(classes.numel(), device=dist.device), classes] = 1.0
        margins = (top[:, None] - z) / dist[row_of]
        out[start : start + chunk_rows] = (margins.sum(dim=1) / div).clamp_min_(eps)
    return out
