"""The reference formulas against values worked out on paper: every backend's parity test trusts
the reference, so the reference itself is pinned here by arithmetic that does not use it."""

from __future__ import annotations

import math

import torch

from elogitnorm_fast.reference import elogitnorm_reference, logitnorm_reference


def test_elogitnorm_reference_on_a_two_by_three_case():
    # w0 = (0, 0), w1 = (3, 4), w2 = (0, 1): |w0 - w1| = 5, |w0 - w2| = 1, |w1 - w2| = 3 sqrt 2.
    weight = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]], dtype=torch.float64)
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    target = torch.tensor([1, 2])
    # Row 0: m = 0, v = 2, s = ((2 - 0) / 5 + (2 - 1) / 1) / 3 = 1.4 / 3; the target's z is 0.
    s0 = 1.4 / 3
    row0 = math.log(math.exp(2 / s0) + 1 + math.exp(1 / s0))
    # Row 1: a tie, so m = 1 (the first maximum), v = 1, s = ((1 - 0) / 5 + 0 + 0) / 3 = 1 / 15;
    # z / s = (0, 15, 15) and the target is class 2.
    row1 = math.log(1 + 2 * math.exp(15)) - 15
    losses = elogitnorm_reference(logits, weight, target, reduction="none")
    torch.testing.assert_close(losses, torch.tensor([row0, row1], dtype=torch.float64),
                               rtol=1e-12, atol=0)
    # The paper's divisor C - 1 = 2 instead of C = 3: every s grows by 3 / 2.
    paper = elogitnorm_reference(logits, weight, target, reduction="none", divisor="paper")
    s0, s1 = 1.4 / 2, 0.2 / 2
    expected = [math.log(math.exp(2 / s0) + 1 + math.exp(1 / s0)),
                math.log(1 + 2 * math.exp(1 / s1)) - 1 / s1]
    torch.testing.assert_close(paper, torch.tensor(expected, dtype=torch.float64), rtol=1e-12,
                               atol=0)


def test_logitnorm_reference_on_a_hand_case():
    # ||(3, 4)|| = 5, so with tau = 0.5 the scaled row is (3, 4) / (0.5 * (5 + 1e-7)).
    logits = torch.tensor([[3.0, 4.0], [0.0, -2.0]], dtype=torch.float64)
    target = torch.tensor([0, 1])
    a0, a1 = 1 / (0.5 * (5 + 1e-7)), 1 / (0.5 * (2 + 1e-7))
    row0 = math.log(math.exp(3 * a0) + math.exp(4 * a0)) - 3 * a0
    row1 = math.log(1 + math.exp(-2 * a1)) + 2 * a1
    losses = logitnorm_reference(logits, target, tau=0.5, reduction="none")
    torch.testing.assert_close(losses, torch.tensor([row0, row1], dtype=torch.float64),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(logitnorm_reference(logits, target, tau=0.5),
                               torch.tensor((row0 + row1) / 2, dtype=torch.float64),
                               rtol=1e-12, atol=0)
