"""Where the kernels reduce ``sum`` / ``mean``, and ``ignore_index``, against the reference.

Eager steps reduce in the kernel (LogitNorm: one program for small batches, else a block of
rows per program that counts the valid rows itself; ELogitNorm: each row's share of the loss)
and return through the C++ node, or the Python Function, or reduce per-row losses with torch
ops where the kernel's count would read too much: every one of those paths matches.
"""

from __future__ import annotations

import pytest
import torch
from kernel_paths import (
    REDUCED_PATHS,
    check_elogitnorm,
    check_logitnorm,
    elogitnorm_config,
    logitnorm_config,
    returned_by,
)
from kernel_paths import elogitnorm as elogitnorm_loss
from kernel_paths import logitnorm as logitnorm_loss

import elogitnorm_fast as ef
from elogitnorm_fast.kernels import elogitnorm, logitnorm, rows

from parity import REDUCTIONS, make_case

#: Where an eager LogitNorm sum / mean is reduced (``kernel_paths.logitnorm_config``).
LOGITNORM_RETURNS = ("one program", "one program, Python backward", "blocks", "host")


@pytest.mark.parametrize("returns", LOGITNORM_RETURNS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("c", [1, 3, 10, 257, 1000])
@pytest.mark.parametrize("n", [1, 5, 64])
def test_logitnorm_matches_reference(n, c, reduction, returns):
    logits, _, target = make_case(n, c, 1, dtype=torch.float32)
    target[::4] = -100
    check_logitnorm(logits, target, reduction,
                    config=logitnorm_config(logits, reduction, returns=returns))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n,c,d", [(5, 10, 6), (64, 10, 6), (5, 257, 6), (64, 257, 6)])
def test_elogitnorm_reduction_in_kernel_and_on_host_match(n, c, d, reduction):
    """Eager ELogitNorm's sum / mean: the kernels' row shares through the C++ node (the
    default) or the Python Function, and torch's reduction of per-row losses all match the
    reference, fused (C = 10) and GEMM (C = 257) paths, with ignored rows."""
    logits, weight, target = make_case(n, c, d, "some_ignored", dtype=torch.float32)
    assert elogitnorm.config_for(n, c, d, reduction).node
    for path in REDUCED_PATHS:
        config = elogitnorm_config(logits, weight, reduction, returns=path)
        assert returned_by(elogitnorm_loss(logits, weight, target, reduction,
                                           config=config)) == path
        check_elogitnorm(logits, weight, target, reduction, config=config)


def test_elogitnorm_mean_beyond_the_target_budget_reduces_on_the_host():
    """Where every program counting all N targets would read more than the budget, the mean
    is taken on the host from per-row losses (and still matches)."""
    fused_rows = elogitnorm.fused_blocks(10, 6).rows
    assert rows.counts_within_budget(64, fused_rows, "mean")
    assert not rows.counts_within_budget(64, fused_rows, "mean", budget=64)
    # One row per program: every program counts all N targets, N^2 <= 2^21 up to N = 1448.
    assert elogitnorm.config_for(1448, 10, 6, "mean").reduce
    assert not elogitnorm.config_for(1449, 10, 6, "mean").reduce
    assert elogitnorm.config_for(1449, 10, 6, "sum").reduce  # a sum counts nothing
    logits, weight, target = make_case(64, 10, 6, "some_ignored", dtype=torch.float32)
    config = elogitnorm_config(logits, weight, returns="host")
    assert returned_by(elogitnorm_loss(logits, weight, target, config=config)) == "host"
    check_elogitnorm(logits, weight, target, "mean", config=config)


@pytest.mark.parametrize("returns", LOGITNORM_RETURNS)
def test_all_ignored_mean_gives_nan_loss_and_zero_gradient(returns):
    logits, weight, target = make_case(6, 4, 3, "all_ignored", dtype=torch.float32)
    elogitnorm_returns = {"one program": "native", "host": "host"}.get(returns, "python")
    for loss in (elogitnorm_loss(logits, weight, target,
                                 config=elogitnorm_config(logits, weight,
                                                          returns=elogitnorm_returns)),
                 logitnorm_loss(logits, target,
                                config=logitnorm_config(logits, returns=returns))):
        assert torch.isnan(loss)
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("capturing", [False, True])
def test_logitnorm_small_batch_reduces_in_one_program_only_when_not_capturing(capturing):
    """Under CUDA-graph capture a small batch is reduced by a block of rows per program, which
    replays faster than one program walking every row; eager, by one program."""
    config = logitnorm.config_for(12, 10, "mean", capturing=capturing)
    assert config.reduce == ("blocks" if capturing else "one program")
    logits, _, target = make_case(12, 10, 1, "some_ignored", dtype=torch.float32)
    loss = logitnorm_loss(logits, target, capturing=capturing)
    # Eager through the C++ node; captured, the Python Function (no extra kernels replayed).
    assert returned_by(loss) == ("python" if capturing else "native"), loss.grad_fn.name()
    check_logitnorm(logits, target, "mean", capturing=capturing)


def test_logitnorm_mean_counts_in_blocks_within_the_target_budget():
    """A batch too large for one program is reduced by a block of rows per program while
    programs x N stays within the budget; beyond it, the mean is taken on the host."""
    logits, _, target = make_case(40, 1000, 1, "some_ignored", dtype=torch.float32)
    config = logitnorm.config_for(40, 1000, "mean")
    assert config.reduce == "blocks" and config.node
    assert not rows.counts_within_budget(40, config.blocks.rows, "mean", budget=100)
    assert rows.counts_within_budget(40, config.blocks.rows, "sum", budget=100)
    # 4096 x 32768: 4096 programs of one row would each read all 4096 targets.
    assert logitnorm.config_for(4096, 32768, "mean").reduce is None
    assert logitnorm.config_for(4096, 32768, "sum").reduce == "blocks"
    loss = logitnorm_loss(logits, target, config=config)
    assert returned_by(loss) == "native", loss.grad_fn.name()
    check_logitnorm(logits, target, "mean", config=config)
    host = logitnorm_config(logits, returns="host")
    assert returned_by(logitnorm_loss(logits, target, config=host)) == "host"
    check_logitnorm(logits, target, "mean", config=host)


def test_mean_counted_over_several_count_blocks():
    """N = 1100 > COUNT_BLOCK: each program's count of the valid rows takes two blocks of
    targets (the second partial; the helper every kernel's count shares, here LogitNorm's by
    blocks of rows), and the mean and the gradient match the reference."""
    assert rows.COUNT_BLOCK < 1100 < 2 * rows.COUNT_BLOCK
    assert logitnorm.config_for(1100, 32, "mean").reduce == "blocks"
    logits, _, target = make_case(1100, 32, 1, "some_ignored", dtype=torch.float32)
    target[1050:] = -100  # ignored rows in the second block of targets too
    check_logitnorm(logits, target, "mean")


@pytest.mark.parametrize("expected", [None, 0.25, "tensor"])
def test_logitnorm_rows_writes_every_statistic(expected):
    """stats[0] is the expected upstream gradient (1 when none is given), not left as the
    allocator found it: opcheck compares every element of an op's outputs."""
    logits, _, target = make_case(70, 9, 1, "some_ignored", dtype=torch.float32)
    upstream = torch.tensor(0.125) if expected == "tensor" else expected
    for blocks in (None, rows.row_blocks(9, 4)):  # rows on chip, rows streamed
        stats = logitnorm.logitnorm_rows(logits.detach(), target, inv_tau=25.0,
                                         ignore_index=-100, blocks=blocks,
                                         expected_upstream=upstream, traced=False)[1]
        assert stats[0].item() == {None: 1.0, 0.25: 0.25, "tensor": 0.125}[expected]


def test_public_losses_take_the_chosen_paths():
    """The backend's calls take the paths :func:`config_for` picks: the C++ node for an eager
    mean, per-row losses for ``none``."""
    logits, weight, target = make_case(9, 10, 6, "some_ignored", dtype=torch.float32)
    assert returned_by(ef.elogitnorm_loss(logits, weight, target, backend="triton")) == "native"
    assert returned_by(ef.logitnorm_loss(logits, target, backend="triton")) == "native"
    per_row = ef.logitnorm_loss(logits, target, reduction="none", backend="triton")
    assert "EagerLogitNorm" in per_row.grad_fn.name()
