"""Triton kernel for LogitNorm: per block of rows, the loss and (optionally) its logits gradient.

LogitNorm (Wei et al., ICML 2022, https://arxiv.org/abs/2205.09310), per row ``z`` (C,) with
``r = ||z||_2`` and ``a = 1 / (tau (r + 1e-7))``::

    loss = logsumexp(a z) - a z_y = log(sum_j exp(a (z_j - max z))) + a (max z - z_y)
    dloss/dz_k = a (p_k - [k = y]) - a (sum_j p_j z_j - z_y) z_k / ((r + 1e-7) r)

with ``p = softmax(a z)`` (the second term is 0 at ``z = 0``).

``||z||^2`` overflows fp32 past ``|z| ~ 1e19``, and the coupling ``a (G . z) / ((r + 1e-7) r)``
(of size ``1 / |z|^2``) underflows there, so each row is taken at a power of two
(:func:`.rows._row_scale` of its largest magnitude, ``rho``; exact): with ``z' = rho z``,
``r' = ||z'||`` and ``b = 1 / (tau (r' + 1e-7 rho))`` (so ``a = rho b`` and ``a z = b z'``),
the loss is ``log sum_j exp(b (z'_j - max z')) + b (max z' - z'_y)`` and the gradient
``rho (b (p - onehot) - c' z')`` with ``c' = b (G . z') / ((r' + 1e-7 rho) r')``, every factor
in range for any finite logit; rows below 1 are not scaled (``rho = 1``: the formulas above).

The forward writes the loss and five numbers per row (``b``, ``c'``,
``log sum_j exp(b (z'_j - max z'))``, ``max z'`` and ``rho``), and the backward recomputes the
gradient from the logits and those, times the row's upstream gradient, in one elementwise pass:
logits read twice, gradient written once. (A caller that only rescales the forward's gradient,
the C++ node, asks for no statistics: ``write_stats=False``.)

The backward learns the upstream gradient late, but the reduction makes it predictable: 1 per
valid row for ``sum``, ``1 / count`` for ``mean``. Given that expected value, a forward whose rows
fit on chip also writes the gradient for it, and the backward, writing into that tensor, skips
every tile whose rows received exactly the expected value: logits read once and the gradient
written once when the prediction holds (the bandwidth floor); tiles where it does not are
recomputed as above, with the same arithmetic. The price is the N x C gradient allocated in the
forward instead of the backward.

A ``sum`` or ``mean`` (:func:`logitnorm_reduced`) goes further: the kernel counts the valid
rows itself and writes each row's gradient for its share of the loss (1 or ``1 / count``), so
the host runs neither the count nor the division, nor their autograd. Small batches (where the
step is host-bound) are walked by one program that stores the loss itself; larger ones take a
block of rows per program, each program counting all N targets and writing its rows' shares,
and one sum adds them up (deterministic: no atomics). Such an eager step returns its loss
through the C++ node of :mod:`.unit_gradient`, which scales the forward's gradient: no logits
read in the backward at all.

:func:`logitnorm_loss` is the entry point: the eager autograd Functions, or under torch.compile
the ``triton_op`` s registered here (traceable), with the paths chosen by :func:`config_for`.
Reference formula: :func:`elogitnorm_fast.reference.logitnorm_reference`; tests:
``tests/triton/test_parity.py`` and ``test_reductions.py`` (every path against the reference),
``test_logitnorm_backward.py``.

In the forward, rows with ``C <= BLOCK`` are loaded once and kept on chip; longer rows stream over
column blocks (pass 1: norm and max, the row's power of two updated as larger entries arrive;
pass 2: the exponential sums) and leave the gradient to the
backward (writing it in the forward would read them a third time there instead). The backward
tiles rows and columns independently; where it mostly checks and stops (the forward wrote the
gradient), one program takes several column tiles of the same rows
(``rows.grouped_tile_grid``). Offsets are int64, arithmetic is fp32 whatever the storage dtype.
Imported lazily (needs triton).

Example::

    loss = logitnorm_loss(logits, target, tau=0.04, reduction="mean", ignore_index=-100)
    losses, stats, grad = logitnorm_rows(logits, target, inv_tau=25.0, ignore_index=-100,
                                         expected_upstream=1.0)
    grad = logitnorm_backward_rows(logits, target, stats, upstream, ignore_index=-100,
                                   out=grad, expected_upstream=1.0)
    loss, stats, grad = logitnorm_reduced(logits, target, inv_tau=25.0, ignore_index=-100,
                                          reduction="mean", write_grad=True)
    grad = logitnorm_backward_rows(logits, target, stats, loss_grad, ignore_index=-100,
                                   out=grad, reduced=True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ..reduction import mean_count, reduce_rows
from ..validation import check_first_derivative
from .rows import (
    CHECK_PROGRAMS,
    COUNT_BLOCK,
    REDUCE_CODES,
    Launch,
    RowBlocks,
    _program_rows,
    _row_scale,
    _row_targets,
    _row_upstream,
    _row_weight,
    _tile,
    _tile_group,
    cdiv,
    counts_within_budget,
    grouped_tile_grid,
    launcher,
    row_blocks,
    tile_grid,
    unused_pointer,
    upstream_stride,
)
from .unit_gradient import has_unit_gradient_node, unit_gradient_node

#: Row statistics the forward writes for the backward, after the expected upstream gradient:
#: ``b``, ``c'``, the log of the exponential sum, ``max z'`` and ``rho`` (module docstring).
STATS_PER_ROW = 5


@triton.jit
def _logitnorm_grad_tile(z, cols, target, scale, coupling, log_norm_sum, zmax, row_scale):
    """Gradient tile ``rho (b (p - onehot) - c' z')`` with ``z' = rho z`` and
    ``p = exp(b (z' - max z')) / sum`` (``scale`` is ``b``, ``zmax`` is ``max z'``)."""
    z = z * row_scale[:, None]
    p = tl.exp(scale[:, None] * (z - zmax[:, None]) - log_norm_sum[:, None])
    onehot = (cols[None, :] == target[:, None]).to(tl.float32)
    return row_scale[:, None] * (scale[:, None] * (p - onehot) - coupling[:, None] * z)


@triton.jit
def _logitnorm_kernel(
    logits_ptr,
    logits_stride,
    target_ptr,
    loss_ptr,
    stats_ptr,
    n_rows,
    n_cols,
    inv_tau,
    ignore_index,
    grad_ptr,
    expected_ptr,
    expected_value,
    WRITE_GRAD: tl.constexpr,
    EXPECTED_PTR: tl.constexpr,
    REDUCE: tl.constexpr,
    ONE_PROGRAM: tl.constexpr,
    SINGLE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    COUNT_BLOCK: tl.constexpr,
    WRITE_STATS: tl.constexpr,
):
    # WRITE_STATS False (the C++ node's path, whose backward only multiplies the gradient): no
    # statistics for a backward, stats_ptr unused.
    if ONE_PROGRAM:
        # One program walks every block of rows and reduces the loss itself. Each valid row's
        # share of the loss (1 for sum, 1 / count for mean) is what its gradient is written for,
        # and goes to stats[0] for the backward; the count comes first, from the targets alone.
        row_weight = _row_weight(target_ptr, n_rows, n_cols, ignore_index, REDUCE, COUNT_BLOCK)
        if WRITE_STATS:
            tl.store(stats_ptr, row_weight)
        total = tl.zeros([ROWS], dtype=tl.float32)
        for first in range(0, n_rows, ROWS):
            loss = _logitnorm_block(
                (first + tl.arange(0, ROWS)).to(tl.int64), logits_ptr, logits_stride, target_ptr,
                stats_ptr, grad_ptr, n_rows, n_cols, inv_tau, ignore_index, row_weight,
                WRITE_GRAD, SINGLE, ROWS, BLOCK, WRITE_STATS)
            total += loss
        tl.store(loss_ptr, tl.sum(total, axis=0) * row_weight)
    else:
        # One block of ROWS rows per program. Per-row losses (REDUCE 0): the gradient is written
        # for the expected upstream gradient. Reduced: every program counts the valid rows
        # itself (from the targets alone: N loads, no atomics, no other launch) and writes each
        # row's share of the loss (``loss * row_weight``) and the gradient for that share; the
        # host adds the shares up (one sum, in a fixed order). stats[0] gets the value the
        # gradient was written for (every output element written: opcheck compares them all).
        if REDUCE == 0:
            g = _expected_upstream(expected_ptr, expected_value, EXPECTED_PTR)
        else:
            g = _row_weight(target_ptr, n_rows, n_cols, ignore_index, REDUCE, COUNT_BLOCK)
        rows, row_mask = _program_rows(n_rows, ROWS)
        if WRITE_STATS and tl.program_id(0) == 0:
            tl.store(stats_ptr, g.to(tl.float32))
        loss = _logitnorm_block(
            rows, logits_ptr, logits_stride, target_ptr, stats_ptr, grad_ptr, n_rows, n_cols,
            inv_tau, ignore_index, g, WRITE_GRAD, SINGLE, ROWS, BLOCK, WRITE_STATS)
        if REDUCE != 0:
            loss = loss * g
        tl.store(loss_ptr + rows, loss, mask=row_mask)


@triton.jit
def _logitnorm_block(rows, logits_ptr, logits_stride, target_ptr, stats_ptr, grad_ptr, n_rows,
                     n_cols, inv_tau, ignore_index, g, WRITE_GRAD: tl.constexpr,
                     SINGLE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                     WRITE_STATS: tl.constexpr):
    """A block of ROWS ``rows`` (int64, so N * C may exceed 2^31): their statistics
    (``stats[1:]``, when ``WRITE_STATS``), their gradient for the upstream gradient ``g`` when
    ``WRITE_GRAD``; returns their losses (0 on invalid rows). The caller computes ``rows``: see
    :func:`.rows._program_rows` for why."""
    # 1. The rows.
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK)
    target, valid, in_range = _row_targets(target_ptr, rows, row_mask, n_cols, ignore_index)
    row_base = logits_ptr + rows[:, None] * logits_stride
    # z_y by a gather; an out-of-range target gives NaN (no device assert).
    z_target = tl.load(logits_ptr + rows * logits_stride + target, mask=in_range,
                       other=float("nan")).to(tl.float32)

    # 2. Norm and max of z' = rho z (module docstring).
    if SINGLE:
        mask = row_mask[:, None] & (cols[None, :] < n_cols)
        z = tl.load(row_base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        row_scale = _row_scale(tl.max(tl.where(mask, tl.abs(z), 0.0), axis=1))
        z = z * row_scale[:, None]
        sum_squares = tl.sum(z * z, axis=1)
        zmax = tl.max(tl.where(mask, z, float("-inf")), axis=1)
    else:
        # rho shrinks as larger entries arrive, and the sum of squares by its square (exact).
        largest = tl.zeros([ROWS], dtype=tl.float32)
        row_scale = tl.full([ROWS], 1.0, dtype=tl.float32)
        sum_squares = tl.zeros([ROWS], dtype=tl.float32)
        zmax = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            block_cols = start + cols
            mask = row_mask[:, None] & (block_cols[None, :] < n_cols)
            zb = tl.load(row_base + block_cols[None, :], mask=mask, other=0.0).to(tl.float32)
            block_largest = tl.max(tl.where(mask, tl.abs(zb), 0.0), axis=1)
            largest = tl.where(block_largest > largest, block_largest, largest)
            new_scale = _row_scale(largest)
            shrink = new_scale / row_scale
            row_scale = new_scale
            zb = zb * row_scale[:, None]
            sum_squares = sum_squares * (shrink * shrink) + tl.sum(zb * zb, axis=1)
            zmax = tl.maximum(zmax * shrink, tl.max(tl.where(mask, zb, float("-inf")), axis=1))
    # A NaN anywhere in the row makes the norm, hence everything below, NaN.
    norm = tl.sqrt(sum_squares)
    norm_eps = 1e-7 * row_scale
    scale = inv_tau / (norm + norm_eps)
    z_target = z_target * row_scale

    # 3. sum_j exp(b (z'_j - max)) and sum_j exp(...) (z'_j - max).
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
            zb = zb * row_scale[:, None]
            e = tl.where(mask, tl.exp(scale[:, None] * (zb - zmax[:, None])), 0.0)
            exp_sum += tl.sum(e, axis=1)
            exp_dot += tl.sum(e * tl.where(mask, zb - zmax[:, None], 0.0), axis=1)
    log_sum = tl.log(exp_sum)
    loss = tl.where(valid, log_sum + scale * (zmax - z_target), 0.0)

    # 4. What the backward needs besides z: G.z' = sum_j p_j z'_j - z'_y (shifted by max z').
    dot = exp_dot / exp_sum - (z_target - zmax)
    safe_norm = tl.where(norm > 0, norm, 1.0)
    coupling = tl.where(norm > 0, scale * dot / ((norm + norm_eps) * safe_norm), 0.0)
    coupling = tl.where(valid, coupling, 0.0)
    if WRITE_STATS:
        tl.store(stats_ptr + 1 + rows, scale, mask=row_mask)
        tl.store(stats_ptr + 1 + n_rows + rows, coupling, mask=row_mask)
        tl.store(stats_ptr + 1 + 2 * n_rows + rows, log_sum, mask=row_mask)
        tl.store(stats_ptr + 1 + 3 * n_rows + rows, zmax, mask=row_mask)
        tl.store(stats_ptr + 1 + 4 * n_rows + rows, row_scale, mask=row_mask)

    # 5. Rows on chip: the gradient for the upstream gradient g the backward expects (the same
    #    arithmetic as the backward's recompute). The row is read again (from cache: it was
    #    just read) rather than kept live across the reductions, which spilled at C = 32768.
    if WRITE_GRAD:
        z = tl.load(row_base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        grad = _logitnorm_grad_tile(z, cols, target, scale, coupling, log_sum, zmax, row_scale)
        grad = tl.where(valid[:, None], g * grad, 0.0)
        tl.store(grad_ptr + rows[:, None] * n_cols + cols[None, :],
                 grad.to(grad_ptr.dtype.element_ty), mask=mask)
    return loss


@triton.jit
def _expected_upstream(expected_ptr, expected_value, EXPECTED_PTR: tl.constexpr):
    """The upstream gradient the forward wrote its gradient for: a device scalar or a value."""
    if EXPECTED_PTR:
        expected = tl.load(expected_ptr)
    else:
        expected = expected_value
    return expected


@triton.jit
def _logitnorm_backward_kernel(
    logits_ptr,
    logits_stride,
    target_ptr,
    stats_ptr,
    upstream_ptr,
    upstream_stride,
    grad_ptr,
    n_rows,
    n_cols,
    ignore_index,
    expected_ptr,
    expected_value,
    tiles,
    SKIP_EXPECTED: tl.constexpr,
    EXPECTED_PTR: tl.constexpr,
    REDUCED: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # A (ROWS x BLOCK) tile of g_n * dloss_n/dz (rows.tile_grid), or when SKIP_EXPECTED,
    # ``tiles`` tiles along the same rows (rows.grouped_tile_grid).
    if SKIP_EXPECTED:
        rows, row_mask, first_col = _tile_group(n_rows, n_cols, tiles, ROWS, BLOCK)
    else:
        rows, cols, row_mask, mask = _tile(n_rows, n_cols, ROWS, BLOCK)
    target, valid, g = _row_upstream(target_ptr, upstream_ptr, upstream_stride, rows, row_mask,
                                     n_cols, ignore_index)
    if REDUCED:
        # The forward reduced in the kernel: the upstream gradient is the loss's (stride 0),
        # each row's is that times the row weight the forward left in stats[0], which is also
        # what its gradient was written for.
        expected = tl.load(stats_ptr)
        g = tl.where(valid, g * expected, 0.0)
    else:
        expected = _expected_upstream(expected_ptr, expected_value, EXPECTED_PTR)
    if SKIP_EXPECTED:
        # grad_ptr holds the forward's gradient for the expected upstream gradient: rows whose
        # valid ones all received exactly that are already right (ignored rows are 0 either way).
        stale = tl.max((valid & (g != expected)).to(tl.int32), axis=0)
        if stale > 0:
            for tile in range(0, tiles):
                cols = first_col + tile * BLOCK + tl.arange(0, BLOCK)
                mask = row_mask[:, None] & (cols[None, :] < n_cols)
                _logitnorm_backward_tile(logits_ptr, logits_stride, stats_ptr, grad_ptr, rows,
                                         cols, mask, target, valid, g, n_rows, n_cols)
    else:
        _logitnorm_backward_tile(logits_ptr, logits_stride, stats_ptr, grad_ptr, rows, cols,
                                 mask, target, valid, g, n_rows, n_cols)


@triton.jit
def _logitnorm_backward_tile(logits_ptr, logits_stride, stats_ptr, grad_ptr, rows, cols, mask,
                             target, valid, g, n_rows, n_cols):
    """Recomputes a tile of the gradient from the logits and the row statistics, times g."""
    row_mask = rows < n_rows
    scale = tl.load(stats_ptr + 1 + rows, mask=row_mask, other=0.0)
    coupling = tl.load(stats_ptr + 1 + n_rows + rows, mask=row_mask, other=0.0)
    log_sum = tl.load(stats_ptr + 1 + 2 * n_rows + rows, mask=row_mask, other=0.0)
    zmax = tl.load(stats_ptr + 1 + 3 * n_rows + rows, mask=row_mask, other=0.0)
    row_scale = tl.load(stats_ptr + 1 + 4 * n_rows + rows, mask=row_mask, other=1.0)
    z = tl.load(logits_ptr + rows[:, None] * logits_stride + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    grad = _logitnorm_grad_tile(z, cols, target, scale, coupling, log_sum, zmax, row_scale)
    grad = tl.where(valid[:, None], g[:, None] * grad, 0.0)
    tl.store(grad_ptr + rows[:, None] * n_cols + cols[None, :],
             grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _expected_args(expected_upstream: torch.Tensor | float | None, fallback: torch.Tensor):
    """``(expected_ptr, expected_value, EXPECTED_PTR)`` kernel arguments for an expected
    upstream gradient given as a device scalar or a number (``fallback``: an unused pointer)."""
    if isinstance(expected_upstream, torch.Tensor):
        return expected_upstream, 1.0, True
    return fallback, 1.0 if expected_upstream is None else float(expected_upstream), False


#: Largest N x C that one program reduces (:data:`LogitNormConfig.reduce` ``"one program"``).
ONE_PROGRAM_ELEMENTS = 32768
#: Largest N x C that returns through the C++ node: its multiply reads and writes the gradient
#: once more, where the Python backward of a plain ``backward()`` only checks the upstream.
NODE_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class LogitNormConfig:
    """How an eager LogitNorm call runs (:func:`config_for` chooses it from the shapes).

    ``blocks``: the forward's column block, rows per program and warps. ``reduce``: where a
    ``sum`` / ``mean`` is reduced: ``"one program"`` (rows on chip only), ``"blocks"`` (a block
    of rows per program, each counting the valid rows), or None (per-row losses reduced by torch
    ops). ``node``: a reduced step that needs a gradient returns through the C++ node
    (:mod:`.unit_gradient`; rows on chip only), else through the Python Function.
    ``check_programs``: programs the backward's check of the forward's gradient keeps
    (:func:`.rows.grouped_tile_grid`). ``launch``: the eager launch (:func:`.rows.launcher`).
    """

    blocks: RowBlocks
    reduce: str | None = None
    node: bool = False
    check_programs: int = CHECK_PROGRAMS
    launch: Launch | None = None


def config_for(n_rows: int, n_cols: int, reduction: str, *, block_cols: int | None = None,
               capturing: bool = False) -> LogitNormConfig:
    """The configuration of an (``n_rows``, ``n_cols``) LogitNorm with ``reduction``.

    ``block_cols`` forces the column block (:func:`.rows.row_blocks`). ``capturing``: a CUDA
    graph is being captured; replayed, host work costs nothing, so a small batch is reduced by
    blocks of rows (one program walking every row is slow on the device) and the loss returns
    through the Python Function (the node's multiply would be an extra kernel).
    """
    blocks = row_blocks(n_cols, block_cols)
    reduce = None
    if reduction != "none" and n_rows > 0:
        if (block_cols is None and not capturing and blocks.single
                and n_rows * n_cols <= ONE_PROGRAM_ELEMENTS):
            reduce = "one program"
        elif counts_within_budget(n_rows, blocks.rows, reduction):
            reduce = "blocks"
    node = (reduce is not None and blocks.single and not capturing
            and n_rows * n_cols <= NODE_ELEMENTS and has_unit_gradient_node())
    return LogitNormConfig(blocks, reduce, node)


def logitnorm_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    inv_tau: float,
    ignore_index: int,
    blocks: RowBlocks | None = None,
    expected_upstream: torch.Tensor | float | None = None,
    traced: bool = True,
    launch: Launch | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row LogitNorm losses (fp32, 0 on ignored rows), the (5 N + 1,) fp32 row statistics
    :func:`logitnorm_backward_rows` needs (``stats[0]``: the expected upstream gradient, 1 where
    none is given), and the gradient for ``expected_upstream`` or None.

    ``expected_upstream``: the upstream gradient each valid row is expected to receive (a
    number, or a 0-d fp32 tensor on the logits' device, e.g. ``1 / count`` for a mean). Where it
    is given and the rows fit on chip, the forward also writes ``expected * dloss_n/dz`` (N, C)
    in the logits' dtype, for :func:`logitnorm_backward_rows` to complete in place; streamed rows
    write nothing (the backward recomputes them at no extra traffic). ``logits`` (N, C) must have
    unit column stride. ``blocks``: None, :func:`.rows.row_blocks` of C. ``traced``,
    ``launch``: see :func:`.rows.launcher`.
    """
    blocks = row_blocks(logits.shape[1]) if blocks is None else blocks
    losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    return _launch_forward(logits, target, losses, inv_tau, ignore_index, blocks, 0,
                           expected_upstream is not None, expected_upstream, traced, launch)


def logitnorm_reduced(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    inv_tau: float,
    ignore_index: int,
    reduction: str,
    write_grad: bool,
    one_program: bool = True,
    blocks: RowBlocks | None = None,
    write_stats: bool = True,
    traced: bool = True,
    launch: Launch | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The ``sum`` or ``mean`` LogitNorm loss (0-d fp32), with the statistics of
    :func:`logitnorm_rows` (``stats[0]``: each valid row's share of the loss, 1 or
    ``1 / count``; None without ``write_stats``, for a caller that needs only the gradient)
    and, when ``write_grad`` and the rows fit on chip, the gradient of the loss itself, which
    :func:`logitnorm_backward_rows` with ``reduced=True`` completes in place.

    ``one_program``: one program walks every block of rows and stores the loss (rows on chip
    only). Otherwise each program takes a block of rows, counts the valid rows itself and
    writes its rows' shares of the loss, which one ``sum`` adds up. Either way the host runs
    neither the count nor the division, and the reduction has no autograd of its own.
    """
    n_rows, n_cols = logits.shape
    blocks = row_blocks(n_cols) if blocks is None else blocks
    if one_program and not blocks.single:
        raise ValueError(f"logitnorm_reduced reduces in one program only rows kept on chip, got "
                         f"C = {n_cols} in blocks of {blocks.block}")
    shape = () if one_program else (n_rows,)
    loss = torch.empty(shape, dtype=torch.float32, device=logits.device)
    loss, stats, grad = _launch_forward(
        logits, target, loss, inv_tau, ignore_index, blocks, REDUCE_CODES[reduction],
        write_grad, None, traced, launch, one_program, write_stats)
    return (loss if one_program else loss.sum()), stats, grad


def _launch_forward(logits, target, loss, inv_tau, ignore_index, blocks, reduce, write_grad,
                    expected_upstream, traced, launch, one_program=False, write_stats=True):
    """The forward launch shared by :func:`logitnorm_rows` and :func:`logitnorm_reduced`; the
    gradient is written only where the rows stay on chip (``write_grad`` asks for it), the
    statistics (None) only with ``write_stats``."""
    n_rows, n_cols = logits.shape
    write_grad = write_grad and blocks.single
    stats = (torch.empty(STATS_PER_ROW * n_rows + 1, dtype=torch.float32, device=logits.device)
             if write_stats else None)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if write_grad else None
    if n_rows == 0:
        return loss, stats, grad
    unused = unused_pointer(loss if stats is None else stats, traced)
    expected_ptr, expected_value, expected_is_ptr = _expected_args(expected_upstream, unused)
    grid = (1 if one_program else cdiv(n_rows, blocks.rows),)
    launcher(_logitnorm_kernel, grid, traced, launch)(
        logits, logits.stride(0), target, loss, unused if stats is None else stats, n_rows,
        n_cols, inv_tau, ignore_index, unused if grad is None else grad, expected_ptr,
        expected_value, WRITE_GRAD=write_grad, EXPECTED_PTR=expected_is_ptr, REDUCE=reduce,
        ONE_PROGRAM=one_program, SINGLE=blocks.single, ROWS=blocks.rows, BLOCK=blocks.block,
        COUNT_BLOCK=COUNT_BLOCK, WRITE_STATS=write_stats, num_warps=blocks.num_warps,
    )
    return loss, stats, grad


def logitnorm_backward_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    stats: torch.Tensor,
    upstream: torch.Tensor,
    *,
    ignore_index: int,
    out: torch.Tensor | None = None,
    expected_upstream: torch.Tensor | float | None = None,
    reduced: bool = False,
    check_programs: int = CHECK_PROGRAMS,
    traced: bool = True,
    launch: Launch | None = None,
) -> torch.Tensor:
    """``g_n * dloss_n / dz`` (N, C) in the logits' dtype, ``g = where(valid, upstream, 0)``.

    ``stats`` comes from :func:`logitnorm_rows` on the same ``logits`` and ``target``;
    ``upstream`` is any strided (N,) tensor, e.g. a stride-0 expansion. With ``out`` (the
    forward's gradient for ``expected_upstream``) the result is written into ``out``: tiles whose
    valid rows all received exactly the expected upstream gradient are not touched (nor are their
    logits read), the others are recomputed with the forward's arithmetic (bitwise the same under
    the interpreter; two compiled kernels may contract multiply-adds differently, an ulp apart),
    several column tiles of the same rows per program (``check_programs``:
    :func:`.rows.grouped_tile_grid`). ``reduced``: ``stats`` and ``out`` come from
    :func:`logitnorm_reduced`, ``upstream`` is the 0-d gradient of its loss, and
    ``expected_upstream`` is not used.
    """
    if out is not None and expected_upstream is None and not reduced:
        raise ValueError("out (the forward's gradient) needs the expected_upstream it was "
                         "written for")
    n_rows, n_cols = logits.shape
    grad = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device) \
        if out is None else out
    if n_rows == 0 or n_cols == 0:
        return grad
    expected_ptr, expected_value, expected_is_ptr = _expected_args(
        expected_upstream, unused_pointer(stats, traced))
    if out is None:  # every tile recomputed: one per program
        (rows, block, grid), tiles = tile_grid(n_rows, n_cols), 1
    else:  # mostly checks that stop there: several tiles of the same rows per program
        rows, block, grid, tiles = grouped_tile_grid(n_rows, n_cols, check_programs)
    launcher(_logitnorm_backward_kernel, grid, traced, launch)(
        logits, logits.stride(0), target, stats, upstream,
        upstream_stride(upstream), grad, n_rows, n_cols, ignore_index,
        expected_ptr, expected_value, tiles, SKIP_EXPECTED=out is not None,
        EXPECTED_PTR=expected_is_ptr, REDUCED=reduced, ROWS=rows, BLOCK=block, num_warps=4,
    )
    return grad


# ------------------------------ autograd: the triton_op path ------------------------------
# What torch.compile traces: per-row losses and statistics forward, the recomputing backward.


@triton_op("elogitnorm_fast::triton_logitnorm_rows", mutates_args=())
def _logitnorm_rows_op(
    logits: torch.Tensor,
    target: torch.Tensor,
    inv_tau: float,
    ignore_index: int,
    block_cols: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row LogitNorm losses (fp32) and the (5 N + 1,) row statistics of the backward."""
    blocks = row_blocks(logits.shape[1], block_cols if block_cols > 0 else None)
    return logitnorm_rows(logits, target, inv_tau=inv_tau, ignore_index=ignore_index,
                          blocks=blocks)[:2]


@triton_op("elogitnorm_fast::triton_logitnorm_grad", mutates_args=())
def _logitnorm_grad_op(
    logits: torch.Tensor,
    target: torch.Tensor,
    stats: torch.Tensor,
    upstream: torch.Tensor,
    ignore_index: int,
) -> torch.Tensor:
    """LogitNorm logits gradient, rows times ``where(target valid, upstream, 0)``."""
    return logitnorm_backward_rows(logits, target, stats, upstream, ignore_index=ignore_index)


def _op_setup(ctx, inputs, output):
    logits, target, _, ignore_index, _ = inputs
    ctx.save_for_backward(logits, target, output[1])
    ctx.ignore_index = ignore_index


def _op_backward(ctx, grad_losses, _grad_stats):
    logits, target, stats = ctx.saved_tensors
    grad = _logitnorm_grad_op(logits, target, stats, grad_losses.float(), ctx.ignore_index)
    return grad, None, None, None, None


torch.library.register_autograd("elogitnorm_fast::triton_logitnorm_rows", _op_backward,
                                setup_context=_op_setup)


# ------------------------------ autograd: the eager path ------------------------------


def _complete_gradient(ctx, grad_loss, expected_upstream, reduced):
    """The eager backward: the forward's gradient completed in place where it was written (once:
    a second backward through a retained graph recomputes into a new tensor, so a gradient
    handed out is never written again), else recomputed."""
    check_first_derivative("triton", "LogitNorm")
    logits, target, stats = ctx.saved_tensors
    out, ctx.grad_buffer = ctx.grad_buffer, None
    return logitnorm_backward_rows(
        logits, target, stats, grad_loss.float(), ignore_index=ctx.ignore_index, out=out,
        expected_upstream=expected_upstream if out is not None else None, reduced=reduced,
        check_programs=ctx.config.check_programs, traced=False, launch=ctx.config.launch)


class _EagerLogitNorm(torch.autograd.Function):
    """Per-row losses; the forward writes the gradient for ``expected_upstream`` (None: no
    gradient needed) where the rows fit on chip."""

    @staticmethod
    def forward(ctx, logits, target, inv_tau, ignore_index, expected_upstream, config):
        losses, stats, ctx.grad_buffer = logitnorm_rows(
            logits, target, inv_tau=inv_tau, ignore_index=ignore_index, blocks=config.blocks,
            expected_upstream=expected_upstream, traced=False, launch=config.launch)
        ctx.save_for_backward(logits, target, stats)
        ctx.ignore_index, ctx.config, ctx.expected = ignore_index, config, expected_upstream
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)  # no zero gradient for the statistics output
        return losses, stats

    @staticmethod
    def backward(ctx, grad_losses, _grad_stats):
        if grad_losses is None:
            return None, None, None, None, None, None
        grad = _complete_gradient(ctx, grad_losses, ctx.expected, reduced=False)
        return grad, None, None, None, None, None


class _EagerReducedLogitNorm(torch.autograd.Function):
    """The ``sum`` / ``mean`` reduced in the kernel (no count, division or autograd of them on
    the host); the forward writes the loss's gradient when ``write_grad``."""

    @staticmethod
    def forward(ctx, logits, target, inv_tau, ignore_index, reduction, write_grad, config):
        loss, stats, ctx.grad_buffer = logitnorm_reduced(
            logits, target, inv_tau=inv_tau, ignore_index=ignore_index, reduction=reduction,
            write_grad=write_grad, one_program=config.reduce == "one program",
            blocks=config.blocks, traced=False, launch=config.launch)
        ctx.save_for_backward(logits, target, stats)
        ctx.ignore_index, ctx.config = ignore_index, config
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad = _complete_gradient(ctx, grad_loss, None, reduced=True)
        return grad, None, None, None, None, None, None


def _needs_grad(tensor: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and tensor.requires_grad


def logitnorm_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    tau: float,
    reduction: str,
    ignore_index: int,
    block_cols: int | None = None,
    config: LogitNormConfig | None = None,
    traced: bool | None = None,
    capturing: bool | None = None,
) -> torch.Tensor:
    """LogitNorm of fp32 / fp16 / bf16 ``logits`` (N, C) with unit column stride and contiguous
    ``target`` (inputs already validated), as an fp32 loss.

    ``traced``: the ``triton_op`` path that torch.compile traces (None: whether torch.compile
    is tracing); otherwise the eager path of ``config`` (None: :func:`config_for` of the shapes,
    ``block_cols`` and ``capturing``, None: whether a CUDA graph is being captured).
    """
    if torch.compiler.is_compiling() if traced is None else traced:
        count = mean_count(reduction, target, ignore_index, torch.float32)
        losses, _ = _logitnorm_rows_op(logits, target, 1.0 / tau, ignore_index, block_cols or 0)
        return reduce_rows(losses, reduction, count)
    if config is None:
        if capturing is None:
            capturing = logits.is_cuda and torch.cuda.is_current_stream_capturing()
        config = config_for(*logits.shape, reduction, block_cols=block_cols,
                            capturing=capturing)
    need_grad = _needs_grad(logits)
    if reduction != "none" and config.reduce is not None:
        if need_grad and config.node:
            loss, _, grad = logitnorm_reduced(
                logits, target, inv_tau=1.0 / tau, ignore_index=ignore_index,
                reduction=reduction, write_grad=True,
                one_program=config.reduce == "one program", blocks=config.blocks,
                write_stats=False, traced=False, launch=config.launch)
            return unit_gradient_node(loss, logits, None, grad, None, target, ignore_index,
                                      "LogitNorm")
        return _EagerReducedLogitNorm.apply(logits, target, 1.0 / tau, ignore_index, reduction,
                                            need_grad, config)
    count = mean_count(reduction, target, ignore_index, torch.float32)
    # The upstream gradient each valid row gets from a plain backward of the result (the mean's
    # autograd divides 1 by the same count: an IEEE division, like reciprocal).
    expected = None
    if need_grad:
        expected = count.reciprocal() if count is not None else 1.0
    losses, _ = _EagerLogitNorm.apply(logits, target, 1.0 / tau, ignore_index, expected, config)
    return reduce_rows(losses, reduction, count)
