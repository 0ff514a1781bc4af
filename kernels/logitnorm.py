"""Triton kernel for LogitNorm: per block of rows, the loss and (optionally) its logits gradient.

LogitNorm (Wei et al., ICML 2022, https://arxiv.org/abs/2205.09310), per row ``z`` (C,) with
``r = ||z||_2`` and ``a = 1 / (tau (r + 1e-7))``::

    loss = logsumexp(a z) - a z_y = log(sum_j exp(a (z_j - max z))) + a (max z - z_y)
    dloss/dz_k = a (p_k - [k = y]) - a (sum_j p_j z_j - z_y) z_k / ((r + 1e-7) r)

with ``p = softmax(a z)`` (design.md section 2.2; the second term is 0 at ``z = 0``). The gradient
is written for an upstream gradient of 1 per valid row; the backward rescales rows.

Rows with ``C <= BLOCK`` are loaded once and kept on chip; longer rows stream over column blocks
(pass 1: norm and max; pass 2: the exponential sums; pass 3: the gradient). Offsets are int64,
arithmetic is fp32 whatever the storage dtype. Imported lazily (needs triton).

Example::

    losses, grad = logitnorm_rows(logits, target, inv_tau=25.0, ignore_index=-100,
                                  write_grad=True)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import _row_targets, launch_config, launcher


@triton.jit
def _logitnorm_grad_tile(z, cols, target, scale, coupling, log_norm_sum, zmax):
    """Gradient tile: ``a (p - onehot) - coupling z`` with ``p = exp(a (z - max)) / sum``."""
    p = tl.exp(scale[:, None] * (z - zmax[:, None]) - log_norm_sum[:, None])
    onehot = (cols[None, :] == target[:, None]).to(tl.float32)
    return scale[:, None] * (p - onehot) - coupling[:, None] * z


@triton.jit
def _logitnorm_kernel(
    logits_ptr,
    logits_stride,
    target_ptr,
    loss_ptr,
    grad_ptr,
    grad_stride,
    n_rows,
    n_cols,
    inv_tau,
    ignore_index,
    WRITE_GRAD: tl.constexpr,
    SINGLE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # 1. This program's rows; int64 offsets so N * C may exceed 2^31.
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK)
    target, valid, in_range = _row_targets(target_ptr, rows, row_mask, n_cols, ignore_index)
    row_base = logits_ptr + rows[:, None] * logits_stride
    # z_y by a gather; an out-of-range target gives NaN (no device assert).
    z_target = tl.load(logits_ptr + rows * logits_stride + target, mask=in_range,
                       other=float("nan")).to(tl.float32)

    # 2. Norm and max.
    if SINGLE:
        mask = row_mask[:, None] & (cols[None, :] < n_cols)
        z = tl.load(row_base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sum_squares = tl.sum(z * z, axis=1)
        zmax = tl.max(tl.where(mask, z, float("-inf")), axis=1)
    else:
        sum_squares = tl.zeros([ROWS], dtype=tl.float32)
        zmax = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            block_cols = start + cols
            mask = row_mask[:, None] & (block_cols[None, :] < n_cols)
            zb = tl.load(row_base + block_cols[None, :], mask=mask, other=0.0).to(tl.float32)
            sum_squares += tl.sum(zb * zb, axis=1)
            zmax = tl.maximum(zmax, tl.max(tl.where(mask, zb, float("-inf")), axis=1))
    # A NaN anywhere in the row makes the norm, hence everything below, NaN.
    norm = tl.sqrt(sum_squares)
    scale = inv_tau / (norm + 1e-7)

    # 3. sum_j exp(a (z_j - max)) and sum_j exp(...) (z_j - max).
    if SINGLE:
        e = tl.where(mask, tl.exp(scale[:, None] * (z - zmax[:, None])), 0.0)
        exp_sum = tl.sum(e, axis=1)
        exp_dot = tl.sum(e * tl.where(mask, z - zmax[:, None], 0.0), axis=1)
    else:
        exp_sum = tl.zeros([ROWS], dtype=tl.float32)
        exp_dot = tl.zeros([ROWS], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            block_cols = start + cols
            mask = row_mask[:, None] & (block_cols[None, :] < n_cols)
            zb = tl.load(row_base + block_cols[None, :], mask=mask, other=0.0).to(tl.float32)
            e = tl.where(mask, tl.exp(scale[:, None] * (zb - zmax[:, None])), 0.0)
            exp_sum += tl.sum(e, axis=1)
            exp_dot += tl.sum(e * tl.where(mask, zb - zmax[:, None], 0.0), axis=1)
    log_sum = tl.log(exp_sum)
    loss = log_sum + scale * (zmax - z_target)
    tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0), mask=row_mask)

    # 4. Gradient for an upstream gradient of 1: G.z = sum_j p_j z_j - z_y (shifted by max z).
    if WRITE_GRAD:
        dot = exp_dot / exp_sum - (z_target - zmax)
        safe_norm = tl.where(norm > 0, norm, 1.0)
        coupling = tl.where(norm > 0, scale * dot / ((norm + 1e-7) * safe_norm), 0.0)
        coupling = tl.where(valid, coupling, 0.0)
        row_scale = tl.where(valid, scale, 0.0)
        grad_base = grad_ptr + rows[:, None] * grad_stride
        if SINGLE:
            grad = _logitnorm_grad_tile(z, cols, target, row_scale, coupling, log_sum, zmax)
            grad = tl.where(valid[:, None], grad, 0.0)
            tl.store(grad_base + cols[None, :], grad.to(grad_ptr.dtype.element_ty), mask=mask)
        else:
            for start in range(0, n_cols, BLOCK):
                block_cols = start + cols
                mask = row_mask[:, None] & (block_cols[None, :] < n_cols)
                zb = tl.load(row_base + block_cols[None, :], mask=mask, other=0.0).to(tl.float32)
                grad = _logitnorm_grad_tile(zb, block_cols, target, row_scale, coupling,
                                            log_sum, zmax)
                grad = tl.where(valid[:, None], grad, 0.0)
                tl.store(grad_base + block_cols[None, :], grad.to(grad_ptr.dtype.element_ty),
                         mask=mask)


def logitnorm_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    inv_tau: float,
    ignore_index: int,
    write_grad: bool,
    block_cols: int | None = None,
    traced: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row LogitNorm losses (fp32, 0 on ignored rows) and the unit-upstream gradient.

    ``logits`` (N, C) must have unit column stride. The gradient has the logits' dtype (an empty
    tensor when ``write_grad`` is False). ``traced``: see :func:`.rows.launcher`.
    """
    n_rows, n_cols = logits.shape
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    shape = (n_rows, n_cols) if write_grad else (0, n_cols)
    grad = torch.empty(shape, dtype=logits.dtype, device=logits.device)
    if n_rows == 0:
        return losses, grad
    config = launch_config(n_cols, block_cols)
    grid = (triton.cdiv(n_rows, config["ROWS"]),)
    launcher(_logitnorm_kernel, grid, traced)(
        logits, logits.stride(0), target, losses, grad, grad.stride(0) if write_grad else 0,
        n_rows, n_cols, inv_tau, ignore_index,
        WRITE_GRAD=write_grad, SINGLE=config["SINGLE"], ROWS=config["ROWS"],
        BLOCK=config["BLOCK"], num_warps=config["num_warps"],
    )
    return losses, grad
