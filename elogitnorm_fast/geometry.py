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

Squared norms overflow fp32 once entries pass ~1e19, so the distances are computed from ``W``
times a power of two (:func:`power_of_two_reciprocal` of its largest entry): exact scaling, so
ordinary weights give bitwise the same distances, and any finite weight gives finite ones.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 if any input is fp64, else fp32 (fp16 / bf16 inputs accumulate in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)``, which returns ``tensor`` itself when the dtype already matches,
    without the call: the eager steps of a fused backend make several, and each costs host time."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def power_of_two_reciprocal(magnitude: torch.Tensor, *, at_most_one: bool = False) -> torch.Tensor:
    """A power of two ``p`` per element of ``magnitude`` (>= 0, fp32 or fp64) with
    ``magnitude * p`` in ``[1, 4)`` for normal numbers (below 1 for subnormals and 0).

    Multiplying by ``p`` is exact, so a computation done on ``x * p`` and scaled back rounds
    exactly as on ``x``, without overflowing. ``at_most_one``: ``p <= 1`` (only large values are
    scaled). Read from the exponent bits (no ``frexp``, which some devices lack; no host sync):
    ``p`` stays representable for every input, inf and NaN included (``p`` is then
    ``2^-126`` / ``2^-1022``, and the product stays inf or NaN).
    """
    if magnitude.dtype == torch.float64:
        int_dtype, mantissa_bits, top = torch.int64, 52, 2046
    elif magnitude.dtype == torch.float32:
        int_dtype, mantissa_bits, top = torch.int32, 23, 254
    else:
        raise TypeError(f"magnitude must be float32 or float64, got {magnitude.dtype}")
    # The sign bit is 0 for magnitudes (a NaN from abs or amax included): no mask needed.
    exponent = magnitude.view(int_dtype) >> mantissa_bits
    # magnitude in [2^(e - bias), 2^(e - bias + 1)): p = 2^(bias - e) has the biased exponent
    # top - e, kept >= 1 (a normal power of two) and <= top (2^bias, or 1 with at_most_one).
    biased = (top - exponent).clamp(1, top // 2 if at_most_one else top)
    return (biased << mantissa_bits).view(magnitude.dtype)


class DistanceRows(NamedTuple):
    """Distances from the predicted classes to every class.

    ``distances`` (R x C) holds ``||w_m - w_j||`` for the class ``m = row_class[r]`` of each row,
    with the self-distance set to 1 (the released code adds the identity). ``per_sample`` says
    whether row ``r`` belongs to sample ``r`` (R = N) or to class ``r`` (R = C).

    ``weight_scale`` (0-d) is the power of two the distances were computed at: ``weight`` is
    ``W * weight_scale`` (in the compute dtype) and ``rows`` (R x D) its rows for ``row_class``.
    :func:`weight_gradient` on ``weight`` and ``rows`` with coefficients divided by
    ``weight_scale`` gives dW of the unscaled weight without overflow or underflow.

    ``refined``: the (row, column) indices of the entries recomputed from the direct difference
    (None where none were looked for); :func:`weight_gradient` takes them for the same reason.
    """

    rows: torch.Tensor
    row_class: torch.Tensor
    distances: torch.Tensor
    per_sample: bool
    weight: torch.Tensor
    weight_scale: torch.Tensor
    refined: tuple[torch.Tensor, torch.Tensor] | None = None

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


#: Entries whose squared distance is below this fraction of ``|a|^2 + |b|^2`` lose digits to
#: cancellation in ``|a|^2 + |b|^2 - 2 a.b`` (the rounding grows by up to its inverse), and the
#: weight gradient's GEMMs lose as many in ``c (w_m - w_j)`` formed as ``c w_m - c w_j``:
#: :func:`distance_rows` and :func:`weight_gradient` recompute them from the difference. Rows
#: of a trained head are far apart (few such entries); low-dimensional ones cost little.
CANCELLATION_RATIO = 0.25


def distance_rows(
    weight: torch.Tensor, predicted: torch.Tensor, dtype: torch.dtype, *, refine: bool = False
) -> DistanceRows:
    """Distance rows for the predicted classes (N,), computed in ``dtype`` from ``weight``.

    The GEMM form loses relative precision when two weight rows nearly coincide (in fp32 an
    exact duplicate comes out near ``1e-3 |w|`` instead of 0). With ``refine=True`` the few
    entries below :data:`CANCELLATION_RATIO` are recomputed from the direct difference (and
    listed in ``refined``); finding them (``nonzero``) synchronises with the device, so callers
    enable it on the CPU only. Under torch.compile the recomputation is traced with its
    data-dependent size (no graph break).
    """
    w = as_dtype(weight, dtype)
    if w.numel() > 0:
        weight_scale = power_of_two_reciprocal(w.abs().amax())
        w = w * weight_scale
    else:
        weight_scale = torch.ones((), dtype=dtype, device=w.device)
    rows, per_sample = predicted_rows(w, predicted)
    row_class = predicted if per_sample else torch.arange(w.shape[0], device=w.device)
    squared_norms = (w * w).sum(dim=1)
    # ||a||^2 + ||b||^2 - 2 a.b in one addmm: (|a|^2 + |b|^2) - 2 * rows @ w^T, in place on the
    # fresh sum (an out-of-place addmm copies its input into the result first: on CUDA one more
    # device-to-device copy, a host call, per GEMM).
    squared = (squared_norms.index_select(0, row_class)[:, None] + squared_norms[None, :]).addmm_(
        rows, w.t(), alpha=-2.0
    )
    refined = None
    if refine:
        suspicious = squared < CANCELLATION_RATIO * (
            squared_norms.index_select(0, row_class)[:, None] + squared_norms[None, :]
        )
        suspicious.scatter_(1, row_class[:, None], False)
        row_index, column_index = suspicious.nonzero(as_tuple=True)
        # Eager: skip the empty recomputation (the usual case). Traced: no branch on the count.
        if torch.compiler.is_compiling() or row_index.numel() > 0:
            difference = rows.index_select(0, row_index) - w.index_select(0, column_index)
            squared[row_index, column_index] = (difference * difference).sum(dim=1)
        refined = (row_index, column_index)
    # Back to the weight's units: exact, inf only where the distance itself exceeds the dtype.
    distances = squared.clamp_min_(0.0).sqrt_().div_(weight_scale)
    distances.scatter_(1, row_class[:, None], 1.0)
    return DistanceRows(rows, row_class, distances, per_sample, w, weight_scale, refined)


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
    exact: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Gradient of the loss with respect to ``W`` through the distances.

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

    ``exact`` (:attr:`DistanceRows.refined`, not with ``rows_sum_to_zero``): (row, column)
    entries of ``R`` whose rows are close against their norms. The GEMMs form their terms as
    ``c w_m - c w_j``, which cancels where ``c (w_m - w_j)`` is much smaller (and ``c`` grows as
    ``1 / Delta^3`` there); these entries are left out of the GEMMs and added from the
    difference instead.
    """
    if exact is not None and rows_sum_to_zero:
        raise ValueError("weight_gradient: exact entries would break rows_sum_to_zero")
    device_type = coefficients.device.type
    if torch.is_autocast_enabled(device_type):
        # A backward run inside an autocast region: the GEMMs would run in 16 bits there.
        with torch.autocast(device_type, enabled=False):
            return weight_gradient(weight, rows, per_sample, predicted, coefficients,
                                   rows_sum_to_zero=rows_sum_to_zero, exact=exact)
    w = as_dtype(weight, coefficients.dtype)
    if per_sample:
        pooled = coefficients
    else:
        pooled = torch.zeros(
            w.shape[0], w.shape[0], dtype=coefficients.dtype, device=coefficients.device
        ).index_add_(0, predicted, coefficients)
    row_class = predicted if per_sample else None
    if exact is not None:
        pooled, exact_part = _split_exact(pooled, rows, w, row_class, exact)
    if per_sample:
        # In place on the fresh products, as in distance_rows.
        transposed = pooled.t()
        grad = (transposed.sum(dim=1, keepdim=True) * w).addmm_(transposed, rows, alpha=-1.0)
        if rows_sum_to_zero:
            grad.index_add_(0, predicted, torch.mm(pooled, w), alpha=-1.0)
        else:
            row_part = (pooled.sum(dim=1, keepdim=True) * rows).addmm_(pooled, w, alpha=-1.0)
            grad.index_add_(0, predicted, row_part)
    else:
        symmetric = pooled + pooled.t()
        grad = (symmetric.sum(dim=1, keepdim=True) * w).addmm_(symmetric, w, alpha=-1.0)
    if exact is not None:
        grad = exact_part(grad)
    return grad


def _split_exact(pooled, rows, w, row_class, exact):
    """``pooled`` without the ``exact`` entries, and a function adding their terms
    ``c (w_m - w_j)`` to ``dw_m`` and ``-c (w_m - w_j)`` to ``dw_j`` from the difference
    (``row_class``: each row's class, None where row ``r`` is class ``r``)."""
    row_index, column_index = exact
    picked = pooled[row_index, column_index]
    pooled = pooled.index_put((row_index, column_index), torch.zeros_like(picked))

    def add(grad: torch.Tensor) -> torch.Tensor:
        own = row_index if row_class is None else row_class.index_select(0, row_index)
        terms = picked[:, None] * (rows.index_select(0, row_index) - w.index_select(0,
                                                                                   column_index))
        return grad.index_add_(0, own, terms).index_add_(0, column_index, terms, alpha=-1.0)

    return pooled, add
