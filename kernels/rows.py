"""Row-blocking helpers shared by the loss kernels, and the backward's row rescaling kernel.

The loss kernels write the logits gradient for an upstream gradient of 1 per valid row; the
backward multiplies row ``n`` by its upstream gradient ``g_n`` (0 on ignored rows, so an
all-ignored ``mean`` gives zero gradient, not ``0 * inf``). Imported lazily (needs triton).

Example::

    grad_logits, coefficients = scale_rows(grad_unit, coeff_unit, g, target, ignore_index=-100)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

#: An eager launch of a compiled kernel, ``launch(kernel, grid, *args, **kwargs)``; a config's
#: None means the JIT's own ``kernel[grid](*args, **kwargs)``.
Launch = Callable[..., None]

#: Largest row length (columns) kept on chip in one block; longer rows stream.
MAX_SINGLE_BLOCK = 32768
#: Column block of streamed rows.
STREAM_BLOCK = 4096
#: Tile width of the elementwise backward kernels.
SCALE_BLOCK = 2048


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for the host's launch arithmetic (``triton.cdiv`` unwraps constexprs
    first: host work at every eager launch)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= ``n`` (0 for 0), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


@dataclass(frozen=True)
class RowBlocks:
    """Block sizes of a row kernel: ``block`` columns by ``rows`` rows per program on
    ``num_warps`` warps; ``single``: a row fits in one block (kept on chip), else it streams."""

    block: int
    rows: int
    single: bool
    num_warps: int


def row_blocks(num_cols: int, block_cols: int | None = None) -> RowBlocks:
    """The blocks for rows of ``num_cols`` columns: one block up to :data:`MAX_SINGLE_BLOCK`,
    else :data:`STREAM_BLOCK` columns at a time. ``block_cols`` (a power of two) forces the
    column block, e.g. to test streaming at small C."""
    if block_cols is None:
        single_block = next_power_of_2(num_cols)
        block = single_block if single_block <= MAX_SINGLE_BLOCK else STREAM_BLOCK
    else:
        if block_cols <= 0 or block_cols & (block_cols - 1):
            raise ValueError(f"block_cols must be a positive power of two, got {block_cols}")
        block = block_cols
    single = num_cols <= block
    rows = min(16, max(1, 2048 // block)) if single else 1
    elements = rows * block
    # At most 32 fp32 values a thread: fewer warps spilled registers (ptxas, sm_90).
    num_warps = (2 if elements <= 512 else 4 if elements <= 4096 else 8 if elements <= 8192
                 else 16 if elements <= 16384 else 32)
    return RowBlocks(block, rows, single, num_warps)


def upstream_stride(upstream: torch.Tensor) -> int:
    """The row stride of an upstream gradient: a strided (N,) tensor, or a 0-d one (the gradient
    of a loss the kernel reduced, the same for every row: stride 0, no expansion op)."""
    return upstream.stride(0) if upstream.dim() else 0


def launcher(kernel, grid: tuple[int, ...], traced: bool, launch: Launch | None = None):
    """``kernel[grid]``, through ``torch.library.wrap_triton`` when ``traced``: that lets
    torch.compile trace a launch inside a ``triton_op`` but costs host time at every launch, so
    eager callers pass ``traced=False``. ``launch``, where given, launches the kernel instead (a
    benchmark's launch variant, a test's recorder). Where this torch's ``wrap_triton`` refuses
    the interpreter's kernels (torch 2.11; 2.13 takes them) the launch is direct: nothing traces
    an interpreted kernel anyway."""
    if launch is not None:
        return functools.partial(launch, kernel, grid)
    if traced and (isinstance(kernel, JITFunction) or _wraps_interpreted_kernels()):
        return torch.library.wrap_triton(kernel)[grid]
    return kernel[grid]


def _wraps_interpreted_kernels() -> bool:
    """Whether this torch's ``wrap_triton`` takes the interpreter's kernels (asked at each
    traced launch of an interpreted kernel: tests only)."""
    try:
        torch.library.wrap_triton(_scale_rows_kernel)
    except RuntimeError:
        return False
    return True


def unused_pointer(tensor: torch.Tensor, traced: bool) -> torch.Tensor:
    """A stand-in for pointer arguments the kernel does not dereference under its constexprs.

    Eager: ``tensor`` itself (no allocation). Traced: a separate 1-element tensor. Where
    torch.compile's mutation analysis of a ``wrap_triton`` launch gives up, it counts every
    argument as written and functionalization copies each one separately, so a real argument
    passed twice would come back as whichever copy is written back last.
    """
    return tensor.new_empty(1) if traced else tensor


#: Largest finite fp32 value: normalised margins beyond it (inf) are held here so that
#: ``0 * u`` stays 0 where a probability underflowed.
FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _row_scale(magnitude):
    """A power of two ``p <= 1`` per element of the fp32 ``magnitude`` (>= 0) with
    ``magnitude * p < 4``: multiplying a row by it is exact and keeps its sums of margins and
    squares finite (``elogitnorm_fast.geometry.power_of_two_reciprocal``, read from the
    exponent bits the same way; inf and NaN give ``2^-126``)."""
    exponent = (magnitude.to(tl.int32, bitcast=True) >> 23) & 0xFF
    biased = tl.minimum(tl.maximum(254 - exponent, 1), 127)
    return (biased << 23).to(tl.float32, bitcast=True)


@triton.jit
def _row_targets(target_ptr, rows, row_mask, n_cols, ignore_index):
    """Targets of a block of rows as int64, the valid-row mask and the in-range mask."""
    target = tl.load(target_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
    valid = row_mask & (target != ignore_index)
    in_range = valid & (target >= 0) & (target < n_cols)
    return target, valid, in_range


@triton.jit
def _row_weight(target_ptr, n_rows, n_cols, ignore_index, REDUCE: tl.constexpr,
                COUNT_BLOCK: tl.constexpr):
    """Each valid row's share of a reduced loss: 1 / (number of valid rows) for ``mean``
    (REDUCE 2; 1 / 0 = inf when every row is ignored, so the loss is NaN and the gradient 0, as
    with ``F.cross_entropy``), else 1 (REDUCE 1: ``sum``, 0: per-row losses). A 0-d fp32
    tensor. Every program counts all N targets, COUNT_BLOCK at a time: no atomics, no other
    launch (:func:`counts_within_budget` bounds the cost)."""
    if REDUCE == 2:
        count = tl.zeros([COUNT_BLOCK], dtype=tl.float32)
        for first in range(0, n_rows, COUNT_BLOCK):
            block_rows = (first + tl.arange(0, COUNT_BLOCK)).to(tl.int64)
            _, valid, _ = _row_targets(target_ptr, block_rows, block_rows < n_rows, n_cols,
                                       ignore_index)
            count += valid.to(tl.float32)
        row_weight = 1.0 / tl.sum(count, axis=0)
    else:
        row_weight = tl.sum(tl.zeros([1], dtype=tl.float32), axis=0) + 1.0  # 1, 0-d
    return row_weight


#: The kernels' ``REDUCE`` constexpr for each reduction (:func:`_row_weight`).
REDUCE_CODES = {"none": 0, "sum": 1, "mean": 2}
#: Targets a program reads at a time to count the valid rows of a ``mean`` reduced in the kernel.
COUNT_BLOCK = 1024
#: Largest (programs x N) of a ``mean`` reduced with a block of rows per program: every program
#: counts all N targets (2^21 int64 loads at most, 16 MiB read from L2, where they stay).
COUNTED_TARGETS = 1 << 21


def counts_within_budget(n_rows: int, rows_per_program: int, reduction: str,
                         budget: int = COUNTED_TARGETS) -> bool:
    """Whether a ``sum`` / ``mean`` of ``n_rows`` rows may be reduced in a kernel with
    ``rows_per_program`` rows per program (:func:`_row_weight`: a mean's programs each count
    all N targets, ``budget`` loads at most in all); never for an empty batch."""
    if n_rows <= 0:
        return False
    return reduction == "sum" or cdiv(n_rows, rows_per_program) * n_rows <= budget


@triton.jit
def _program_rows(n_rows, ROWS: tl.constexpr):
    """This program's block of ROWS rows (int64, so N * C may exceed 2^31) of a row kernel and
    the in-range mask.

    Store addresses come from helpers like this one that take no pointer: torch.compile's
    mutation analysis of a ``wrap_triton`` launch counts every pointer passed to a helper whose
    result feeds a store address as written (and then copies it), so targets and upstream
    gradients are loaded by separate helpers (:func:`_row_targets`, :func:`_row_upstream`)."""
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    return rows, rows < n_rows


def tile_grid(n_rows: int, n_cols: int) -> tuple[int, int, tuple[int]]:
    """``(ROWS, BLOCK, grid)`` of the elementwise backward kernels: tiles of at most
    ``SCALE_BLOCK`` elements on a 1-D grid (axes 1 and 2 stop at 65535 blocks)."""
    block = min(next_power_of_2(n_cols), SCALE_BLOCK)
    rows = min(16, max(1, SCALE_BLOCK // block))
    return rows, block, (cdiv(n_rows, rows) * cdiv(n_cols, block),)


#: Programs a checking launch (:func:`grouped_tile_grid`) keeps at least, where the tiles allow.
CHECK_PROGRAMS = 2048


def grouped_tile_grid(n_rows: int, n_cols: int, check_programs: int = CHECK_PROGRAMS
                      ) -> tuple[int, int, tuple[int], int]:
    """``(ROWS, BLOCK, grid, TILES)``: :func:`tile_grid`'s tiles with ``TILES`` consecutive
    column tiles of the same rows in one program (:func:`_tile_group`), as many per program as
    still leave ``check_programs`` programs (one program per block of rows at most). For a
    kernel that first checks its rows and mostly stops there: fewer, longer programs."""
    rows, block, _ = tile_grid(n_rows, n_cols)
    row_count, col_tiles = cdiv(n_rows, rows), cdiv(n_cols, block)
    groups = min(col_tiles, max(1, cdiv(check_programs, row_count)))
    tiles = cdiv(col_tiles, groups)
    return rows, block, (row_count * cdiv(col_tiles, tiles),), tiles


@triton.jit
def _tile_group(n_rows, n_cols, tiles, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's rows (int64), their mask and its first column in a
    :func:`grouped_tile_grid` launch of ``tiles`` column tiles per program (``tiles = 1``: the
    tiles of :func:`tile_grid`); no pointer taken, see :func:`_program_rows`."""
    program = tl.program_id(0).to(tl.int64)
    groups = tl.cdiv(n_cols, BLOCK * tiles)
    rows = (program // groups) * ROWS + tl.arange(0, ROWS)
    return rows, rows < n_rows, (program % groups) * (BLOCK * tiles)


@triton.jit
def _tile(n_rows, n_cols, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's (ROWS x BLOCK) tile of a :func:`tile_grid` launch: rows (int64), columns,
    the row mask and the tile mask (no pointer taken: see :func:`_program_rows`)."""
    rows, row_mask, first_col = _tile_group(n_rows, n_cols, 1, ROWS, BLOCK)
    cols = first_col + tl.arange(0, BLOCK)
    return rows, cols, row_mask, row_mask[:, None] & (cols[None, :] < n_cols)


@triton.jit
def _row_upstream(target_ptr, upstream_ptr, upstream_stride, rows, row_mask, n_cols,
                  ignore_index):
    """Targets of a block of rows, the valid-row mask and ``g = where(valid, upstream, 0)`` in
    fp32."""
    target, valid, _ = _row_targets(target_ptr, rows, row_mask, n_cols, ignore_index)
    g = tl.load(upstream_ptr + rows * upstream_stride, mask=row_mask, other=0.0)
    return target, valid, tl.where(valid, g.to(tl.float32), 0.0)


@triton.jit
def _scale_rows_kernel(
    first_ptr,
    first_out_ptr,
    second_ptr,
    second_out_ptr,
    upstream_ptr,
    upstream_stride,
    target_ptr,
    n_rows,
    n_cols,
    ignore_index,
    HAS_FIRST: tl.constexpr,
    HAS_SECOND: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Tile (ROWS x BLOCK) of two contiguous N x C tensors, each scaled by the row's g.
    rows, cols, row_mask, mask = _tile(n_rows, n_cols, ROWS, BLOCK)
    _, _, g = _row_upstream(target_ptr, upstream_ptr, upstream_stride, rows, row_mask, n_cols,
                            ignore_index)
    offsets = rows[:, None] * n_cols + cols[None, :]
    if HAS_FIRST:
        _scale_tile(first_ptr, first_out_ptr, offsets, mask, g)
    if HAS_SECOND:
        _scale_tile(second_ptr, second_out_ptr, offsets, mask, g)


@triton.jit
def _scale_tile(source_ptr, out_ptr, offsets, mask, g):
    """``out[offsets] = source[offsets] * g[:, None]``, in fp32, stored in ``out``'s dtype."""
    x = tl.load(source_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (x * g[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


def scale_rows(
    first: torch.Tensor,
    second: torch.Tensor | None,
    upstream: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int,
    traced: bool = True,
    launch: Launch | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(first * g[:, None], second * g[:, None])`` with ``g = where(valid, upstream, 0)``.

    ``first`` / ``second`` are contiguous (N, C) (either may be empty: (0, C); ``second`` may be
    None, and then so is its result); ``upstream`` is any strided (N,) tensor, e.g. a stride-0
    expansion, or 0-d (:func:`upstream_stride`). New tensors are returned, the inputs are left
    untouched (they may be saved for a second backward). ``traced``, ``launch``: see
    :func:`launcher`.
    """
    first_out = torch.empty_like(first)
    second_out = None if second is None else torch.empty_like(second)
    n_rows = target.shape[0]
    has_first = first.shape[0] > 0
    has_second = second is not None and second.shape[0] > 0
    n_cols = max(first.shape[1], 0 if second is None else second.shape[1])
    if n_rows == 0 or n_cols == 0 or not (has_first or has_second):
        return first_out, second_out
    rows, block, grid = tile_grid(n_rows, n_cols)
    unused = None if has_second else unused_pointer(first_out, traced)
    launcher(_scale_rows_kernel, grid, traced, launch)(  # HAS_SECOND False: the second pair unused
        first, first_out, second if has_second else unused,
        second_out if has_second else unused, upstream, upstream_stride(upstream), target,
        n_rows, n_cols, ignore_index,
        HAS_FIRST=has_first, HAS_SECOND=has_second, ROWS=rows, BLOCK=block, num_warps=4,
    )
    return first_out, second_out
