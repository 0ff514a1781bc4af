"""The ``reference`` backend: the all-pairs formula of :mod:`elogitnorm_fast.reference` (slow)."""

from __future__ import annotations

import torch

from .. import reference

NAME = "reference"


def unavailable_reason(device: torch.device) -> str | None:
    """Always available."""
    return None


def elogitnorm_loss(logits, weight, target, *, reduction, ignore_index, eps, divisor):
    """All-pairs ELogitNorm; ``divisor`` is the number C or C - 1."""
    mode = "classes" if divisor == logits.shape[1] else "paper"
    return reference.elogitnorm_reference(
        logits, weight, target, reduction=reduction, ignore_index=ignore_index, eps=eps,
        divisor=mode,
    )


def logitnorm_loss(logits, target, *, tau, reduction, ignore_index):
    """LogitNorm as the reference writes it."""
    return reference.logitnorm_reference(
        logits, target, tau=tau, reduction=reduction, ignore_index=ignore_index
    )
