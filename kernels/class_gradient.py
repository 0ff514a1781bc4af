"""Triton kernel for ELogitNorm's weight gradient when the samples pool into few classes.

With ``c_nj`` the distance coefficients of sample ``n`` (:mod:`.elogitnorm`, written for an
upstream gradient of 1) and ``g_n`` its upstream gradient (0 on ignored rows), the coefficients
pooled by predicted class ``P[i, j] = sum_{n : m_n = i} g_n c_nj`` and ``S = P + P^T`` give
(docs/design.md; :func:`elogitnorm_fast.geometry.weight_gradient`, one row per class)::

    dW_i = (sum_j S_ij) w_i - sum_j S_ij w_j

in one launch that reads the unit coefficients and ``g`` directly, where the torch form
rescales ``c`` by ``g`` and runs seven ops. A program forms the rows of dW of a block of
:data:`CLASSES` classes ``I`` over its share of D (:func:`feature_runs`):

* it scans the N rows for the block's rows of ``S``, two fp32 products per step of rows:
  ``P[I, :]`` is the one-hot of the rows' predicted classes in ``I``, transposed, times the
  rows' coefficients, and ``P^T[I, :]`` the rows' coefficients of the classes ``I``,
  transposed, times the one-hot of all their predicted classes;
* then ``dW[I] = rowsum(S[I]) w_I - S[I, :] W`` over its features, one product a step.

The products are ``tl.dot`` in IEEE fp32 (``input_precision="ieee"``: no TF32), so each
thread accumulates its own entries (no reduction across threads per step). The sum runs in
another order than the torch form's, so the results differ from it by rounding only. For small C
only (:func:`pooled_config`): the work grows as C^2 (N + D). No atomics, so the result does not
depend on scheduling. Without an upstream gradient it forms dW for the unit upstream gradient
(``g = 1`` on valid rows), as the forward of a step whose backward is the C++ node needs.
Imported lazily (needs triton).

Example::

    config = pooled_config(n_rows, n_cols)  # None: too many rows or classes, use the GEMMs
    grad_weight = pooled_weight_gradient(weight, coefficients, predicted, upstream, target,
                                         ignore_index=-100, config=config)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .rows import (
    Launch,
    _row_targets,
    _row_upstream,
    launcher,
    next_power_of_2,
    unused_pointer,
    upstream_stride,
)

#: Largest C this kernel handles.
MAX_CLASSES = 128
#: Classes (rows of dW) one program forms: the pooled rows are a (CLASSES x N) by (N x C)
#: product and dW's tile a (CLASSES x C) by (C x FEATURES) one (16 is the least a dot takes).
CLASSES = 16
#: The most multiply-adds a thread does in a program's scan of the rows
#: (``2 CLASSES N BLOCK`` over the program's threads); past it the GEMMs form dW.
SCAN_BUDGET = 1 << 14


@dataclass(frozen=True)
class PooledConfig:
    """Blocks of the pooled kernel: ``block`` columns (at least 16, a dot's least), ``scan``
    rows per scan step, ``features`` per product step, ``num_warps``, and the programs the
    launch aims for by splitting D between programs of one block of classes
    (``target_programs``, about one per SM; each split scans the rows again)."""

    block: int
    scan: int
    features: int
    num_warps: int
    target_programs: int = 128


def pooled_config(n_rows: int, n_cols: int) -> PooledConfig | None:
    """The pooled kernel's blocks for N = ``n_rows``, C = ``n_cols``, or None where the GEMMs
    of :func:`elogitnorm_fast.geometry.weight_gradient` take over: C > :data:`MAX_CLASSES`, or
    more rows than a program's scan should walk (:data:`SCAN_BUDGET`). At most 2048
    coefficients per scan step and 4096 weights per product step: no spills on sm_90
    (``tools/triton_aot.py``)."""
    if n_cols > MAX_CLASSES:
        return None
    config = pooled_blocks(n_cols)
    if 2 * CLASSES * n_rows * config.block > SCAN_BUDGET * 32 * config.num_warps:
        return None
    return config


def pooled_blocks(n_cols: int) -> PooledConfig:
    """The pooled kernel's blocks for C = ``n_cols`` whatever N (see :func:`pooled_config`)."""
    block = max(16, next_power_of_2(n_cols))
    return PooledConfig(block=block, scan=max(16, min(64, 2048 // block)),
                        features=max(16, min(64, 4096 // block)),
                        num_warps=8 if block >= 128 else 4)


def feature_runs(class_blocks: int, n_features: int, features: int,
                 target_programs: int = 128) -> tuple[int, int]:
    """``(programs per block of classes, features per program)``: D cut into runs of whole
    ``features``-wide tiles, at most ``target_programs`` programs in all (at least one per
    block of classes)."""
    tiles = max(1, -(-n_features // features))
    splits = max(1, min(tiles, target_programs // max(class_blocks, 1)))
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
    n_rows,
    n_cols,
    n_features,
    feature_run,
    ignore_index,
    UNIT_UPSTREAM: tl.constexpr,
    CLASSES: tl.constexpr,
    SCAN: tl.constexpr,
    BLOCK: tl.constexpr,
    FEATURES: tl.constexpr,
):
    block_index = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    classes = block_index * CLASSES + tl.arange(0, CLASSES)
    class_mask = classes < n_cols
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
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


def pooled_weight_gradient(
    weight: torch.Tensor,
    coefficients: torch.Tensor,
    predicted: torch.Tensor,
    upstream: torch.Tensor | None,
    target: torch.Tensor,
    *,
    ignore_index: int,
    config: PooledConfig | None = None,
    traced: bool = True,
    launch: Launch | None = None,
) -> torch.Tensor:
    """``dL/dW`` (C, D) in fp32 from the unit coefficients (N, C) (fp32, unit column stride),
    the predicted classes (N,) int64 and the upstream gradient (any strided (N,) tensor, or 0-d:
    :func:`.rows.upstream_stride`; rows where ``target == ignore_index`` get 0; None: 1 on every
    valid row, the weight gradient for the unit upstream gradient). ``weight`` (C, D) may have
    any strides. ``config``: the blocks (None: :func:`pooled_blocks`). ``traced``,
    ``launch``: see :func:`.rows.launcher`.
    """
    n_rows, n_cols = coefficients.shape
    if n_cols > MAX_CLASSES:
        raise ValueError(f"pooled_weight_gradient handles C <= {MAX_CLASSES}, got C = {n_cols}")
    config = pooled_blocks(n_cols) if config is None else config
    n_features = weight.shape[1]
    grad = torch.empty((n_cols, n_features), dtype=torch.float32, device=weight.device)
    if n_cols == 0 or n_features == 0:
        return grad
    class_blocks = -(-n_cols // CLASSES)
    splits, feature_run = feature_runs(class_blocks, n_features, config.features,
                                       config.target_programs)
    unused = unused_pointer(grad, traced)
    launcher(_pooled_weight_gradient_kernel, (class_blocks, splits), traced, launch)(
        coefficients, coefficients.stride(0), predicted,
        unused if upstream is None else upstream,
        0 if upstream is None else upstream_stride(upstream),
        target, weight, weight.stride(0), weight.stride(1), grad,
        n_rows, n_cols, n_features, feature_run, ignore_index,
        UNIT_UPSTREAM=upstream is None, CLASSES=CLASSES, SCAN=config.scan, BLOCK=config.block,
        FEATURES=config.features, num_warps=config.num_warps,
    )
    return grad
