"""ELogitNorm's per-row scale ``s`` at test time, memory-lean (no C x C matrix).

For logits ``z`` (N x C) and head weight ``W`` (C x D), per row (the scale of the ELogitNorm
loss, elogitnorm_fast/reference.py)::

    m = argmax_j z_j (first on ties),  v = z_m
    Delta_j = max(||w_m - w_j||_2, eps) for j != m,  Delta_m = 1
    s = max((1 / divisor) * sum_j (v - z_j) / Delta_j, eps)

``divisor`` is ``C`` (``"classes"``, the released code, default) or ``C - 1`` (``"paper"``).
``logits / s[:, None]`` are the normalised logits the model was trained on, usable for
scoring with any logit score (e.g. ``msp(logits / s[:, None])``).

Only the distance rows of the classes a chunk of rows predicts are computed, from ``W`` on the
fly, with the same geometry as the ``torch`` loss backend
(:func:`elogitnorm_fast.geometry.distance_rows`; on the CPU near-coincident weight rows are
recomputed exactly), in float32 (float64 when the logits or ``W`` are float64): memory
``O(rows_per_chunk * C + C * D)``, never ``C x C`` unless a chunk has at least C rows.
"""

from __future__ import annotations

import torch

from ..geometry import accumulation_dtype, distance_rows, unclamped_scale
from ..reference import DEFAULT_EPS, divisor_value
from ..validation import (
    check_compute_range,
    check_count,
    check_logits,
    check_positive,
    check_weight,
)

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

    ``chunk_rows``: rows per chunk, a positive integer (default: about 4M logits per chunk).

    Example: ``s = elogitnorm_scale(logits, model.fc.weight); z_norm = logits / s[:, None]``,
    then score ``z_norm`` like raw logits, e.g. ``msp(z_norm)``.
    """
    check_count("chunk_rows", chunk_rows, optional=True)
    check_logits(logits)
    check_weight(weight, logits)
    check_positive("eps", eps)
    check_compute_range("eps", eps, logits, weight)
    n_rows, n_cols = logits.shape
    div = divisor_value(n_cols, divisor)
    acc = accumulation_dtype(logits, weight)
    out = torch.empty(n_rows, dtype=acc, device=logits.device)
    chunk_rows = max(1, _CHUNK_ELEMENTS // n_cols) if chunk_rows is None else int(chunk_rows)
    refine = logits.device.type == "cpu"  # finding the entries to refine syncs elsewhere
    for start in range(0, n_rows, chunk_rows):
        z = logits[start : start + chunk_rows].detach().to(acc)
        top, predicted = z.max(dim=1)
        distances = distance_rows(weight.detach(), predicted, acc, refine=refine)
        scale = unclamped_scale(z, top, distances.for_samples(predicted), eps, div)
        out[start : start + chunk_rows] = scale.clamp_min_(eps)
    return out
