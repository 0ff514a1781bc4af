"""Triton kernel: per-row logit statistics for the OOD scores, one streaming pass.

For each row of logits ``z`` (C entries) the kernel produces, in float32::

    m   = max_j z_j
    S   = sum_j exp(z_j - m)
    A   = sum_j exp(z_j - m) (z_j - m)
    S_T = sum_j exp((z_j - m) / T)        (only computed when T != 1)

from which ``msp = 1/S``, ``max_logit = m``, ``energy = m + log S`` (``m + T log S_T``) and the
negated entropy ``A/S - log S`` follow in O(N) (elogitnorm_fast/scoring/logit_scores.py).

Steps per program (a block of ``BLOCK_ROWS`` rows):
1. Walk the row in column blocks of ``BLOCK_COLS`` (rows longer than one block stream; the row
   is never held whole), loading fp16 / bf16 / fp32 and widening to fp32.
2. Online update (as in online softmax): with the new running max ``m'``, ``alpha = exp(m - m')``
   rescales the old sums: ``S' = alpha S + sum e``, ``A' = alpha (A + (m - m') S) + sum e d``
   where ``d = z - m'``, because ``exp(z - m)(z - m) = alpha^-1 exp(z - m')((z - m') + (m' - m))``.
3. Masked lanes load ``-inf`` and contribute ``e = 0`` (and ``e d := 0``, not NaN).
Row offsets are int64 (``row * stride`` can exceed 2^31 at millions of rows).

GEN needs the top-M probabilities, i.e. a selection that depends on the normaliser ``S`` known
only at the end of the row. This kernel does not do that selection: the caller computes GEN in a
**second path** from ``torch.topk`` of the logits (a second read of the logits, only when GEN is
requested) and the ``log S`` streamed here. The C++ CPU op does the selection in one pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import cdiv, next_power_of_2

__all__ = ["logit_row_stats"]


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

    m = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_ROWS], tl.float32)
    a = tl.zeros([BLOCK_ROWS], tl.float32)
    st = tl.zeros([BLOCK_ROWS], tl.float32)
    for start in range(0, n_cols, BLOCK_COLS):
        cols = start + cols0
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        x = tl.load(
            row_base[:, None] + cols[None, :].to(tl.int64), mask=mask, other=float("-inf")
        ).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        # a row that is all -inf so far: shift by 0 so nothing becomes NaN
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        delta = m - shift  # <= 0, or -inf on the first block
        alpha = tl.exp(delta)
        d = x - shift[:, None]
        e = tl.exp(d)
        ed = tl.where(e > 0.0, e * d, 0.0)
        a = alpha * (a + tl.where(s > 0.0, delta * s, 0.0)) + tl.sum(ed, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        if WANT_T:
            st = tl.exp(delta * inv_temperature) * st + tl.sum(tl.exp(d * inv_temperature), axis=1)
        m = m_new

    tl.store(out_ptr + rows, m, mask=row_mask)
    tl.store(out_ptr + n_rows + rows, s, mask=row_mask)
    tl.store(out_ptr + 2 * n_rows + rows, a, mask=row_mask)
    tl.store(out_ptr + 3 * n_rows + rows, st, mask=row_mask)


def _launch(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    n_rows, n_cols = logits.shape
    out = torch.empty((4, n_rows), dtype=torch.float32, device=logits.device)
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
    """``(4, N)`` float32: rows ``m, S, A, S_T`` of the module docstring (S_T = 0 when T == 1)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (N, C), got shape {tuple(logits.shape)}")
    return _launch(logits, float(temperature))
