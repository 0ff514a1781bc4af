"""The ``cpu`` backend: fused C++ kernels (``csrc/cpu/``) registered with ``torch.library``.

One op per direction: the forward computes the loss and, when an input requires grad, the
gradient with respect to the logits in the same parallel pass over the rows (docs/design.md);
the backward rescales it and runs the two weight-gradient GEMMs.

Every sum, the GEMMs' included (``csrc/cpu/fixed_order_gemm.h``), runs in one fixed order, so
results are bitwise the same for any ``torch.set_num_threads``. Rows of logits and weights far
from 1 in magnitude are computed divided by a power of two (exact), so squares and margins do
not overflow: any finite float32 logits, and weights up to about 1e30 in magnitude, give the
float64 reference's loss and gradients to float32 precision.

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

