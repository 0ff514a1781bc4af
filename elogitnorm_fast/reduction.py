"""Loss reductions shared by every backend, with ``F.cross_entropy``'s semantics.

``mean`` divides by the number of non-ignored rows (so an all-ignored batch gives NaN loss and
zero gradient, as ``F.cross_entropy`` does), ``sum`` adds, ``none`` returns one loss per row
(0 for ignored rows).
"""

from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum", "none")


def reduce_rows(
    row_losses: torch.Tensor, reduction: str, count: torch.Tensor | None = None
) -> torch.Tensor:
    """Reduce per-row losses (ignored rows already 0); ``count``: the number of valid rows
    (:func:`mean_count`), which only ``mean`` needs."""
    if reduction == "none":
        return row_losses
    total = row_losses.sum()
    if reduction == "sum":
        return total
    return total / count


def mean_count(
    reduction: str, target: torch.Tensor, ignore_index: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """For ``mean``, the number of valid rows as the 0-d ``dtype`` tensor it divides by (one op
    past the comparison: the sum accumulates in ``dtype``, exact below 2^24 rows in fp32);
    None for the other reductions, which need no count."""
    return valid_count(target != ignore_index, dtype) if reduction == "mean" else None


def valid_count(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The number of True entries of ``valid`` as a 0-d ``dtype`` tensor."""
    return valid.sum(dtype=dtype)


def row_gradient_weights(
    grad_output: torch.Tensor, valid: torch.Tensor, reduction: str, dtype: torch.dtype
) -> torch.Tensor:
    """Per-row upstream gradient ``g_n`` (N,) in ``dtype``: 0 on ignored rows.

    ``grad_output`` may be a scalar or any strided (N,) tensor, e.g. the stride-0 expansion that
    ``loss.sum().backward()`` produces for ``reduction="none"``.
    """
    g = grad_output.to(dtype)
    if reduction == "mean":
        g = g / valid_count(valid, dtype)
    return torch.where(valid, g.expand(valid.shape), torch.zeros((), dtype=dtype, device=g.device))
