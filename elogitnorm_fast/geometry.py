"""Class-distance rows and the weight gradient for ELogitNorm, without any C x C x D tensor.

ELogitNorm needs, for each sample, the distances ``||w_m - w_j||`` from its predicted class ``m``
to every class ``j``. Only the rows of predicted classes are needed, so we compute at most
``min(N, C)`` rows from ``W`` with one GEMM (``||a||^2 + ||b||^2 - 2 a.b``, accumulated in fp32, or
fp64 for fp64 inputs, clamped at 0):

* ``N < C``: one row per sample (``W[m] @ W^T``, N x C); no data-dependent shapes, so no host
  sync (``torch.unique`` would need one);
* ``N >= C``: one row per class (C x C, which is then no larger than the N x C logits).

Both backends that run the math in PyTorch (``torch`` and the glue of the compiled ones) share
these functions, so the GEMM layout and the weight-gradient formula exist once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 if any input is fp64, else fp32 (fp16 / bf16 inputs accumulate in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)``, which returns ``tensor`` itself when the dtype already matches,
    without the call (about 1 us of host time each, several per eager step of a fused backend)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class DistanceRows(NamedTuple):
    """Distances from the predicted classes to every class.

    ``rows`` (R x D) are the weight rows the distances start from and ``row_class`` (R,) their
    class indices; ``distances`` (R x C) holds ``||rows[r] - w_j||`` with the self-distance set to
    1 (the released code adds the identity). ``per_sample`` says whether row ``r`` belongs to
    sample ``r`` (R = N) or to class ``r`` (R = C).
    """

    rows: torch.Tensor
    row_class: torch.Tensor
    distances: torch.Tensor
    per_sample: bool

    def for_samples(self, predicted: torch.Tensor) -> torch.Tensor:
        """The N x C distance rows of the samples' predicted classes."""
        return self.distances if self.per_sample else self.distances.index_select(0, predicted)


def one_row_per_sample(n_rows: int, n_classes: int) -> bool:
    """Whether the distance rows (and the weight gradient's GEMMs) take one row per sample
    (``N < C``) rather than one per class."""
    return n_rows < n_classes


def predicted_rows(weight: torch.Tensor, predicted: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The weight rows the distance rows start from, and whether there is one per sample.

    :func:`one_row_per_sample`: ``weight[predicted]`` (N x D, one op), ``per_sample`` True;
    else ``weight`` itself (one row per class, no op).
    """
    per_sample = one_row_per_sample(predicted.shape[0], weight.shape[0])
    return (weight.index_select(0, predicted) if per_sample else weight), per_sample


#: Entries whose squared distance is below this fraction of ``|a|^2 + |b|^2`` lose most of their
#: digits to cancellation in ``|a|^2 + |b|^2 - 2 a.b``; :func:`distance_rows` recomputes them.
CANCELLATION_RATIO = 1e-2


def distance_rows(
    weight: torch.Tensor, predicted: torch.Tensor, dtype: torch.dtype, *, refine: bool = False
) -> DistanceRows:
    """Distance rows for the predicted classes (N,), computed in ``dtype`` from ``weight``.

    The GEMM form loses relative precision when two weight rows nearly coincide (in fp32 an
    exact duplicate comes out near ``1e-3 |w|`` instead of 0). With ``refine=True`` the few
    entries below :data:`CANCELLATION_RATIO` are recomputed from the direct difference; finding
    them (``nonzero``) synchronises with the device, so callers enable it on the CPU only.
    """
    w = as_dtype(weight, dtype)
    rows, per_sample = predicted_rows(w, predicted)
    row_class = predicted if per_sample else torch.arange(w.shape[0], device=w.device)
    squared_norms = (w * w).sum(dim=1)
    # ||a||^2 + ||b||^2 - 2 a.b in one addmm: (|a|^2 + |b|^2) - 2 * rows @ w^T, in place on the
    # fresh sum (an out-of-place addmm copies its input into the result first: on CUDA one more
    # device-to-device copy, a host call, per GEMM).
    squared = (squared_norms.index_select(0, row_class)[:, None] + squared_norms[None, :]).addmm_(
        rows, w.t(), alpha=-2.0
    )
    if refine and dtype != torch.float64:
        suspicious = squared < CANCELLATION_RATIO * (
            squared_norms.index_select(0, row_class)[:, None] + squared_norms[None, :]
        )
        suspicious.scatter_(1, row_class[:, None], False)
        row_index, column_index = suspicious.nonzero(as_tuple=True)
        if row_index.numel() > 0:
            difference = rows.index_select(0, row_index) - w.index_select(0, column_index)
            squared[row_index, column_index] = (difference * difference).sum(dim=1)
    distances = squared.clamp_min_(0.0).sqrt_()
    distances.scatter_(1, row_class[:, None], 1.0)
    return DistanceRows(rows, row_class, distances, per_sample)


def unclamped_scale(
    z: torch.Tensor, top: torch.Tensor, raw_distances: torch.Tensor, eps: float, divisor: float
) -> torch.Tensor:
    """ELogitNorm's scale before its clamp: ``sum_j (v - z_j) / max(Delta_j, eps) / divisor``
    per row, with ``top`` the rows' maxima ``v`` and ``raw_distances`` their distance rows
    (N x C, self-distance 1)."""
    return ((top[:, None] - z) / raw_distances.clamp_min(eps)).sum(dim=1) / divisor


def weight_gradient(
    weight: torch.Tensor,
    rows: torch.Tensor,
    per_sample: bool,
    predicted: torch.Tensor,
    coefficients: torch.Tensor,
    *,
    rows_sum_to_zero: bool = False,
) -> torch.Tensor:
    """Gradient of the loss with respect to ``W`` through the distances (design.md section 2.1).

    ``coefficients`` (N x C) holds ``c_nj = dL/dDelta_nj / Delta_nj`` for each sample ``n`` and
    class ``j``, so that ``dw_m += c_nj (w_m - w_j)`` and ``dw_j -= c_nj (w_m - w_j)``. Summed over
    the rows ``R`` (samples, or classes after pooling the samples' coefficients per predicted
    class), this is two GEMMs::

        dW = scatter_rows(rowsum(R) * W_rows - R W) + colsum(R) * W - R^T W_rows

    ``rows`` and ``per_sample`` as in :class:`DistanceRows` (one row per sample: ``W[predicted]``;
    one per class: ``W`` itself, and then it is one GEMM: ``S = R + R^T``,
    ``dW = rowsum(S) * W - S W``).

    ``c_nm`` at a sample's own predicted class multiplies ``w_m - w_m = 0``, so any value there
    gives the same dW. ``rows_sum_to_zero`` (per sample only): the caller put minus the rest of
    the row there (the Triton kernels do for N < C), so ``rowsum(R) = 0`` and the form drops
    that term (a sum and a multiply): ``dW = colsum(R) * W - R^T W_rows - scatter_rows(R W)``.
    """
    w = as_dtype(weight, coefficients.dtype)
    if per_sample:
        pooled = coefficients
    else:
        pooled = torch.zeros(
            w.shape[0], w.shape[0], dtype=coefficients.dtype, device=coefficients.device
        ).index_add_(0, predicted, coefficients)
        symmetric = pooled + pooled.t()
        return (symmetric.sum(dim=1, keepdim=True) * w).addmm_(symmetric, w, alpha=-1.0)
    # In place on the fresh products, as in distance_rows.
    transposed = pooled.t()
    grad = (transposed.sum(dim=1, keepdim=True) * w).addmm_(transposed, rows, alpha=-1.0)
    if rows_sum_to_zero:
        return grad.index_add_(0, predicted, torch.mm(pooled, w), alpha=-1.0)
    row_part = (pooled.sum(dim=1, keepdim=True) * rows).addmm_(pooled, w, alpha=-1.0)
    return grad.index_add_(0, predicted, row_part)
