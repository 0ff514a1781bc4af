"""The ``cpu`` backend: fused C++ kernels (``csrc/cpu/``) registered with ``torch.library``.

One op per direction: the forward computes the loss and, when an input requires grad, the
gradient with respect to the logits in the same parallel pass over the rows (design.md section
2.1); the backward rescales it and runs the two weight-gradient GEMMs.

Example::

    loss = elogitnorm_fast.elogitnorm_loss(logits, fc.weight, target, backend="cpu")
"""

from __future__ import annotations

import torch

from . import _extension_ops
from ._extension_ops import elogitnorm_loss, logitnorm_loss  # noqa: F401 (the backend API)

NAME = "cpu"
#: The kernels raise ValueError for a target outside [0, C) (other than ignore_index), so the
#: public API skips its own pass over the targets.
CHECKS_TARGET_VALUES = True


def unavailable_reason(device: torch.device | None) -> str | None:
    """None when the compiled CPU kernels are built (and ``device``, if given, is the CPU)."""
    if device is not None and device.type != "cpu":
        return f"the cpu backend runs on CPU tensors, got device {device}"
    return _extension_ops.unavailable_reason("CPU")

