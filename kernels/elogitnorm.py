"""Triton kernel for ELogitNorm: per block of rows, loss, logits gradient and distance coefficients.

ELogitNorm (Ding et al., CVPR 2026, https://arxiv.org/abs/2504.11434), per row ``z`` (C,)
with predicted class ``m`` (first argmax), ``v = z_m``, the margins ``d_j = v - z_j >= 0`` and
the distance row ``Delta_j = max(||w_m - w_j||, eps)`` (``Delta_m = 1``)::

    s = max((1 / divisor) sum_j d_j / Delta_j, eps),   u_j = d_j / s
    loss = log(sum_j exp(-u_j)) + u_y

Gradient for an upstream gradient of 1 (the backward rescales rows; everything is linear in it),
with ``p = softmax(-u) = softmax(z / s)``, ``G = p - onehot(y)``, ``q = sum_j G_j u_j`` (so
``ds = q / s``; 0 while the clamp on ``s`` is active), ``k_j = q / (s divisor Delta_j)`` and
``T = {j : z_j < v}``::

    dz_j = G_j / s - [j in T] k_j + [j = m] sum_{i in T} k_i
    c_j  = -[j in T] (q / divisor) (u_j / Delta_j) / Delta_j / Delta_j   (0 where Delta_j is
           clamped)

Nothing here forms ``z / s`` or ``s^2``: ``u_j <= divisor Delta_j``, and ``1 / s <= 1 / eps``.
Each row's margins are taken at a power of two (:func:`.rows._row_scale` of the row's largest
magnitude; ``s`` and the clamp in the same units), exact, so they and their sums stay finite for
every finite fp32 logit; a clamped row divides by ``eps`` and then by that power (their product
can be subnormal). Distances too large for fp32 squares (``|w| > ~1e19``) are recomputed from
halved differences at a power of two (:func:`_scaled_distances`).

``c`` feeds the two weight-gradient GEMMs (:func:`elogitnorm_fast.geometry.weight_gradient`).
Its entry at the predicted class multiplies ``w_m - w_m = 0`` there. Where those GEMMs take one
row per sample (N < C, ``FOLD``), the kernels write minus the row's sum into it instead of 0:
the rows of ``c`` sum to zero, and the GEMMs skip the term ``(sum_j c_j) w_m``
(``rows_sum_to_zero=True``), two torch ops and an N x D pass fewer, for about twice the
rounding error in dW. With one row per
class (N >= C) the entry stays 0: the pooled form would only gain that rounding.
The max of ``z / s`` is ``v / s`` (``u_m = 0``), known before the row is read, so no online
max is needed. Rows with ``C <= BLOCK`` are read once; longer rows stream over column blocks
(pass 1: the scale, the row's power of two updated as larger entries arrive; pass 2: the
exponential sums; pass 3: gradient and coefficients). int64 offsets, fp32 arithmetic. Imported
lazily (needs triton).

GEMM path (:func:`elogitnorm_rows`): the host runs only the argmax, one GEMM of raw inner
products ``w_m . w_j`` (one row per sample for N < C, one per class otherwise) and the row
norms (one reduction); the kernel forms ``|w_m|^2 + |w_j|^2 - 2 w_m . w_j``, clamps it at 0,
takes the root, sets ``Delta_m = 1`` and recomputes cancelled entries exactly
(:func:`_distance_tile`), in every pass that needs the distances.

Small C (:func:`fuses_distances`): :func:`elogitnorm_rows_fused` is one launch per block of rows
that also takes the argmax (first index on ties; a NaN counts as the maximum, as in
``torch.argmax``) and computes the distance row from ``W`` by the direct difference, so the
host runs no argmax, GEMM or norms (small-C forwards are host-bound).

:func:`elogitnorm_loss` is the entry point. Eager, the autograd Function writes the unit
gradients and coefficients in the forward, and its backward rescales them by the upstream
gradient (:func:`.rows.scale_rows`) and forms dW (:mod:`.class_gradient` for few classes and
rows, else the GEMMs); an eager ``sum`` / ``mean`` reduces the loss in the kernel and returns it
through the C++ node of :mod:`.unit_gradient`, dW formed in the forward. Under torch.compile the
``triton_op`` s registered here run instead (traceable). :func:`config_for` chooses the paths.
Reference formula: :func:`elogitnorm_fast.reference.elogitnorm_reference`; tests:
``tests/triton/test_parity.py`` (every path against the reference) and the
behaviour files beside it.

Example::

    loss = elogitnorm_loss(logits, weight, target, reduction="mean", ignore_index=-100,
                           eps=1e-6, divisor=weight.shape[0])

    inner = weight.index_select(0, predicted) @ weight.t()
    norms = torch.linalg.vector_norm(weight, dim=1)
    losses, grad, coeff = elogitnorm_rows(logits, target, predicted, inner, weight,
                                          norms, per_sample=True,
                                          eps=1e-6, divisor=10, ignore_index=-100,
                                          write_grad=True, write_coefficients=True)
    losses, grad, coeff, predicted = elogitnorm_rows_fused(
        logits, target, weight, eps=1e-6, divisor=10, ignore_index=-100, write_grad=True,
        write_coefficients=True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ..geometry import as_dtype, one_row_per_sample, predicted_rows, weight_gradient
from ..reduction import mean_count, reduce_rows
from ..validation import check_first_derivative
from .class_gradient import PooledConfig, pooled_config, pooled_weight_gradient
from .rows import (
    COUNT_BLOCK,
    FLOAT32_MAX,
    REDUCE_CODES,
    Launch,
    RowBlocks,
    _program_rows,
    _row_scale,
    _row_targets,
    _row_weight,
    cdiv,
    counts_within_budget,
    launcher,
    next_power_of_2,
    row_blocks,
    scale_rows,
)
from .unit_gradient import has_unit_gradient_node, unit_gradient_node


@triton.jit
def _clamped(raw, eps):
    """``max(raw, eps)`` that keeps NaN (``tl.maximum`` may drop it)."""
    return tl.where(raw < eps, eps, raw)


@triton.jit
def _distance_tile(inner_base, cols, col_mask, mask, predicted, row_squared, norms_ptr,
                   weight_ptr, weight_stride, weight_col_stride, n_features):
    """Raw distances ``||w_m - w_j||`` of one column block from the inner products ``w_m . w_j``
    (``inner_base`` points at each row's inner-product row), 1 on the predicted class and on
    masked lanes (the released code adds the identity).

    ``|a|^2 + |b|^2 - 2 a.b`` (``row_squared`` = ``|w_m|^2``, ``norms_ptr`` the norms ``|w_j|``,
    squared here), clamped at 0 (NaN kept). In fp32 that form has an absolute error near
    ``eps_32 * (|a|^2 + |b|^2)``, so (near-)duplicate weight rows would get distances of ~1e-3
    instead of ~0: entries whose squared value is below 1e-2 of ``|a|^2 + |b|^2`` (the torch
    backend's CPU path uses :data:`elogitnorm_fast.geometry.CANCELLATION_RATIO`) are recomputed
    from the difference, as are entries whose ``|a|^2 + |b|^2`` overflowed (``|w| > ~1e19``);
    tiles without one (the normal case) skip the loop.
    """
    inner = tl.load(inner_base + cols[None, :], mask=mask, other=0.0)
    col_norm = tl.load(norms_ptr + cols, mask=col_mask, other=0.0)
    col_squared = col_norm * col_norm
    norm_sum = row_squared[:, None] + col_squared[None, :]
    squared = norm_sum - 2.0 * inner
    lanes = mask & (cols[None, :] != predicted[:, None])
    # Also where |w|^2 overflowed (norms, or an inner product's partial sums, of |w| > ~1e19),
    # or is NaN.
    overflowed = ~(norm_sum <= FLOAT32_MAX) | ~(tl.abs(inner) <= FLOAT32_MAX)
    suspect = lanes & ((squared < 1e-2 * norm_sum) | overflowed)
    distance = tl.where(lanes, tl.sqrt(tl.where(squared < 0.0, 0.0, squared)), 1.0)
    if tl.max(suspect.to(tl.int32)) > 0:
        exact = _scaled_distances(
            weight_ptr + (predicted[:, None] * weight_stride + 0 * cols[None, :]),
            weight_ptr + (0 * predicted[:, None] + cols[None, :] * weight_stride),
            weight_col_stride, n_features, suspect)
        distance = tl.where(suspect, exact, distance)
    return distance


@triton.jit
def _scaled_distances(row_base, col_base, col_stride, n_features, lanes):
    """``||a - b||`` per lane from the halved differences ``a / 2 - b / 2`` (exact halving, so
    no overflow even for entries of opposite sign near the fp32 limit), summed as squares at the
    power of two of their largest magnitude (:func:`.rows._row_scale`): two passes over the
    features, one load a lane per feature; a lane's NaN or inf comes out NaN or inf."""
    largest = tl.zeros(lanes.shape, dtype=tl.float32)
    for k in range(0, n_features):
        half = _half_difference(row_base, col_base, col_stride, k, lanes)
        largest = tl.where(tl.abs(half) > largest, tl.abs(half), largest)
        largest = tl.where(half != half, half, largest)  # keep NaN (tl.maximum may drop it)
    scale = _row_scale(largest)
    squares = tl.zeros(lanes.shape, dtype=tl.float32)
    for k in range(0, n_features):
        half = _half_difference(row_base, col_base, col_stride, k, lanes) * scale
        squares += half * half
    return 2.0 * (tl.sqrt(squares) / scale)


@triton.jit
def _half_difference(row_base, col_base, col_stride, k, lanes):
    a = tl.load(row_base + k * col_stride, mask=lanes, other=0.0).to(tl.float32)
    b = tl.load(col_base + k * col_stride, mask=lanes, other=0.0).to(tl.float32)
    return 0.5 * a - 0.5 * b


@triton.jit
def _scaled_margins(z, mask, value, row_scale):
    """``(v - z) * row_scale`` (0 on masked lanes) without forming ``v - z``: both products are
    exact, so it rounds once, as ``v - z`` would, and cannot overflow."""
    return tl.where(mask, value[:, None] * row_scale[:, None] - z * row_scale[:, None], 0.0)


@triton.jit
def _normalisation(raw_scale, row_scale, eps):
    """From ``s`` in the row's scaled units: whether the clamp is active, the divisor and the
    factor that give ``u = d / max(s, eps)`` from the scaled margins ``d``
    (:func:`_normalised`), and ``1 / max(s, eps)`` in the logits' units. NaN: not clamped."""
    clamped = raw_scale / row_scale < eps  # s itself: exact, or inf (never clamped)
    divide = tl.where(clamped, eps, raw_scale)
    unscale = tl.where(clamped, 1.0 / row_scale, 1.0)
    inverse = tl.where(clamped, 1.0 / eps, row_scale / raw_scale)
    return clamped, divide, unscale, inverse


@triton.jit
def _normalised(margin, divide, unscale):
    """``u = d / max(s, eps)`` from the scaled margins (see :func:`_normalisation`)."""
    return margin / divide[:, None] * unscale[:, None]


@triton.jit
def _elogitnorm_tiles(z, margin, raw_distance, cols, mask, value, predicted, target, divide,
                      unscale, inverse, log_sum, inverse_divided, q, coefficient_scale, below_sum,
                      eps):
    """Gradient and coefficient tiles of one column block (see the module docstring):
    ``inverse_divided`` is ``1 / (s divisor)``, ``q`` as there (0 on clamped or ignored rows),
    ``coefficient_scale`` ``-q / divisor``. ``k = (1 / (s divisor Delta)) q`` in that order:
    ``1 / s`` can be near the subnormal range (s ~ 1e36), ``1 / (s Delta)`` less so."""
    distance = _clamped(raw_distance, eps)
    normalised = _normalised(margin, divide, unscale)
    p = tl.exp(-normalised - log_sum[:, None])
    onehot = (cols[None, :] == target[:, None]).to(tl.float32)
    below = mask & (z < value[:, None])
    k = tl.where(below, inverse_divided[:, None] / distance * q[:, None], 0.0)
    is_predicted = cols[None, :] == predicted[:, None]
    grad = (p - onehot) * inverse[:, None] - k
    grad += tl.where(is_predicted, (inverse_divided * below_sum * q)[:, None], 0.0)
    # u / Delta <= divisor; u held finite so that a zero coefficient scale stays 0.
    ratio = tl.minimum(normalised, FLOAT32_MAX) / distance
    coefficients = tl.where(below & (raw_distance >= eps),
                            coefficient_scale[:, None] * ratio / distance / distance, 0.0)
    return grad, coefficients


@triton.jit
def _single_block(z, raw_distance, cols, mask, value, predicted, target, z_target, valid, eps,
                  inv_divisor, row_weight, WANT_TILES: tl.constexpr, FOLD: tl.constexpr):
    """Loss (0 on invalid rows) and, when ``WANT_TILES``, the gradient and coefficient tiles of
    rows held in one column block (steps 2-4 of the module docstring), all times ``row_weight``
    (each row's share of a reduced loss, :func:`.rows._row_weight`; the gradient's invalid rows
    stay 0, the loss's are 0 x inf = NaN for an all-ignored mean). ``raw_distance`` is the
    unclamped distance tile (1 on the predicted class and on masked lanes). ``FOLD``: the
    predicted class's coefficient is minus the rest of the row (module docstring)."""
    # The row's power of two, the scaled margins, s and sum_{j in T} 1 / Delta_j.
    row_scale = _row_scale(tl.max(tl.where(mask, tl.abs(z), 0.0), axis=1))
    margin = _scaled_margins(z, mask, value, row_scale)
    distance = _clamped(raw_distance, eps)
    margin_sum = tl.sum(margin / distance, axis=1)
    below_sum = tl.sum(tl.where(mask & (z < value[:, None]), 1.0 / distance, 0.0), axis=1)
    clamped, divide, unscale, inverse = _normalisation(margin_sum * inv_divisor, row_scale, eps)
    # sum_j exp(-u_j) and sum_j exp(-u_j) u_j; the max of -u is u_m = 0.
    normalised = _normalised(margin, divide, unscale)
    e = tl.where(mask, tl.exp(-normalised), 0.0)
    exp_sum = tl.sum(e, axis=1)
    log_sum = tl.log(exp_sum)
    target_normalised = (value * row_scale - z_target * row_scale) / divide * unscale
    loss = tl.where(valid, log_sum + target_normalised, 0.0) * row_weight
    grad = z
    coefficients = z
    if WANT_TILES:
        # q = sum_j p_j u_j - u_y; ds = q / s; 0 on an active clamp or an ignored row.
        exp_dot = tl.sum(e * tl.minimum(normalised, FLOAT32_MAX), axis=1)
        q = tl.where(valid & ~clamped, exp_dot / exp_sum - target_normalised, 0.0)
        grad, coefficients = _elogitnorm_tiles(
            z, margin, raw_distance, cols, mask, value, predicted, target, divide, unscale,
            inverse, log_sum, inverse * inv_divisor, q, -q * inv_divisor, below_sum, eps)
        grad = tl.where(valid[:, None], grad * row_weight, 0.0)
        coefficients = tl.where(valid[:, None], coefficients * row_weight, 0.0)
        if FOLD:  # minus the row's sum at the predicted class (module docstring)
            row_sum = tl.sum(tl.where(mask, coefficients, 0.0), axis=1)
            coefficients = tl.where(cols[None, :] == predicted[:, None], -row_sum[:, None],
                                    coefficients)
    return loss, grad, coefficients


@triton.jit
def _elogitnorm_kernel(
    logits_ptr,
    logits_stride,
    target_ptr,
    predicted_ptr,
    inner_ptr,
    inner_stride,
    weight_ptr,
    weight_stride,
    weight_col_stride,
    n_features,
    norms_ptr,
    loss_ptr,
    grad_ptr,
    grad_stride,
    coefficient_ptr,
    coefficient_stride,
    n_rows,
    n_cols,
    eps,
    inv_divisor,
    ignore_index,
    PER_SAMPLE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    WRITE_COEFFICIENTS: tl.constexpr,
    SINGLE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    REDUCE: tl.constexpr,
    COUNT_BLOCK: tl.constexpr,
):
    # 0. Each row's share of the loss (REDUCE: .rows._row_weight), which scales everything the
    #    kernel writes: the host sums the losses, the backward gets the loss's gradient.
    row_weight = _row_weight(target_ptr, n_rows, n_cols, ignore_index, REDUCE, COUNT_BLOCK)
    # 1. Rows, targets, predicted class m and v = z_m; int64 offsets.
    rows, row_mask = _program_rows(n_rows, ROWS)
    cols = tl.arange(0, BLOCK)
    target, valid, in_range = _row_targets(target_ptr, rows, row_mask, n_cols, ignore_index)
    predicted = tl.load(predicted_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    value = tl.load(logits_ptr + rows * logits_stride + predicted, mask=row_mask,
                    other=0.0).to(tl.float32)
    z_target = tl.load(logits_ptr + rows * logits_stride + target, mask=in_range,
                       other=float("nan")).to(tl.float32)
    row_base = logits_ptr + rows[:, None] * logits_stride
    # Inner-product row w_m . w_j: the sample's own (N < C) or its predicted class's (N >= C).
    if PER_SAMPLE:
        inner_base = inner_ptr + rows[:, None] * inner_stride
    else:
        inner_base = inner_ptr + predicted[:, None] * inner_stride
    row_norm = tl.load(norms_ptr + predicted)
    row_squared = row_norm * row_norm

    grad_base = grad_ptr + rows[:, None] * grad_stride
    coefficient_base = coefficient_ptr + rows[:, None] * coefficient_stride

    if SINGLE:
        col_mask = cols < n_cols
        mask = row_mask[:, None] & col_mask[None, :]
        z = tl.load(row_base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        raw_distance = _distance_tile(inner_base, cols, col_mask, mask, predicted, row_squared,
                                      norms_ptr, weight_ptr, weight_stride, weight_col_stride,
                                      n_features)
        loss, grad, coefficients = _single_block(
            z, raw_distance, cols, mask, value, predicted, target, z_target, valid, eps,
            inv_divisor, row_weight, WRITE_GRAD or WRITE_COEFFICIENTS,
            PER_SAMPLE and WRITE_COEFFICIENTS)
        tl.store(loss_ptr + rows, loss, mask=row_mask)
        if WRITE_GRAD:
            tl.store(grad_base + cols[None, :], grad.to(grad_ptr.dtype.element_ty), mask=mask)
        if WRITE_COEFFICIENTS:
            tl.store(coefficient_base + cols[None, :], coefficients, mask=mask)
    else:
        # 2. s = sum_j d_j / Delta_j / divisor in the row's scaled units, and sum_{j in T}
        #    1 / Delta_j. The row's power of two starts at |v| and shrinks as larger entries
        #    arrive; the sum shrinks with it (exactly).
        largest = tl.abs(value)
        row_scale = _row_scale(largest)
        margin_sum = tl.zeros([ROWS], dtype=tl.float32)
        below_sum = tl.zeros([ROWS], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            block_cols = start + cols
            col_mask = block_cols < n_cols
            mask = row_mask[:, None] & col_mask[None, :]
            zb = tl.load(row_base + block_cols[None, :], mask=mask, other=0.0).to(tl.float32)
            db = _clamped(_distance_tile(inner_base, block_cols, col_mask, mask, predicted,
                                         row_squared, norms_ptr, weight_ptr, weight_stride,
                                         weight_col_stride, n_features), eps)
            block_largest = tl.max(tl.where(mask, tl.abs(zb), 0.0), axis=1)
            largest = tl.where(block_largest > largest, block_largest, largest)
            new_scale = _row_scale(largest)
            shrink = new_scale / row_scale  # a power of two <= 1
            row_scale = new_scale
            margin = _scaled_margins(zb, mask, value, row_scale)
            margin_sum = margin_sum * shrink + tl.sum(margin / db, axis=1)
            below_sum += tl.sum(tl.where(mask & (zb < value[:, None]), 1.0 / db, 0.0), axis=1)
        clamped, divide, unscale, inverse = _normalisation(margin_sum * inv_divisor, row_scale,
                                                           eps)

        # 3. sum_j exp(-u_j) and sum_j exp(-u_j) u_j; the max of -u is u_m = 0.
        exp_sum = tl.zeros([ROWS], dtype=tl.float32)
        exp_dot = tl.zeros([ROWS], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            block_cols = start + cols
            mask = row_mask[:, None] & (block_cols[None, :] < n_cols)
            zb = tl.load(row_base + block_cols[None, :], mask=mask, other=0.0).to(tl.float32)
            normalised = _normalised(_scaled_margins(zb, mask, value, row_scale), divide,
                                     unscale)
            e = tl.where(mask, tl.exp(-normalised), 0.0)
            exp_sum += tl.sum(e, axis=1)
            exp_dot += tl.sum(e * tl.minimum(normalised, FLOAT32_MAX), axis=1)
        log_sum = tl.log(exp_sum)
        target_normalised = (value * row_scale - z_target * row_scale) / divide * unscale
        loss = log_sum + target_normalised
        tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0) * row_weight, mask=row_mask)

        # 4. q = sum_j p_j u_j - u_y, ds = q / s; 0 on an active clamp or an ignored row.
        if WRITE_GRAD or WRITE_COEFFICIENTS:
            q = tl.where(valid & ~clamped, exp_dot / exp_sum - target_normalised, 0.0)
            inverse_divided = inverse * inv_divisor
            coefficient_scale = -q * inv_divisor
            row_sum = tl.zeros([ROWS], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                block_cols = start + cols
                col_mask = block_cols < n_cols
                mask = row_mask[:, None] & col_mask[None, :]
                zb = tl.load(row_base + block_cols[None, :], mask=mask, other=0.0)
                zb = zb.to(tl.float32)
                db = _distance_tile(inner_base, block_cols, col_mask, mask, predicted,
                                    row_squared, norms_ptr, weight_ptr, weight_stride,
                                    weight_col_stride, n_features)
                grad, coefficients = _elogitnorm_tiles(
                    zb, _scaled_margins(zb, mask, value, row_scale), db, block_cols, mask, value,
                    predicted, target, divide, unscale, inverse, log_sum, inverse_divided, q,
                    coefficient_scale, below_sum, eps)
                if WRITE_GRAD:
                    grad = tl.where(valid[:, None], grad * row_weight, 0.0)
                    tl.store(grad_base + block_cols[None, :],
                             grad.to(grad_ptr.dtype.element_ty), mask=mask)
                if WRITE_COEFFICIENTS:
                    coefficients = tl.where(valid[:, None], coefficients * row_weight, 0.0)
                    if PER_SAMPLE:  # the predicted class's entry is stored after the loop
                        row_sum += tl.sum(coefficients, axis=1)
                        mask = mask & (block_cols[None, :] != predicted[:, None])
                    tl.store(coefficient_base + block_cols[None, :], coefficients, mask=mask)
            if WRITE_COEFFICIENTS and PER_SAMPLE:
                # Minus the rest of the row (module docstring): the sum of what was stored.
                tl.store(coefficient_ptr + rows * coefficient_stride + predicted, -row_sum,
                         mask=row_mask)


#: The fused small-C kernel (:func:`elogitnorm_rows_fused`) computes each row's distances from
#: ``W`` itself, by the direct difference over feature tiles: ``N C D`` multiply-adds on the CUDA
#: cores and every program reading all of ``W`` (through L2), against ``U C D`` in the GEMM path,
#: which costs about ten more launches: it pays where launches dominate. C <= 128 keeps a block
#: of rows, its distance tile and the difference tile in registers with FEATURES >= 8 (32-byte
#: loads); C * D <= 2^17 (W <= 512 KiB in fp32) bounds the work per row.
FUSED_MAX_CLASSES = 128
FUSED_MAX_WEIGHT = 1 << 17


def fuses_distances(n_cols: int, n_features: int) -> bool:
    """Whether :func:`elogitnorm_rows_fused` handles C = ``n_cols``, D = ``n_features``."""
    return n_cols <= FUSED_MAX_CLASSES and n_cols * n_features <= FUSED_MAX_WEIGHT


@dataclass(frozen=True)
class FusedBlocks:
    """Blocks of the fused kernel: ``rows`` x ``block`` columns per program, feature tiles of
    ``features``, ``num_warps``; ``deferred_sums``: the distance loop accumulates its squares
    elementwise and sums them over the features once, after the loop (else once per tile, a
    reduction across threads at every step)."""

    rows: int
    block: int
    features: int
    num_warps: int
    deferred_sums: bool = True


def fused_blocks(n_cols: int, n_features: int, *, rows: int = 1, tile: int = 16384,
                 per_thread: int = 32, deferred_sums: bool = True) -> FusedBlocks:
    """The fused kernel's blocks: ``rows`` rows per program (one: more programs, and shorter
    feature loops, than several rows each), a difference tile (rows x block x features) of at
    most ``tile`` elements, warps enough for ``per_thread`` of them a thread (4 to 16). Every
    step of the distance loop waits on its loads from L2, so fewer, larger steps go faster."""
    block = max(16, next_power_of_2(n_cols))
    features = min(next_power_of_2(max(n_features, 1)), max(8, tile // (rows * block)))
    warps = rows * block * features // (32 * per_thread)
    return FusedBlocks(rows, block, features, min(16, max(4, warps)), deferred_sums)


@triton.jit
def _first_argmax(z, cols, mask, BLOCK: tl.constexpr):
    """Index and value of each row's first maximum, like ``torch.argmax``: a NaN counts as the
    maximum (the first NaN wins, value NaN), and masked lanes never win."""
    candidates = tl.where(mask, z, float("-inf"))
    top = tl.max(candidates, axis=1)
    at_top = mask & (candidates == top[:, None])
    first_top = tl.min(tl.where(at_top, cols[None, :], BLOCK), axis=1)
    first_nan = tl.min(tl.where(mask & (z != z), cols[None, :], BLOCK), axis=1)
    has_nan = first_nan < BLOCK
    predicted = tl.where(has_nan, first_nan, first_top)
    value = tl.where(has_nan, float("nan"), top)
    return predicted, value


@triton.jit
def _direct_distances(weight_ptr, weight_stride, weight_col_stride, n_features, predicted, cols,
                      row_mask, col_mask, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                      FEATURES: tl.constexpr, DEFERRED: tl.constexpr):
    """``||w_m - w_j||`` (ROWS x BLOCK) from the difference over feature tiles, fp32: exact up
    to rounding, so duplicate rows give 0 (no cancellation fix-up as in the GEMM form).

    ``DEFERRED`` (:class:`FusedBlocks` ``deferred_sums``): the squares accumulate elementwise
    over the feature tiles and are summed over features once, after the loop (no shuffle or
    barrier in the loop); otherwise each tile is summed as it comes."""
    if DEFERRED:
        # Pointers built in 3-D once, so that each step's loads arrive in the layout of the
        # difference tile (2-D loads broadcast to 3-D went through shared memory every step).
        features = tl.arange(0, FEATURES)[None, None, :]
        row_base = weight_ptr + predicted[:, None, None] * weight_stride
        col_base = weight_ptr + cols[None, :, None].to(tl.int64) * weight_stride
        squares = tl.zeros([ROWS, BLOCK, FEATURES], dtype=tl.float32)
        for start in range(0, n_features, FEATURES):
            k = start + features
            offsets = k.to(tl.int64) * weight_col_stride
            a = tl.load(row_base + offsets, mask=row_mask[:, None, None] & (k < n_features),
                        other=0.0)
            b = tl.load(col_base + offsets, mask=col_mask[None, :, None] & (k < n_features),
                        other=0.0)
            diff = a.to(tl.float32) - b.to(tl.float32)
            squares += diff * diff
        return tl.sqrt(tl.sum(squares, axis=2))
    features = tl.arange(0, FEATURES)
    row_base = weight_ptr + predicted[:, None] * weight_stride
    col_base = weight_ptr + cols[:, None].to(tl.int64) * weight_stride
    squared = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for start in range(0, n_features, FEATURES):
        k = start + features
        k_mask = k < n_features
        offsets = k[None, :].to(tl.int64) * weight_col_stride
        a = tl.load(row_base + offsets, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(col_base + offsets, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        diff = a.to(tl.float32)[:, None, :] - b.to(tl.float32)[None, :, :]
        squared += tl.sum(diff * diff, axis=2)
    return tl.sqrt(squared)


@triton.jit
def _elogitnorm_fused_kernel(
    logits_ptr,
    logits_stride,
    target_ptr,
    predicted_ptr,
    weight_ptr,
    weight_stride,
    weight_col_stride,
    n_features,
    loss_ptr,
    grad_ptr,
    grad_stride,
    coefficient_ptr,
    coefficient_stride,
    n_rows,
    n_cols,
    eps,
    inv_divisor,
    ignore_index,
    WRITE_GRAD: tl.constexpr,
    WRITE_COEFFICIENTS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    FEATURES: tl.constexpr,
    REDUCE: tl.constexpr,
    COUNT_BLOCK: tl.constexpr,
    FOLD: tl.constexpr,
    DEFERRED: tl.constexpr,
):
    # Rows of at most BLOCK columns: argmax, distance row from W, then the one-block math,
    # everything written scaled by the row's share of the loss (as in _elogitnorm_kernel).
    row_weight = _row_weight(target_ptr, n_rows, n_cols, ignore_index, REDUCE, COUNT_BLOCK)
    rows, row_mask = _program_rows(n_rows, ROWS)
    cols = tl.arange(0, BLOCK)
    target, valid, in_range = _row_targets(target_ptr, rows, row_mask, n_cols, ignore_index)
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    z = tl.load(logits_ptr + rows[:, None] * logits_stride + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    predicted, value = _first_argmax(z, cols, mask, BLOCK)
    predicted = tl.where(row_mask, predicted, 0).to(tl.int64)
    tl.store(predicted_ptr + rows, predicted, mask=row_mask)
    z_target = tl.load(logits_ptr + rows * logits_stride + target, mask=in_range,
                       other=float("nan")).to(tl.float32)
    raw_distance = _direct_distances(weight_ptr, weight_stride, weight_col_stride, n_features,
                                     predicted, cols, row_mask, col_mask, ROWS, BLOCK, FEATURES,
                                     DEFERRED)
    # Squares past fp32 (|w| > ~1e19) overflowed: those lanes again, from scaled differences.
    overflow = mask & ~(raw_distance <= FLOAT32_MAX)
    if tl.max(overflow.to(tl.int32)) > 0:
        exact = _scaled_distances(
            weight_ptr + (predicted[:, None] * weight_stride + 0 * cols[None, :]),
            weight_ptr + (0 * predicted[:, None] + cols[None, :].to(tl.int64) * weight_stride),
            weight_col_stride, n_features, overflow)
        raw_distance = tl.where(overflow, exact, raw_distance)
    # Delta_m = 1 (the released code adds the identity); masked lanes 1, as in _distance_tile.
    raw_distance = tl.where(mask & (cols[None, :] != predicted[:, None]), raw_distance, 1.0)
    loss, grad, coefficients = _single_block(
        z, raw_distance, cols, mask, value, predicted, target, z_target, valid, eps, inv_divisor,
        row_weight, WRITE_GRAD or WRITE_COEFFICIENTS, FOLD)
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    if WRITE_GRAD:
        tl.store(grad_ptr + rows[:, None] * grad_stride + cols[None, :],
                 grad.to(grad_ptr.dtype.element_ty), mask=mask)
    if WRITE_COEFFICIENTS:
        tl.store(coefficient_ptr + rows[:, None] * coefficient_stride + cols[None, :],
                 coefficients, mask=mask)


def elogitnorm_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    predicted: torch.Tensor,
    inner: torch.Tensor,
    weight: torch.Tensor,
    norms: torch.Tensor,
    *,
    per_sample: bool,
    eps: float,
    divisor: int,
    ignore_index: int,
    write_grad: bool,
    write_coefficients: bool,
    blocks: RowBlocks | None = None,
    reduce: int = 0,
    traced: bool = True,
    launch: Launch | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ELogitNorm losses (fp32), unit-upstream logits gradient and coefficients ``c``.

    ``inner`` (fp32, unit column stride) holds the raw inner products ``w_m . w_j`` of one GEMM:
    one row per sample (``per_sample``, row ``n`` for ``m = predicted[n]``) or one per class
    (row ``m``). The kernel turns them into distances with the fp32 row ``norms`` (C,) of
    ``weight`` (C, D), recomputing from ``weight`` the entries where that form cancels, and sets
    the predicted class's own distance to 1. The gradient has the logits' dtype, the
    coefficients are fp32 (with ``per_sample``, each row's entry at its predicted class is minus
    the sum of the others: see the module docstring); each is an empty tensor when not
    requested. ``reduce`` 1 (``sum``) or 2 (``mean``): the kernel counts the valid rows and
    writes each row's share of the reduced loss, and the gradient and coefficients for it
    (their sum is the loss; see :func:`.rows.counts_within_budget`). ``blocks``: None,
    :func:`.rows.row_blocks` of C. ``traced``, ``launch``: see :func:`.rows.launcher`.
    """
    n_rows, n_cols = logits.shape
    device = logits.device
    losses = torch.empty(n_rows, dtype=torch.float32, device=device)
    grad = torch.empty((n_rows if write_grad else 0, n_cols), dtype=logits.dtype, device=device)
    coefficients = torch.empty((n_rows if write_coefficients else 0, n_cols),
                               dtype=torch.float32, device=device)
    if n_rows == 0:
        return losses, grad, coefficients
    blocks = row_blocks(n_cols) if blocks is None else blocks
    launcher(_elogitnorm_kernel, (cdiv(n_rows, blocks.rows),), traced, launch)(
        logits, logits.stride(0), target, predicted, inner, inner.stride(0),
        weight, weight.stride(0), weight.stride(1), weight.shape[1], norms,
        losses, grad, grad.stride(0), coefficients, coefficients.stride(0),
        n_rows, n_cols, eps, 1.0 / divisor, ignore_index,
        PER_SAMPLE=per_sample, WRITE_GRAD=write_grad, WRITE_COEFFICIENTS=write_coefficients,
        SINGLE=blocks.single, ROWS=blocks.rows, BLOCK=blocks.block, REDUCE=reduce,
        COUNT_BLOCK=COUNT_BLOCK, num_warps=blocks.num_warps,
    )
    return losses, grad, coefficients


def elogitnorm_rows_fused(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    *,
    eps: float,
    divisor: int,
    ignore_index: int,
    write_grad: bool,
    write_coefficients: bool,
    blocks: FusedBlocks | None = None,
    reduce: int = 0,
    traced: bool = True,
    launch: Launch | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`elogitnorm_rows` for small C (:func:`fuses_distances`) in one launch, which also
    takes the argmax and the distance rows: returns ``(losses, grad, coefficients, predicted)``,
    ``predicted`` (N,) int64 as ``logits.argmax(1)``. ``weight`` (C, D) may have any strides.
    ``reduce``, and the coefficients' rows summing to zero for N < C: as in
    :func:`elogitnorm_rows`. ``blocks``: None, :func:`fused_blocks` of C and D.
    """
    n_rows, n_cols = logits.shape
    device = logits.device
    losses = torch.empty(n_rows, dtype=torch.float32, device=device)
    grad = torch.empty((n_rows if write_grad else 0, n_cols), dtype=logits.dtype, device=device)
    coefficients = torch.empty((n_rows if write_coefficients else 0, n_cols),
                               dtype=torch.float32, device=device)
    predicted = torch.empty(n_rows, dtype=torch.int64, device=device)
    if n_rows == 0:
        return losses, grad, coefficients, predicted
    blocks = fused_blocks(n_cols, weight.shape[1]) if blocks is None else blocks
    launcher(_elogitnorm_fused_kernel, (cdiv(n_rows, blocks.rows),), traced, launch)(
        logits, logits.stride(0), target, predicted, weight, weight.stride(0), weight.stride(1),
        weight.shape[1], losses, grad, grad.stride(0), coefficients, coefficients.stride(0),
        n_rows, n_cols, eps, 1.0 / divisor, ignore_index,
        WRITE_GRAD=write_grad, WRITE_COEFFICIENTS=write_coefficients,
        ROWS=blocks.rows, BLOCK=blocks.block, FEATURES=blocks.features,
        REDUCE=reduce, COUNT_BLOCK=COUNT_BLOCK, DEFERRED=blocks.deferred_sums,
        FOLD=write_coefficients and one_row_per_sample(n_rows, n_cols),
        num_warps=blocks.num_warps,
    )
    return losses, grad, coefficients, predicted


@dataclass(frozen=True)
class ELogitNormConfig:
    """How an eager ELogitNorm call runs (:func:`config_for` chooses it from the shapes).

    ``fused``: the one-launch small-C kernel's blocks (None: the GEMM path). ``blocks``: the
    GEMM path's column block, rows per program and warps. ``reduce``: a ``sum`` / ``mean`` is
    reduced in the kernel (each row's share of the loss), else by torch ops from per-row losses.
    ``node``: a reduced step that needs a gradient forms every gradient in the forward and
    returns through the C++ node (:mod:`.unit_gradient`), else through the Python Function.
    ``pooled``: the eager weight gradient comes from :mod:`.class_gradient`'s one launch with
    these blocks (None: the GEMMs of :func:`elogitnorm_fast.geometry.weight_gradient`).
    ``launch``: the eager launch (:func:`.rows.launcher`).
    """

    fused: FusedBlocks | None
    blocks: RowBlocks
    reduce: bool = False
    node: bool = False
    pooled: PooledConfig | None = None
    launch: Launch | None = None


def config_for(n_rows: int, n_cols: int, n_features: int, reduction: str, *,
               block_cols: int | None = None, capturing: bool = False) -> ELogitNormConfig:
    """The configuration of an ELogitNorm of N = ``n_rows``, C = ``n_cols``, D = ``n_features``
    with ``reduction``. ``block_cols`` forces the GEMM path and its column block
    (:func:`.rows.row_blocks`). ``capturing``: a CUDA graph is being captured (replayed, host
    work costs nothing and the node's multiplies would be extra kernels: no node)."""
    fused = None
    if block_cols is None and fuses_distances(n_cols, n_features):
        fused = fused_blocks(n_cols, n_features)
    blocks = row_blocks(n_cols, block_cols)
    rows = fused.rows if fused is not None else blocks.rows
    reduce = reduction != "none" and counts_within_budget(n_rows, rows, reduction)
    node = reduce and not capturing and has_unit_gradient_node()
    return ELogitNormConfig(fused, blocks, reduce, node, pooled_config(n_rows, n_cols))


def _forward(logits, weight, target, ignore_index, eps, divisor, write_grad, write_coefficients,
             config, reduce, traced):
    """``(losses, grad, coefficients, predicted)`` and the fp32 rows ``W[predicted]`` where the
    GEMM path gathered them (one per sample, N < C; else None): the weight gradient's GEMMs
    need them again. ``reduce`` (eager only): 1 / 2, the losses are the rows' shares of the sum
    / mean, and the gradient and coefficients are written for them."""
    if config.fused is not None:
        return elogitnorm_rows_fused(
            logits, target, weight, eps=eps, divisor=divisor, ignore_index=ignore_index,
            write_grad=write_grad, write_coefficients=write_coefficients, blocks=config.fused,
            reduce=reduce, traced=traced, launch=config.launch), None
    # Without autograd: the node's path runs this with grad mode on, and recording would keep
    # W[predicted] alive until the backward and record a node per op.
    with torch.no_grad():
        predicted = logits.argmax(dim=1)  # first index on ties, like torch.max
        w = as_dtype(weight, torch.float32)
        rows, per_sample = predicted_rows(w, predicted)
        # Raw inner products only (R x C, fp32 accumulation); the kernel forms the distances.
        inner = torch.mm(rows, w.t())
        norms = torch.linalg.vector_norm(w, dim=1)  # one reduction; the kernel squares them
    losses, grad, coefficients = elogitnorm_rows(
        logits, target, predicted, inner, w, norms, per_sample=per_sample, eps=eps,
        divisor=divisor, ignore_index=ignore_index, write_grad=write_grad,
        write_coefficients=write_coefficients, blocks=config.blocks, reduce=reduce,
        traced=traced, launch=config.launch)
    return (losses, grad, coefficients, predicted), (rows if per_sample else None)


@torch.no_grad()  # the node's forward runs it with grad mode on (see _forward)
def _gemm_weight_gradient(weight, rows, predicted, coefficients):
    """dW (fp32) from the coefficients by :func:`elogitnorm_fast.geometry.weight_gradient`;
    ``rows``: the forward's ``W[predicted]`` (one per sample), or None (gathered here, or ``W``
    itself for one row per class)."""
    w = as_dtype(weight, torch.float32)
    if rows is None:
        rows, per_sample = predicted_rows(w, predicted)
    else:
        per_sample = True
    # One row per sample (N < C): the kernels wrote coefficient rows that sum to zero.
    return weight_gradient(w, rows, per_sample, predicted, coefficients,
                           rows_sum_to_zero=per_sample)


# ------------------------------ autograd: the triton_op path ------------------------------
# What torch.compile traces: per-row losses, unit gradients and coefficients forward; the
# backward rescales them by the upstream gradient and runs the weight gradient's GEMMs.


@triton_op("elogitnorm_fast::triton_elogitnorm_rows", mutates_args=())
def _elogitnorm_rows_op(
    logits: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    eps: float,
    divisor: int,
    write_grad: bool,
    write_coefficients: bool,
    block_cols: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ELogitNorm losses, unit-upstream gradient, coefficients, predicted classes."""
    n_rows, n_cols = logits.shape
    config = config_for(n_rows, n_cols, weight.shape[1], "none",
                        block_cols=block_cols if block_cols > 0 else None)
    return _forward(logits, weight, target, ignore_index, eps, divisor, write_grad,
                    write_coefficients, config, 0, traced=True)[0]


@triton_op("elogitnorm_fast::triton_scale_rows", mutates_args=())
def _scale_rows_op(
    first: torch.Tensor,
    second: torch.Tensor,
    upstream: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``first`` and ``second`` times ``where(target valid, upstream, 0)``."""
    return scale_rows(first, second, upstream, target, ignore_index=ignore_index)


def _op_setup(ctx, inputs, output):
    _, weight, target, ignore_index, *_ = inputs
    _, grad_unit, coefficient_unit, predicted = output
    ctx.save_for_backward(weight, target, grad_unit, coefficient_unit, predicted)
    ctx.ignore_index = ignore_index


def _op_backward(ctx, grad_losses, *_unused):
    weight, target, grad_unit, coefficient_unit, predicted = ctx.saved_tensors
    grad_logits, coefficients = _scale_rows_op(grad_unit, coefficient_unit, grad_losses.float(),
                                               target, ctx.ignore_index)
    grad_weight = None
    if ctx.needs_input_grad[1]:
        grad_weight = as_dtype(_gemm_weight_gradient(weight, None, predicted, coefficients),
                               weight.dtype)
    return (grad_logits if ctx.needs_input_grad[0] else None, grad_weight,
            None, None, None, None, None, None, None)


torch.library.register_autograd("elogitnorm_fast::triton_elogitnorm_rows", _op_backward,
                                setup_context=_op_setup)


# ------------------------------ autograd: the eager path ------------------------------


class _EagerELogitNorm(torch.autograd.Function):
    """The op's work as a plain Function (no custom-op dispatch, no ``wrap_triton``): inputs
    ``logits, weight, target, ignore_index, eps, divisor, write_grad, write_coefficients,
    config, reduce`` (0: per-row losses; 1 / 2: the kernel writes the rows' shares of the sum /
    mean and the Function returns their sum, the loss itself)."""

    @staticmethod
    def forward(ctx, logits, weight, target, ignore_index, eps, divisor, write_grad,
                write_coefficients, config, reduce):
        output, rows = _forward(logits, weight, target, ignore_index, eps, divisor, write_grad,
                                write_coefficients, config, reduce, traced=False)
        if reduce:
            output = (output[0].sum(), *output[1:])
        _, grad_unit, coefficient_unit, predicted = output
        ctx.save_for_backward(weight, target, grad_unit, coefficient_unit, predicted, rows)
        ctx.ignore_index, ctx.config = ignore_index, config
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero gradients for the three auxiliary outputs
        return output

    @staticmethod
    def backward(ctx, grad_losses, *_unused):
        no_grads = (None,) * 8  # the inputs after logits and weight
        if grad_losses is None:
            return None, None, *no_grads
        check_first_derivative("triton", "ELogitNorm")
        weight, target, grad_unit, coefficient_unit, predicted, rows = ctx.saved_tensors
        config, ignore_index = ctx.config, ctx.ignore_index
        # 0-d where the kernel reduced the loss: every row's share gets the loss's gradient
        # (the kernels read it with row stride 0). Everything written is linear in it.
        upstream = grad_losses.float()
        want_logits, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if want_weight and config.pooled is not None:
            grad_weight = pooled_weight_gradient(
                weight, coefficient_unit, predicted, upstream, target, ignore_index=ignore_index,
                config=config.pooled, traced=False, launch=config.launch)
            grad_logits = None
            if want_logits:
                grad_logits, _ = scale_rows(grad_unit, None, upstream, target,
                                            ignore_index=ignore_index, traced=False,
                                            launch=config.launch)
            return grad_logits, as_dtype(grad_weight, weight.dtype), *no_grads
        grad_logits, coefficients = scale_rows(grad_unit, coefficient_unit, upstream, target,
                                               ignore_index=ignore_index, traced=False,
                                               launch=config.launch)
        grad_weight = None
        if want_weight:
            grad_weight = as_dtype(_gemm_weight_gradient(weight, rows, predicted, coefficients),
                                   weight.dtype)
        return grad_logits if want_logits else None, grad_weight, *no_grads


def _through_node(logits, weight, target, ignore_index, eps, divisor, need_logits_grad,
                  need_weight_grad, config, reduce):
    """An eager ``sum`` / ``mean`` through the C++ node: the kernels' unit gradients, and the
    weight gradient for the unit upstream gradient (pooled, or the GEMMs), formed here."""
    (shares, grad_unit, coefficient_unit, predicted), rows = _forward(
        logits, weight, target, ignore_index, eps, divisor, need_logits_grad, need_weight_grad,
        config, reduce, traced=False)
    grad_weight = None
    if need_weight_grad:
        if config.pooled is not None:
            grad_weight = pooled_weight_gradient(
                weight, coefficient_unit, predicted, None, target, ignore_index=ignore_index,
                config=config.pooled, traced=False, launch=config.launch)
        else:
            grad_weight = _gemm_weight_gradient(weight, rows, predicted, coefficient_unit)
    return unit_gradient_node(shares.sum(), logits, weight,
                              grad_unit if need_logits_grad else None, grad_weight, target,
                              ignore_index, "ELogitNorm")


def _needs_grad(tensor: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and tensor.requires_grad


def elogitnorm_loss(
    logits: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    reduction: str,
    ignore_index: int,
    eps: float,
    divisor: int,
    block_cols: int | None = None,
    config: ELogitNormConfig | None = None,
    traced: bool | None = None,
    capturing: bool | None = None,
) -> torch.Tensor:
    """ELogitNorm of fp32 / fp16 / bf16 ``logits`` (N, C) with unit column stride, ``weight``
    (C, D) and contiguous ``target`` (inputs already validated), as an fp32 loss; ``divisor``
    is the number, C or C - 1.

    ``traced``: the ``triton_op`` path that torch.compile traces (None: whether torch.compile
    is tracing); otherwise the eager path of ``config`` (None: :func:`config_for` of the shapes,
    ``block_cols`` and ``capturing``, None: whether a CUDA graph is being captured).
    """
    need_logits_grad, need_weight_grad = _needs_grad(logits), _needs_grad(weight)
    inputs = (logits, weight, target, ignore_index, float(eps), int(divisor), need_logits_grad,
              need_weight_grad)
    if torch.compiler.is_compiling() if traced is None else traced:
        losses, *_ = _elogitnorm_rows_op(*inputs, block_cols or 0)
    else:
        if config is None:
            if capturing is None:
                capturing = logits.is_cuda and torch.cuda.is_current_stream_capturing()
            config = config_for(logits.shape[0], logits.shape[1], weight.shape[1], reduction,
                                block_cols=block_cols, capturing=capturing)
        reduce = REDUCE_CODES[reduction] if config.reduce else 0
        if reduce and (need_logits_grad or need_weight_grad) and config.node:
            return _through_node(*inputs, config, reduce)
        losses, *_ = _EagerELogitNorm.apply(*inputs, config, reduce)
        if reduce:
            return losses
    count = mean_count(reduction, target, ignore_index, torch.float32)
    return reduce_rows(losses, reduction, count)
