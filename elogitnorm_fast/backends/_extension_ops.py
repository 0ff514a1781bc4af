"""Python side of the compiled loss ops: fake kernels, availability and thin callers.

The C++ extension ``elogitnorm_fast._C`` declares the ops in ``csrc/ops.cpp`` and implements them
per device (``csrc/cpu/*_loss.cpp``, ``csrc/cuda/*.cu``). This module adds what the dispatcher
needs from Python (schema-first ``torch.library``): ``register_fake`` kernels giving output
shapes for ``torch.compile`` and meta tensors.

The autograd formulas are registered in C++ (``csrc/ops.cpp``, measured about 60-100 us per
step cheaper than ``register_autograd`` on a 2-core CPU); the backward of each forward op is
itself a registered op with a fake kernel here, so a training step is one dispatcher call per
direction and ``torch.compile`` traces both (docs/design.md).

Forward ops return the loss plus the gradient for an upstream gradient of one per valid row
("unit" gradient) and what the weight gradient needs; the backward ops rescale by the real
upstream gradient and run the weight-gradient GEMMs (docs/design.md).

Importing this module never fails: when the extension is missing or lacks the ops,
:func:`unavailable_reason` says why and the callers must not be used.
"""

from __future__ import annotations

import torch

from ..extension import has_ops, load_error
from ..geometry import accumulation_dtype

_NAMESPACE = "elogitnorm_fast"
_OPS = ("elogitnorm_forward", "elogitnorm_backward", "logitnorm_forward", "logitnorm_backward")


def _load() -> str | None:
    error = load_error()
    if error is not None:
        return error
    missing = [name for name in _OPS if not has_ops(name)]
    if missing:
        return f"elogitnorm_fast._C lacks the ops {missing}; rebuild it (pip install -e .)"
    return None


_LOAD_ERROR = _load()


def _kernel_reason(dispatch_key: str) -> str | None:
    if _LOAD_ERROR is not None:
        return _LOAD_ERROR
    for name in _OPS:
        qualified = f"{_NAMESPACE}::{name}"
        if not torch._C._dispatch_has_kernel_for_dispatch_key(qualified, dispatch_key):
            return f"elogitnorm_fast._C was built without {dispatch_key} kernels"
    return None


# Computed once at import (no device query), so that torch.compile traces a dict lookup.
_KERNEL_REASONS = {key: _kernel_reason(key) for key in ("CPU", "CUDA")}


def unavailable_reason(dispatch_key: str) -> str | None:
    """Why the compiled loss ops cannot run for ``dispatch_key`` ("CPU", "CUDA"); None: they can."""
    return _KERNEL_REASONS[dispatch_key]


def elogitnorm_loss(
    logits: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    reduction: str,
    ignore_index: int,
    eps: float,
    divisor: float,
) -> torch.Tensor:
    """ELogitNorm through the compiled ops (inputs already validated; ``divisor`` is C or C-1)."""
    grad_mode = torch.is_grad_enabled()
    return torch.ops.elogitnorm_fast.elogitnorm_forward.default(
        logits, weight, target, reduction, ignore_index, float(eps), float(divisor),
        grad_mode and logits.requires_grad, grad_mode and weight.requires_grad,
    )[0]


def logitnorm_loss(
    logits: torch.Tensor, target: torch.Tensor, *, tau: float, reduction: str, ignore_index: int
) -> torch.Tensor:
    """LogitNorm through the compiled ops (inputs already validated)."""
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    return torch.ops.elogitnorm_fast.logitnorm_forward.default(
        logits, target, float(tau), reduction, ignore_index, need_grad
    )[0]


def _elogitnorm_forward_fake(
    logits, weight, target, reduction, ignore_index, eps, divisor, need_logits_grad,
    need_weight_grad,
):
    rows, classes = logits.shape
    acc = accumulation_dtype(logits, weight)
    loss = logits.new_empty((rows,) if reduction == "none" else ())
    grad_unit = logits.new_empty((rows, classes) if need_logits_grad else (0,), dtype=acc)
    scale_grad = logits.new_empty((rows,) if need_weight_grad else (0,), dtype=acc)
    sample_slot = logits.new_empty((rows,), dtype=torch.int64)
    distance_rows = torch.sym_min(rows, classes) if need_weight_grad else 0
    row_class = logits.new_empty((distance_rows,), dtype=torch.int64)
    distances = logits.new_empty((distance_rows, classes), dtype=acc)
    valid_count = logits.new_empty((), dtype=acc)
    return loss, grad_unit, scale_grad, sample_slot, row_class, distances, valid_count


def _elogitnorm_backward_fake(
    grad_output, logits, weight, grad_unit, scale_grad, sample_slot, row_class, distances,
    valid_count, reduction, eps, need_logits_grad, need_weight_grad,
):
    grad_logits = logits.new_empty(logits.shape if need_logits_grad else (0,))
    grad_weight = weight.new_empty(weight.shape if need_weight_grad else (0,))
    return grad_logits, grad_weight


def _logitnorm_forward_fake(logits, target, tau, reduction, ignore_index, need_grad):
    rows, classes = logits.shape
    acc = accumulation_dtype(logits)
    loss = logits.new_empty((rows,) if reduction == "none" else ())
    grad_unit = logits.new_empty((rows, classes) if need_grad else (0,), dtype=acc)
    return loss, grad_unit, logits.new_empty((), dtype=acc)


def _logitnorm_backward_fake(
    grad_output, logits, target, grad_unit, valid_count, reduction, ignore_index
):
    return logits.new_empty(logits.shape)


if _LOAD_ERROR is None:
    torch.library.register_fake(f"{_NAMESPACE}::elogitnorm_forward")(_elogitnorm_forward_fake)
    torch.library.register_fake(f"{_NAMESPACE}::elogitnorm_backward")(_elogitnorm_backward_fake)
    torch.library.register_fake(f"{_NAMESPACE}::logitnorm_forward")(_logitnorm_forward_fake)
    torch.library.register_fake(f"{_NAMESPACE}::logitnorm_backward")(_logitnorm_backward_fake)

