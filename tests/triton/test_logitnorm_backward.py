"""LogitNorm's eager backward completes the forward's gradient in place, or recomputes it.

The forward writes the gradient for the upstream gradient a plain backward of the reduced loss
delivers; the backward leaves those rows alone (the logits are read once), recomputes rows that
received something else (a loss weight, a GradScaler's scale) bitwise as the op path would, and
never writes a gradient it has handed out.
"""

from __future__ import annotations

import pytest
import torch
from kernel_paths import ATOL, RTOL, logitnorm, logitnorm_config

from elogitnorm_fast.kernels import rows
from elogitnorm_fast.reference import logitnorm_reference

from parity import REDUCTIONS, make_case

LOGITNORM_RETURNS = ("one program", "one program, Python backward", "blocks", "host")


def _gradient(logits, target, reduction, after_forward=None, weight=1.0, **path):
    """d(weight * loss)/dlogits; ``after_forward(logits)`` runs between the forward and the
    backward; ``path``: the loss module's path keywords."""
    logits = logits.detach().clone().requires_grad_(True)
    loss = logitnorm(logits, target, reduction, **path)
    if after_forward is not None:
        after_forward(logits)
    (grad,) = torch.autograd.grad((loss.sum() if reduction == "none" else loss) * weight, logits)
    return grad


def _scramble(logits):
    """Overwrites the logits behind autograd's back (``.data`` keeps the version counter): a
    backward that reads them again computes a different gradient."""
    logits.data.copy_(torch.randn_like(logits) * 50)


@pytest.mark.parametrize("returns", LOGITNORM_RETURNS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("c", [10, 257])
def test_backward_does_not_reread_logits_for_the_expected_upstream(c, reduction, returns):
    """The forward's gradient for the upstream gradient the reduction gives (1, or 1 / count
    for mean) completes the backward: scrambling the logits in between changes nothing. The
    result is bitwise the gradient the recomputing op path gives."""
    logits, _, target = make_case(12, c, 1, "some_ignored", dtype=torch.float32)
    config = logitnorm_config(logits, reduction, returns=returns)
    plain = _gradient(logits, target, reduction, config=config)
    scrambled = _gradient(logits, target, reduction, after_forward=_scramble, config=config)
    assert torch.equal(scrambled, plain)
    recomputed = _gradient(logits, target, reduction, traced=True)
    assert torch.equal(plain, recomputed)
    ref = logits.detach().double().requires_grad_(True)
    loss = logitnorm_reference(ref, target, reduction=reduction)
    (expected,) = torch.autograd.grad(loss.sum() if reduction == "none" else loss, ref)
    torch.testing.assert_close(plain.double(), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("weight", [1.0, 3.0])
def test_backward_groups_column_tiles(weight):
    """Several column tiles of the same rows in one backward program (rows.grouped_tile_grid;
    ``check_programs=1`` forces all 3 tiles of C = 5000 into one): the expected upstream still
    skips every tile, another still recomputes every one, bitwise as with one tile per program.
    (The Python backward: the C++ node never reads the logits.)"""
    logits, _, target = make_case(5, 5000, 1, "some_ignored", dtype=torch.float32)
    assert rows.grouped_tile_grid(5, 5000)[3] == 1
    per_tile = _gradient(logits, target, "mean", weight=weight,
                         config=logitnorm_config(logits, node=False))
    assert rows.grouped_tile_grid(5, 5000, check_programs=1) == (1, 2048, (5,), 3)
    grouped_config = logitnorm_config(logits, node=False, check_programs=1)
    grouped = _gradient(logits, target, "mean", weight=weight, config=grouped_config)
    assert torch.equal(grouped, per_tile)
    scrambled = _gradient(logits, target, "mean", after_forward=_scramble, weight=weight,
                          config=grouped_config)
    assert torch.equal(scrambled, grouped) == (weight == 1.0)
    ref = logits.detach().double().requires_grad_(True)
    (expected,) = torch.autograd.grad(weight * logitnorm_reference(ref, target), ref)
    torch.testing.assert_close(grouped.double(), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("returns", LOGITNORM_RETURNS)
@pytest.mark.parametrize("weight", [3.0, float("nan")])
def test_other_upstream_recomputes(weight, returns):
    """Another upstream gradient (a loss weight, a NaN): the Python backward recomputes from
    the logits, the C++ node scales the forward's gradient (and never reads the logits).
    Ignored rows get 0 on every path, even for a NaN upstream gradient (as F.cross_entropy)."""
    logits, _, target = make_case(9, 10, 1, "some_ignored", dtype=torch.float32)
    config = logitnorm_config(logits, returns=returns)
    native = config.node
    assert native == (returns == "one program")
    grad = _gradient(logits, target, "mean", weight=weight, config=config)
    scrambled = _gradient(logits, target, "mean", after_forward=_scramble, weight=weight,
                          config=config)
    valid = target != -100
    assert torch.equal(grad[~valid], torch.zeros_like(grad[~valid]))
    if weight != weight:
        assert torch.isnan(grad[valid]).all()
        return
    assert torch.equal(scrambled, grad) == native
    ref = logits.detach().double().requires_grad_(True)
    (expected,) = torch.autograd.grad(logitnorm_reference(ref, target) * weight, ref)
    torch.testing.assert_close(grad.double(), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("returns", LOGITNORM_RETURNS)
def test_retained_graph_never_rewrites_a_handed_out_gradient(returns):
    logits, _, target = make_case(8, 6, 1, dtype=torch.float32)
    loss = logitnorm(logits, target, config=logitnorm_config(logits, returns=returns))
    (first,) = torch.autograd.grad(loss, logits, retain_graph=True)
    kept = first.clone()
    (second,) = torch.autograd.grad(loss * 2, logits, retain_graph=True)
    (third,) = torch.autograd.grad(loss, logits)
    assert torch.equal(first, kept)
    torch.testing.assert_close(second, 2 * kept)
    assert torch.equal(third, kept)
