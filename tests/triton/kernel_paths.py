"""The Triton losses on an explicit path, checked against the float64 reference.

Each loss module takes its configuration as an argument (``config=``, ``block_cols=``,
``traced=``, ``capturing=``), so a test names the path it runs instead of changing a setting:
the helpers here call :func:`elogitnorm_fast.kernels.elogitnorm.elogitnorm_loss` and
:func:`elogitnorm_fast.kernels.logitnorm.logitnorm_loss` with those keywords and compare loss
and gradients with :mod:`elogitnorm_fast.reference` (as ``parity.check_*`` do for a backend).
Interpreter tests only (imports triton).
"""

from __future__ import annotations

import dataclasses

import torch

from elogitnorm_fast.kernels import elogitnorm as elogitnorm_kernels
from elogitnorm_fast.kernels import logitnorm as logitnorm_kernels
from elogitnorm_fast.reference import (
    DEFAULT_EPS,
    DEFAULT_TAU,
    divisor_value,
    elogitnorm_reference,
    logitnorm_reference,
)

from parity import _close, _grads, upstream

#: fp32 kernels against the float64 reference (same bounds as the torch backend's fp32 tests).
RTOL, ATOL = 2e-4, 2e-6

#: ELogitNorm's kernel paths: the fused small-C kernel, GEMM distances with rows on chip, GEMM
#: distances with rows streamed over column blocks of 4.
KERNEL_PATHS = ("fused", "gemm", "streaming")
#: How an eager sum / mean comes back: the C++ node, the Python Function around a kernel that
#: reduced the loss, or per-row losses reduced by torch ops.
REDUCED_PATHS = ("native", "python", "host")


def block_cols(path: str, n_cols: int) -> int | None:
    """``block_cols`` of a kernel path: None (fused where C and D allow), one block >= C, or
    a quarter of it (streamed)."""
    if path == "fused":
        return None
    single = 1 << max(n_cols - 1, 1).bit_length()
    return single if path == "gemm" else max(4, single // 4)


def elogitnorm_config(logits, weight, reduction="mean", *, kernel="fused", returns="native",
                      block=None, **changes):
    """:func:`~elogitnorm_fast.kernels.elogitnorm.config_for` of these inputs on the kernel path
    ``kernel`` (or the column block ``block``) and the return path ``returns``, with
    ``changes`` (fields of the config) applied."""
    config = elogitnorm_kernels.config_for(
        logits.shape[0], logits.shape[1], weight.shape[1], reduction,
        block_cols=block if block is not None else block_cols(kernel, logits.shape[1]))
    if returns == "python":
        changes.setdefault("node", False)
    elif returns == "host":
        changes.setdefault("reduce", False)
        changes.setdefault("node", False)
    return dataclasses.replace(config, **changes)


def logitnorm_config(logits, reduction="mean", *, returns="one program", block=None,
                     **changes):
    """:func:`~elogitnorm_fast.kernels.logitnorm.config_for` of these logits with the sum /
    mean reduced ``returns``: ``"one program"`` (through the C++ node),
    ``"one program, Python backward"``, ``"blocks"`` (as a CUDA graph capture takes it: the
    Python Function) or ``"host"`` (per-row losses), with ``changes`` applied."""
    capturing = returns == "blocks"
    config = logitnorm_kernels.config_for(*logits.shape, reduction, block_cols=block,
                                          capturing=capturing)
    if returns == "one program, Python backward":
        changes.setdefault("node", False)
    elif returns == "host":
        changes.setdefault("reduce", None)
        changes.setdefault("node", False)
    return dataclasses.replace(config, **changes)


def elogitnorm(logits, weight, target, reduction="mean", *, divisor="classes", eps=DEFAULT_EPS,
               **path):
    """ELogitNorm through the kernel module, ``path``: its keywords (``config``,
    ``block_cols``, ``traced``, ``capturing``)."""
    return elogitnorm_kernels.elogitnorm_loss(
        logits, weight, target.contiguous(), reduction=reduction, ignore_index=-100, eps=eps,
        divisor=divisor_value(logits.shape[1], divisor), **path)


def logitnorm(logits, target, reduction="mean", *, tau=DEFAULT_TAU, **path):
    """LogitNorm through the kernel module (``path`` as for :func:`elogitnorm`)."""
    return logitnorm_kernels.logitnorm_loss(logits, target.contiguous(), tau=tau,
                                            reduction=reduction, ignore_index=-100, **path)


def check_elogitnorm(logits, weight, target, reduction, *, rtol=RTOL, atol=ATOL,
                     divisor="classes", **path):
    """Loss and both gradients on ``path`` equal the float64 reference's (random upstream)."""
    loss = elogitnorm(logits, weight, target, reduction, divisor=divisor, **path)
    ref_logits = logits.detach().double().requires_grad_(True)
    ref_weight = weight.detach().double().requires_grad_(True)
    expected = elogitnorm_reference(ref_logits, ref_weight, target, reduction=reduction,
                                    divisor=divisor)
    grad = upstream(loss)
    grad_logits, grad_weight = _grads(loss, (logits, weight), grad)
    ref_grad_logits, ref_grad_weight = _grads(expected, (ref_logits, ref_weight), grad.double())
    assert loss.dtype == torch.float32 and loss.shape == expected.shape
    _close("loss", loss.double(), expected, rtol, atol)
    _close("grad_logits", grad_logits.double(), ref_grad_logits, rtol, atol)
    _close("grad_weight", grad_weight.double(), ref_grad_weight, rtol, atol)
    return loss, grad_logits, grad_weight


def check_logitnorm(logits, target, reduction, *, rtol=RTOL, atol=ATOL, tau=DEFAULT_TAU,
                    **path):
    """LogitNorm loss and logits gradient on ``path`` equal the float64 reference's."""
    loss = logitnorm(logits, target, reduction, tau=tau, **path)
    ref_logits = logits.detach().double().requires_grad_(True)
    expected = logitnorm_reference(ref_logits, target, tau=tau, reduction=reduction)
    grad = upstream(loss)
    (grad_logits,) = _grads(loss, (logits,), grad)
    (ref_grad,) = _grads(expected, (ref_logits,), grad.double())
    _close("loss", loss.double(), expected, rtol, atol)
    _close("grad_logits", grad_logits.double(), ref_grad, rtol, atol)
    return loss, grad_logits


def returned_by(loss: torch.Tensor) -> str:
    """Which eager path returned ``loss``: ``"native"`` (the C++ node of the kernels' unit
    gradients), ``"python"`` (a Function around a kernel that reduced the loss) or ``"host"``
    (per-row losses reduced by torch ops)."""
    name = loss.grad_fn.name()
    if "UnitGradientNode" in name:
        return "native"
    if "ReducedLogitNorm" in name or "EagerELogitNorm" in name:
        return "python"
    return "host"
