"""The ``triton`` backend: fused Triton kernels for LogitNorm and ELogitNorm (the CUDA default).

A thin adapter: each loss lives in one module under :mod:`elogitnorm_fast.kernels` with its
kernels, launchers, ``triton_op`` registration and autograd (:mod:`.kernels.elogitnorm`,
:mod:`.kernels.logitnorm`); this module checks availability, sends float64 inputs to the
``torch`` backend's closed form (the kernels compute in fp32) and gives the loss its dtype.
Triton is imported only when a kernel runs. With ``TRITON_INTERPRET=1`` set before triton is
imported, CPU tensors are accepted (the Triton interpreter; fp32 only), which is how the kernels
are tested without a GPU.

Example::

    loss = elogitnorm_fast.elogitnorm_loss(logits, fc.weight, y, backend="triton")
"""

from __future__ import annotations

import importlib.util

import torch

from ..extension import triton_interpreting
from ..geometry import as_dtype
from . import torch_backend

NAME = "triton"
#: The loss functions take ``loss_dtype``: under autocast the public API asks for a float32
#: loss from float16 / bfloat16 logits, which the kernels accumulate in float32 anyway.
TAKES_LOSS_DTYPE = True

_HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
# Looked up once, without importing triton.
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def unavailable_reason(device: torch.device | None) -> str | None:
    """Why the kernels cannot run on ``device`` (None where they can; any device if None)."""
    if not _HAS_TRITON:
        return "triton is not installed (pip install triton)"
    if not _HAS_TRITON_OP:
        return f"torch >= 2.6 is needed for torch.library.triton_op, got torch {torch.__version__}"
    if device is None:
        if torch.cuda.is_available() or triton_interpreting():
            return None
        return ("no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU tensors in Triton's "
                "slow debugging interpreter, for tests only)")
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "torch cannot reach a CUDA device"
    if device.type == "cpu" and triton_interpreting():
        return None
    return f"needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got device {device}"


def _unit_column_stride(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.shape[1] == 1 or logits.stride(1) == 1 else logits.contiguous()


def elogitnorm_loss(
    logits: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    reduction: str,
    ignore_index: int,
    eps: float,
    divisor: int,
    block_cols: int | None = None,
    loss_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """ELogitNorm (inputs already validated); ``divisor`` is the number, C or C - 1.

    ``block_cols`` (a power of two) forces the kernel's column block and the GEMM-distance path
    (tests use it to exercise the streaming path at small C); None picks both from C and D.
    ``loss_dtype``: the returned loss's dtype (None: the logits').
    """
    out_dtype = loss_dtype or logits.dtype
    if logits.dtype == torch.float64 or weight.dtype == torch.float64:
        return as_dtype(torch_backend.elogitnorm_loss(
            as_dtype(logits, torch.promote_types(logits.dtype, out_dtype)), weight, target,
            reduction=reduction, ignore_index=ignore_index, eps=eps, divisor=divisor), out_dtype)
    from ..kernels import elogitnorm

    loss = elogitnorm.elogitnorm_loss(
        _unit_column_stride(logits), weight, target.contiguous(), reduction=reduction,
        ignore_index=ignore_index, eps=eps, divisor=divisor, block_cols=block_cols)
    return as_dtype(loss, out_dtype)


def logitnorm_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    tau: float,
    reduction: str,
    ignore_index: int,
    block_cols: int | None = None,
    loss_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """LogitNorm (inputs already validated); see :func:`elogitnorm_loss` for ``block_cols`` and
    ``loss_dtype``."""
    out_dtype = loss_dtype or logits.dtype
    if logits.dtype == torch.float64:
        return torch_backend.logitnorm_loss(logits, target, tau=tau, reduction=reduction,
                                            ignore_index=ignore_index)
    from ..kernels import logitnorm

    loss = logitnorm.logitnorm_loss(
        _unit_column_stride(logits), target.contiguous(), tau=tau, reduction=reduction,
        ignore_index=ignore_index, block_cols=block_cols)
    return as_dtype(loss, out_dtype)
