"""Triton kernel for ELogitNorm's weight gradient when the samples pool into few classes.

With ``c_nj`` the distance coefficients of sample ``n`` (:mod:`.elogitnorm`, written for an
upstream gradient of 1) and ``g_n`` its upstream gradient (0 on ignored rows), the coefficients
pooled by predicted class ``P[i, j] = sum_{n : m_n = i} g_n c_nj`` and ``S = P + P^T`` give
(docs/design.md; :func:`elogitnorm_fast.geometry.weight_gradient`, one row per class)::

    dW_i = (sum_j S_ij) w_i - sum_j S_ij w_j

The eager path does this in seven torch ops (zeros, index_add_, t, add, sum, mul, addmm) after
rescaling ``c`` by ``g``. Here it is one launch that reads the unit coefficients and ``g``
directly. A program forms the rows of dW of a block of :data:`CLASSES` classes ``I`` over its
share of D (:func:`feature_runs`: at C = 100, D = 512, 7 blocks of 16 runs, 112 programs):

* it scans the N rows for the block's rows of ``S``, two fp32 products per step of rows:
  ``P[I, :]`` is the one-hot of the rows' predicted classes in ``I``, transposed, times the
  rows' coefficients, and ``P^T[I, :]`` the rows' coefficients of the classes ``I``,
  transposed, times the one-hot of all their predicted classes (N x C reads, from cache after
  the first program);
* then ``dW[I] = rowsum(S[I]) w_I - S[I, :] W`` over its features, one product a step.

The products are ``tl.dot`` in IEEE fp32 (``input_precision="ieee"``: no TF32), so each
thread accumulates its own entries: no reduction across threads per step, where one program per
class summed over the classes at every feature step. A sum in another order than the torch
form's, so the results differ from it by rounding only. For small C only (:func:`pools`):
the work grows as C^2 (N + D). No atomics, so the result does not depend on scheduling. The same
launch can also scale the forward's unit-upstream logits gradient by ``g`` (each program an
equal share of the rows), so the whole small-C backward is one launch. Without an upstream
gradient it forms dW for the unit upstream gradient (``g = 1`` on valid rows): the forward of
the eager path whose backward is the C++ node (``triton_backend.NATIVE_BACKWARD``) launches it
that way, and has its first program add the rows' shares of the loss too (``shares``), so that
forward runs no torch sum. Imported lazily (needs triton).

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

#: Largest C this kernel handles.
MAX_CLASSES = 128
#: Classes (rows of dW) one program forms: the pooled rows are a (CLASSES x N) by (N x C)
#: product and dW's tile a (CLASSES x C) by (C x FEATURES) one, both ``tl.dot`` (exact fp32
#: products, ``input_precision="ieee"``; 16 is the least a dot takes).
CLASSES = 16
#: The most multiply-adds a thread does in a program's scan of the rows (``2 CLASSES N BLOCK``
#: over the program's threads; at the bound about 20 us of an H100 SM's fp32 units, an estimate,
#: not measured). Past it, the weight gradient comes from the GEMMs: at C = 100 (BLOCK 128,
#: 8 warps) up to N = 1024 rows pool here, at C <= 16 (BLOCK 16, 4 warps) up to 4096.
SCAN_BUDGET = 1 << 14
#: Programs the launch aims for (about one per SM of an H100) by splitting D between programs of
#: one block of classes, each scanning the rows again. One program per class (the kernel before
#: the products) took 8.4 us at C = 10, N = 128, D = 512 on an H100, 5.7 us with D split 8 ways,
#: and at C = 100 half of the CUDA-graph step, 20 us (``benchmarks/results/gpu_runs_h100.md``).
TARGET_PROGRAMS = 128
#: Shares of the loss the first program adds at a time (``shares`` of :func:`pooled_gradients`).
SHARES_BLOCK = 1024


def pools(n_rows: int, n_cols: int) -> bool:
    """Whether the eager backward forms dW here (one launch) rather than with the rescale and the
    torch ops of :func:`elogitnorm_fast.geometry.weight_gradient`: few classes and few rows
    (each program scans all N x C coefficients: :data:`SCAN_BUDGET`)."""
    if n_cols > MAX_CLASSES:
        return False
    config = pooled_config(n_cols)
    return 2 * CLASSES * n_rows * config["BLOCK"] <= SCAN_BUDGET * 32 * config["num_warps"]


def pooled_config(n_cols: int) -> dict[str, int]:
    """``BLOCK`` columns (at least 16, a dot's least), ``SCAN`` rows per scan step (at most 2048
    coefficients), ``FEATURES`` per product step (at most 4096 weights), warps: no spills on
    sm_90 (``tests/triton_aot.py``; 104-167 registers)."""
    block = max(16, next_power_of_2(n_cols))
    return {"BLOCK": block, "SCAN": max(16, min(64, 2048 // block)),
            "FEATURES": max(16, min(64, 4096 // block)), "num_warps": 8 if block >= 128 else 4}


def feature_runs(class_blocks: int, n_features: int, features: int) -> tuple[int, int]:
    """``(programs per block of classes, features per program)``: D cut into runs of whole
    ``features``-wide tiles, at most :data:`TARGET_PROGRAMS` programs in all (at least one per
    block of classes)."""
    tiles = max(1, -(-n_features // features))
    splits = max(1, min(tiles, TARGET_PROGRAMS // max(class_blocks, 1)))
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
    shares_ptr,
    loss_ptr,
    n_rows,
    n_cols,
    n_features,
    feature_run,
    ignore_index,
    SCALE_LOGITS: tl.constexpr,
    UNIT_UPSTREAM: tl.constexpr,
    SUM_SHARES: tl.constexpr,
    SHARES_BLOCK: tl.constexpr,
    CLASSES: tl.constexpr,
    SCAN: tl.constexpr,
    BLOCK: tl.constexpr,
    FEATURES: tl.constexpr,
):
    block_index = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    if SUM_SHARES:
        # The loss rides along too (the C++-node path's forward): the first program adds the
        # rows' shares of it, in a fixed order (no atomics), where the host ran a torch sum.
        if (block_index == 0) & (split == 0):
            total = tl.zeros([SHARES_BLOCK], dtype=tl.float32)
            for start in range(0, n_rows, SHARES_BLOCK):
                offsets = start + tl.arange(0, SHARES_BLOCK)
                total += tl.load(shares_ptr + offsets, mask=offsets < n_rows, other=0.0)
            tl.store(loss_ptr, tl.sum(total, axis=0))
    classes = block_index * CLASSES + tl.arange(0, CLASSES)
    class_mask = classes < n_cols
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    if SCALE_LOGITS:
        # The logits gradient rides along (one launch for the whole backward): this program's
        # share of the rows (N / programs) of the forward's unit-upstream gradient times g_n,
        # as rows.scale_rows computes it.
        splits = tl.num_programs(1)
        rows_per_program = tl.cdiv(n_rows, tl.num_programs(0) * splits)
        first_row = (block_index * splits + split) * rows_per_program
        for start in range(0, rows_per_program, SCAN):
            steps = start + tl.arange(0, SCAN)
            rows = first_row + steps.to(tl.int64)
            row_mask = (steps < rows_per_program) & (rows < n_rows)
            _, _, g = _row_upstream(target_ptr, upstream_ptr, upstream_stride, rows, row_mask,
                                    n_cols, ignore_index)
            _scale_tile(logits_unit_ptr, grad_logits_ptr, rows[:, None] * n_cols + cols[None, :],
                        row_mask[:, None] & col_mask[None, :], g)
    # This block's rows of S = P + P^T: P[i, :] pools the coefficient rows of the samples
    # predicted i (one-hot of this block's classes, transposed, times the rows), P^T[i, :] puts
    # each sample's coefficient i at its own predicted class (column i, transposed, times the
    # one-hot of all classes). Two products per step of SCAN rows.
    pooled = tl.zeros([CLASSES, BLOCK], dtype=tl.float32)
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
        c_own = tl.load(row_base[:, None] + classes[None, :],
                        mask=valid[:, None] & class_mask[None, :], other=0.0) * g[:, None]
        predicted_here = (predicted[:, None] == classes[None, :]).to(tl.float32)
        predicted_any = (predicted[:, None] == cols[None, :]).to(tl.float32)
        pooled = tl.dot(tl.trans(predicted_here), c, pooled, input_precision="ieee")
        pooled = tl.dot(tl.trans(c_own), predicted_any, pooled, input_precision="ieee")
    total = tl.sum(pooled, axis=1)
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
        tile_mask = class_mask[:, None] & feature_mask[None, :]
        w_own = tl.load(weight_ptr + classes[:, None] * weight_stride
                        + features[None, :] * weight_col_stride,
                        mask=tile_mask, other=0.0).to(tl.float32)
        grad = total[:, None] * w_own - tl.dot(pooled, w, input_precision="ieee")
        tl.store(grad_weight_ptr + classes[:, None] * n_features + features[None, :], grad,
                 mask=tile_mask)


def pooled_gradients(
    weight: torch.Tensor,
    coefficients: torch.Tensor,
    predicted: torch.Tensor,
    upstream: torch.Tensor | None,
    target: torch.Tensor,
    *,
    ignore_index: int,
    logits_unit: torch.Tensor | None = None,
    shares: torch.Tensor | None = None,
    loss_out: torch.Tensor | None = None,
    traced: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dL/dW, dL/dz)`` in one launch: ``dL/dW`` (C, D) in fp32 from the unit coefficients
    (N, C) (fp32, unit column stride), the predicted classes (N,) int64 and the upstream
    gradient (any strided (N,) tensor, or 0-d: :func:`.rows.upstream_stride`; rows where
    ``target == ignore_index`` get 0); ``dL/dz`` (N, C), in ``logits_unit``'s dtype, is
    ``logits_unit`` (the forward's contiguous unit-upstream gradient) times the same ``g_n``,
    or None without ``logits_unit``. ``upstream`` None: 1 on every valid row (the weight
    gradient for the forward's unit upstream gradient; not with ``logits_unit``). ``weight``
    (C, D) may have any strides. C <= :data:`MAX_CLASSES`. ``shares`` (N,) fp32 with
    ``loss_out`` (0-d fp32): the launch also writes the sum of ``shares`` into ``loss_out`` (the
    loss, from the rows' shares of it that :func:`.elogitnorm.elogitnorm_rows_fused` writes with
    ``reduce``), added by one program in a fixed order.
    """
    n_rows, n_cols = coefficients.shape
    if n_cols > MAX_CLASSES:
        raise ValueError(f"pooled_gradients handles C <= {MAX_CLASSES}, got C = {n_cols}")
    if upstream is None and logits_unit is not None:
        raise ValueError("pooled_gradients scales logits_unit by an upstream gradient; got "
                         "upstream=None")
    if (shares is None) != (loss_out is None):
        raise ValueError("pooled_gradients sums shares into loss_out: give both or neither, got "
                         f"shares={type(shares).__name__}, loss_out={type(loss_out).__name__}")
    n_features = weight.shape[1]
    grad = torch.empty((n_cols, n_features), dtype=torch.float32, device=weight.device)
    grad_logits = None if logits_unit is None else torch.empty_like(logits_unit)
    if n_cols == 0 or (n_features == 0 and (logits_unit is None or n_rows == 0)):
        if shares is not None:  # no launch: the sum on the host
            loss_out.copy_(shares.sum())
        return grad, grad_logits
    config = pooled_config(n_cols)
    class_blocks = -(-n_cols // CLASSES)
    splits, feature_run = feature_runs(class_blocks, n_features, config["FEATURES"])
    unused = unused_pointer(grad, traced)
    launcher(_pooled_weight_gradient_kernel, (class_blocks, splits), traced)(
        coefficients, coefficients.stride(0), predicted,
        unused if upstream is None else upstream,
        0 if upstream is None else upstream_stride(upstream),
        target, weight, weight.stride(0), weight.stride(1), grad,
        unused if logits_unit is None else logits_unit,
        unused if grad_logits is None else grad_logits,
        unused if shares is None else shares, unused if loss_out is None else loss_out,
        n_rows, n_cols, n_features, feature_run, ignore_index,
        SCALE_LOGITS=grad_logits is not None, UNIT_UPSTREAM=upstream is None,
        SUM_SHARES=shares is not None, SHARES_BLOCK=SHARES_BLOCK,
        CLASSES=CLASSES, SCAN=config["SCAN"], BLOCK=config["BLOCK"],
        FEATURES=config["FEATURES"], num_warps=config["num_warps"],
    )
    return grad, grad_logits
