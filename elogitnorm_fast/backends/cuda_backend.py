"""The ``cuda`` backend: fused CUDA kernels (``csrc/cuda/``) registered with ``torch.library``.

Same ops and contract as the ``cpu`` backend (the dispatcher picks the kernel by device): a warp
per row for small C, a block per row otherwise, fp32 accumulation, the distance rows by a direct
(no TF32) kernel and the weight-gradient GEMMs through cuBLAS, all on the current stream, no
host syncs.

Example::

    loss = elogitnorm_fast.elogitnorm_loss(logits, fc.weight, target, backend="cuda")
"""

from __future__ import annotations

import torch

from . import _extension_ops
from ._extension_ops import elogitnorm_loss, logitnorm_loss  # noqa: F401 (the backend API)

NAME = "cuda"


def unavailable_reason(device: torch.device | None) -> str | None:
    """None when the CUDA kernels are built and a CUDA device is present (``device`` if given)."""
    if device is not None and device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, got device {device}"
    reason = _extension_ops.unavailable_reason("CUDA")
    if reason is not None:
        return reason
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None

