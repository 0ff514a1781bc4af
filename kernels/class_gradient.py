"""Triton kernel for ELogitNorm's weight gradient when the samples pool into few classes.

With ``c_nj`` the distance coefficients of sample ``n`` (:mod:`.elogitnorm`, written for an
upstream gradient of 1) and ``g_n`` its upstream gradient (0 on ignored rows), the coefficients
pooled by predicted class ``P[i, j] = sum_{n : m_n = i} g_n c_nj`` and ``S = P + P^T`` give
(design.md section 2.1; :func:`elogitnorm_fast.geometry.weight_gradient`, one row per class)::

    dW_i = (sum_j S_ij) w_i - sum_j S_ij w_j

The eager path does this in seven torch ops (zeros, index_add_, t, add, sum, mul, addmm) after
rescaling ``c`` by ``g``. Here it is one launch that reads the unit coefficients and ``g``
directly: the programs of class ``i`` each scan the N rows for row ``i`` and column ``i`` of
``P`` (N x C reads, from cache after the first program), then form ``dW_i`` over their share of
D (:func:`feature_runs`: 80 programs at C = 10, D = 512, not 10). For small
C only (:func:`pools`): the work grows as C^2 (N + D). No atomics, so the result does not depend
on scheduling. The same launch can also scale the forward's unit-upstream logits gradient by
``g`` (each program an equal share of the rows), so the whole small-C backward is one launch.
Without an upstream gradient it forms dW for the unit upstream gradient (``g = 1`` on valid
rows): the forward of the eager path whose backward is the C++ node
(``triton_backend.NATIVE_BACKWARD``) launches it that way. Imported lazily (needs triton).

Example::

    grad_weight, grad_logits = pooled_gradients(weight, coefficients, predicted, upstream,
                                                target, ignore_index=-100,
                                                logits_unit=grad_unit)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import (
    _row_targets,
    _row_upstream,
    _scale_tile,
    launcher,
    next_power_of_2,
    unused_pointer,
    upstream_stride,
)

#: Largest C this kernel handles, and the most coefficient loads (N C^2) it is used for.
MAX_CLASSES = 128
MAX_LOADS = 1 << 22
#: Programs the launch aims for (about two per SM of an H100) by splitting D between programs of
#: one class. With one program per class, C = 10 ran 10 programs, each 4 scan steps and then 8
#: dependent feature steps: 8.4 us of device time per step at N = 128, D = 512 on an H100, and
#: 5.7 us split 8 ways; a CUDA-graph fwd+bwd took 16.3 vs 13.3 us at C = 10, 43.4 vs 41.4 us at
#: C = 100 (split 2 ways; ``benchmarks/results/gpu_losses_cifar_h100.json``).
TARGET_PROGRAMS = 256
#: The scan over the rows sums its terms over rows once, after the loop, instead of once per
#: step of SCAN rows (sm_90 PTX at C = 100: 8 barriers in each step); ``gpu_losses.py`` times
#: both (``triton, summed per step``). Not yet timed on a GPU.
DEFERRED_SUMS = True


def pools(n_rows: int, n_cols: int) -> bool:
    """Whether the eager backward forms dW here (one launch) rather than with the rescale and the
    torch ops of :func:`elogitnorm_fast.geometry.weight_gradient`: few classes and few rows
    (each of the C programs scans all N x C coefficients)."""
    return n_cols <= MAX_CLASSES and n_rows * n_cols * n_cols <= MAX_LOADS


def pooled_config(n_cols: int) -> dict[str, int]:
    """``BLOCK`` columns, ``SCAN`` rows per scan step (at most 2048 coefficients), ``FEATURES``
    per product step (at most 4096 weights), warps: no spills on sm_90 (tests/triton_aot.py;
    32 x 128 with 4 warps took 255 registers and spilled)."""
    block = max(16, next_power_of_2(n_cols))
    return {"BLOCK": block, "SCAN": min(32, 2048 // block), "FEATURES": min(64, 4096 // block),
            "num_warps": 8 if block >= 128 else 4}


def feature_runs(n_cols: int, n_features: int, features: int) -> tuple[int, int]:
    """``(programs per class, features per program)``: D cut into runs of whole
    ``features``-wide tiles, at most :data:`TARGET_PROGRAMS` programs in all (at least one per
    class)."""
    tiles = max(1, -(-n_features // features))
    splits = max(1, min(tiles, TARGET_PROGRAMS // max(n_cols, 1)))
    return splits, -(-tiles // splits) * features


@triton.jit
def _pooled_weight_gradient_kernel(
    coefficient_ptr,
    coefficient_stride,
    predicted_ptr,
    upstream_ptr,
    upstream_stride,
    target_ptr,
    weight_ptr,
    weight_stride,
    weight_col_stride,
    grad_weight_ptr,
    logits_unit_ptr,
    grad_logits_ptr,
    n_rows,
    n_cols,
    n_features,
    feature_run,
    ignore_index,
    SCALE_LOGITS: tl.constexpr,
    UNIT_UPSTREAM: tl.constexpr,
    SCAN: tl.constexpr,
    BLOCK: tl.constexpr,
    FEATURES: tl.constexpr,
    DEFERRED: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    if SCALE_LOGITS:
        # The logits gradient rides along (one launch for the whole backward): this program's
        # share of the rows (N / programs) of the forward's unit-upstream gradient times g_n,
        # as rows.scale_rows computes it.
        splits = tl.num_programs(1)
        rows_per_program = tl.cdiv(n_rows, n_cols * splits)
        first_row = (i * splits + split) * rows_per_program
        for start in range(0, rows_per_program, SCAN):
            steps = start + tl.arange(0, SCAN)
            rows = first_row + steps.to(tl.int64)
            row_mask = (steps < rows_per_program) & (rows < n_rows)
            _, _, g = _row_upstream(target_ptr, upstream_ptr, upstream_stride, rows, row_mask,
                                    n_cols, ignore_index)
            _scale_tile(logits_unit_ptr, grad_logits_ptr, rows[:, None] * n_cols + cols[None, :],
                        row_mask[:, None] & col_mask[None, :], g)
    # Row i of S = P + P^T: sum over samples predicted i of their coefficient rows, plus each
    # sample's coefficient i added at its own predicted class. DEFERRED (DEFERRED_SUMS): both
    # accumulate elementwise over the scan steps and are summed over rows once, after the loop.
    if DEFERRED:
        terms = tl.zeros([SCAN, BLOCK], dtype=tl.float32)
    else:
        pooled = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_rows, SCAN):
        rows = start + tl.arange(0, SCAN).to(tl.int64)
        row_mask = rows < n_rows
        if UNIT_UPSTREAM:  # the forward's own unit gradient: g = 1 on valid rows
            _, valid, _ = _row_targets(target_ptr, rows, row_mask, n_cols, ignore_index)
            g = tl.where(valid, 1.0, 0.0)
        else:
            _, valid, g = _row_upstream(target_ptr, upstream_ptr, upstream_stride, rows,
                                        row_mask, n_cols, ignore_index)
        predicted = tl.load(predicted_ptr + rows, mask=row_mask, other=-1)
        row_base = coefficient_ptr + rows * coefficient_stride
        c = tl.load(row_base[:, None] + cols[None, :],
                    mask=valid[:, None] & col_mask[None, :], other=0.0) * g[:, None]
        own = tl.where((predicted == i)[:, None], c, 0.0)
        c_i = tl.load(row_base + i, mask=valid, other=0.0) * g
        mirrored = tl.where(predicted[:, None] == cols[None, :], c_i[:, None], 0.0)
        if DEFERRED:
            terms += own + mirrored
        else:
            pooled += tl.sum(own, axis=0) + tl.sum(mirrored, axis=0)
    if DEFERRED:
        pooled = tl.sum(terms, axis=0)
    total = tl.sum(pooled, axis=0)
    # dW_i = (sum_j S_ij) w_i - sum_j S_ij w_j over this program's run of D, FEATURES columns
    # at a time (feature_run: a multiple of FEATURES).
    first_feature = split * feature_run
    for start in range(first_feature, tl.minimum(first_feature + feature_run, n_features),
                       FEATURES):
        features = start + tl.arange(0, FEATURES)
        feature_mask = features < n_features
        w = tl.load(weight_ptr + cols[:, None] * weight_stride
                    + features[None, :] * weight_col_stride,
                    mask=col_mask[:, None] & feature_mask[None, :], other=0.0).to(tl.float32)
        w_i = tl.load(weight_ptr + i * weight_stride + features * weight_col_stride,
                      mask=feature_mask, other=0.0).to(tl.float32)
        grad = total * w_i - tl.sum(pooled[:, None] * w, axis=0)
        tl.store(grad_weight_ptr + i * n_features + features, grad, mask=feature_mask)


def pooled_gradients(
    weight: torch.Tensor,
    coefficients: torch.Tensor,
    predicted: torch.Tensor,
    upstream: torch.Tensor | None,
    target: torch.Tensor,
    *,
    ignore_index: int,
    logits_unit: torch.Tensor | None = None,
    traced: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dL/dW, dL/dz)`` in one launch: ``dL/dW`` (C, D) in fp32 from the unit coefficients
    (N, C) (fp32, unit column stride), the predicted classes (N,) int64 and the upstream
    gradient (any strided (N,) tensor, or 0-d: :func:`.rows.upstream_stride`; rows where
    ``target == ignore_index`` get 0); ``dL/dz`` (N, C), in ``logits_unit``'s dtype, is
    ``logits_unit`` (the forward's contiguous unit-upstream gradient) times the same ``g_n``,
    or None without ``logits_unit``. ``upstream`` None: 1 on every valid row (the weight
    gradient for the forward's unit upstream gradient; not with ``logits_unit``). ``weight``
    (C, D) may have any strides. C <= :data:`MAX_CLASSES`.
    """
    n_rows, n_cols = coefficients.shape
    if n_cols > MAX_CLASSES:
        raise ValueError(f"pooled_gradients handles C <= {MAX_CLASSES}, got C = {n_cols}")
    if upstream is None and logits_unit is not None:
        raise ValueError("pooled_gradients scales logits_unit by an upstream gradient; got "
                         "upstream=None")
    n_features = weight.shape[1]
    grad = torch.empty((n_cols, n_features), dtype=torch.float32, device=weight.device)
    grad_logits = None if logits_unit is None else torch.empty_like(logits_unit)
    if n_cols == 0 or (n_features == 0 and (logits_unit is None or n_rows == 0)):
        return grad, grad_logits
    config = pooled_config(n_cols)
    splits, feature_run = feature_runs(n_cols, n_features, config["FEATURES"])
    unused = unused_pointer(grad, traced)
    launcher(_pooled_weight_gradient_kernel, (n_cols, splits), traced)(
        coefficients, coefficients.stride(0), predicted,
        unused if upstream is None else upstream,
        0 if upstream is None else upstream_stride(upstream),
        target, weight, weight.stride(0), weight.stride(1), grad,
        unused if logits_unit is None else logits_unit,
        unused if grad_logits is None else grad_logits, n_rows, n_cols, n_features, feature_run,
        ignore_index,
        SCALE_LOGITS=grad_logits is not None, UNIT_UPSTREAM=upstream is None,
        SCAN=config["SCAN"], BLOCK=config["BLOCK"], FEATURES=config["FEATURES"],
        DEFERRED=DEFERRED_SUMS, num_warps=config["num_warps"],
    )
    return grad, grad_logits
