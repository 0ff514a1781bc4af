"""Triton kernel: per-row logit statistics for the OOD scores, one streaming pass.

For each row of logits ``z`` (C entries) the kernel produces, in float32::

    m1  = max_j z_j                  (NaN when the row holds a NaN)
    m2  = max over the other entries (every j but one index ``top`` of the maximum; m1 on a tie)
    R   = sum_{j != top} exp(z_j - m2)
    B   = sum_{j != top} exp(z_j - m2) (m2 - z_j)
    S_T = sum_j exp((z_j - m1) / T)        (only computed when T != 1)

from which every score follows in O(N), in float64, with no margin underflowing anything
(``log o = m2 - m1 + log R``; formulas in elogitnorm_fast/scoring/logit_scores.py).

Steps per program (a block of ``BLOCK_ROWS`` rows):
1. Walk the row in column blocks of ``BLOCK_COLS`` (rows longer than one block stream; the row
   is never held whole), loading fp16 / bf16 / fp32 and widening to fp32.
2. Per block: its maximum and first index of it, the maximum of the block's other entries,
   and their ``R``, ``B`` relative to that; per block ``S_T`` relative to the block maximum.
3. Merge with the running state: the side with the larger maximum (the running one on ties)
   keeps its maximum as ``top``; the other side's maximum joins the others as one entry.
   Sums move to a new shift ``n2 >= m2`` as ``R' = f R`` and ``B' = f (B + (n2 - m2) R)`` with
   ``f = exp(m2 - n2)``, because ``exp(z - n2)(n2 - z) = f exp(z - m2)((m2 - z) + (n2 - m2))``.
4. Equal values are 0 apart (so ``+inf - +inf`` and ``-inf - -inf`` are 0, not NaN), and lanes
   past the row's end contribute nothing (a mask, not ``-inf`` values, which would tie with
   real ``-inf`` logits).
Row offsets are int64 (``row * stride`` can exceed 2^31 at millions of rows).

GEN needs the top-M probabilities, i.e. a selection over the row. This kernel does not do that
selection: the caller computes GEN in a **second path** from ``torch.topk`` of the logits (a
second read of the logits, only when GEN is requested) and the statistics streamed here. The
C++ CPU op does the selection in the same pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import cdiv, next_power_of_2

__all__ = ["logit_row_stats"]

#: Number of float32 statistics per row in :func:`logit_row_stats`' output.
STATS = 5


@triton.jit
def _apart(a, b):
    """``a - b``, 0 where they are equal (infinite values included)."""
    return tl.where(a == b, 0.0, a - b)


@triton.jit
def _block_stats(x, valid, cols, inv_temperature, WANT_T: tl.constexpr):
    """``(max, first index of it, max of the others, R, B, S_T, any NaN)`` of a block."""
    top = tl.max(x, axis=1)
    first = tl.min(tl.where(valid & (x == top[:, None]), cols[None, :], 2147483647), axis=1)
    other = valid & (cols[None, :] != first[:, None])
    rest = tl.where(other, x, float("-inf"))
    second = tl.max(rest, axis=1)
    d = _apart(rest, second[:, None])
    e = tl.where(other, tl.exp(d), 0.0)
    r = tl.sum(e, axis=1)
    b = tl.sum(tl.where(e > 0.0, -e * d, 0.0), axis=1)
    st = tl.zeros_like(r)
    if WANT_T:
        st = tl.sum(tl.where(valid, tl.exp(_apart(x, top[:, None]) * inv_temperature), 0.0), axis=1)
    nan = tl.max(tl.where(valid & (x != x), 1, 0), axis=1)
    return top, second, r, b, st, nan


@triton.jit
def _shifted(shift, r, b, new_shift):
    """``R, B`` of entries summed relative to ``shift``, moved to ``new_shift >= shift``."""
    f = tl.where(shift == new_shift, 1.0, tl.exp(shift - new_shift))
    gap = _apart(new_shift, shift)
    return f * r, tl.where(f > 0.0, f * (b + gap * r), 0.0)


@triton.jit
def _logit_row_stats_kernel(
    z_ptr,
    out_ptr,
    n_rows,
    n_cols,
    stride_row,
    inv_temperature,
    WANT_T: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    row_base = z_ptr + rows.to(tl.int64) * stride_row
    cols0 = tl.arange(0, BLOCK_COLS)

    # the first block starts the running state (every block has at least one valid column)
    valid = row_mask[:, None] & (cols0 < n_cols)[None, :]
    x = tl.load(row_base[:, None] + cols0[None, :].to(tl.int64), mask=valid,
                other=float("-inf")).to(tl.float32)
    m1, m2, r, b, st, nan = _block_stats(x, valid, cols0, inv_temperature, WANT_T)
    for start in range(BLOCK_COLS, n_cols, BLOCK_COLS):
        cols = start + cols0
        valid = row_mask[:, None] & (cols < n_cols)[None, :]
        x = tl.load(row_base[:, None] + cols[None, :].to(tl.int64), mask=valid,
                    other=float("-inf")).to(tl.float32)
        bm1, bm2, br, bb, bst, bnan = _block_stats(x, valid, cols, inv_temperature, WANT_T)
        block_wins = bm1 > m1
        win_top = tl.where(block_wins, bm1, m1)
        win_second = tl.where(block_wins, bm2, m2)
        win_r = tl.where(block_wins, br, r)
        win_b = tl.where(block_wins, bb, b)
        lose_top = tl.where(block_wins, m1, bm1)
        lose_second = tl.where(block_wins, m2, bm2)
        lose_r = tl.where(block_wins, r, br)
        lose_b = tl.where(block_wins, b, bb)
        # the loser's maximum joins the others: n2 = max(winner's second, loser's maximum)
        n2 = tl.maximum(win_second, lose_top)
        r1, b1 = _shifted(win_second, win_r, win_b, n2)
        r2, b2 = _shifted(lose_second, lose_r, lose_b, n2)
        r3, b3 = _shifted(lose_top, tl.zeros_like(lose_top) + 1.0, tl.zeros_like(lose_top), n2)
        r = r1 + r2 + r3
        b = b1 + b2 + b3
        if WANT_T:
            st = (
                tl.where(m1 == win_top, 1.0, tl.exp((m1 - win_top) * inv_temperature)) * st
                + tl.where(bm1 == win_top, 1.0, tl.exp((bm1 - win_top) * inv_temperature)) * bst
            )
        m1 = win_top
        m2 = n2
        nan = tl.maximum(nan, bnan)

    m1 = tl.where(nan > 0, float("nan"), m1)
    tl.store(out_ptr + rows, m1, mask=row_mask)
    tl.store(out_ptr + n_rows + rows, m2, mask=row_mask)
    tl.store(out_ptr + 2 * n_rows + rows, r, mask=row_mask)
    tl.store(out_ptr + 3 * n_rows + rows, b, mask=row_mask)
    tl.store(out_ptr + 4 * n_rows + rows, st, mask=row_mask)


def _launch(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    n_rows, n_cols = logits.shape
    out = torch.empty((STATS, n_rows), dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return out
    block_cols = min(max(next_power_of_2(n_cols), 16), 1024)
    block_rows = max(1, min(64, 4096 // block_cols))
    grid = (cdiv(n_rows, block_rows),)
    _logit_row_stats_kernel[grid](
        logits,
        out,
        n_rows,
        n_cols,
        logits.stride(0),
        1.0 / temperature,
        WANT_T=temperature != 1.0,
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
    )
    return out


def logit_row_stats(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``(5, N)`` float32: rows ``m1, m2, R, B, S_T`` of the module docstring (S_T = 0 when
    T == 1; ``m1`` NaN for rows holding a NaN)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (N, C), got shape {tuple(logits.shape)}")
    return _launch(logits, float(temperature))
