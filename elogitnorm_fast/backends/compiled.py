"""The compiled extension's Python side: the ``cpu`` and ``cuda`` backends, fake kernels.

The C++ extension ``elogitnorm_fast._C`` declares its ops in ``csrc/ops.cpp`` (the losses) and
beside their CPU kernels (``logit_scores``, ``knn_search_update``), and implements them per
device (``csrc/cpu/``, ``csrc/cuda/``). This module adds what the dispatcher needs from Python
(schema-first ``torch.library``): ``register_fake`` kernels giving output shapes for
``torch.compile`` and meta tensors. ``csrc/ops.cpp`` names this module with
``set_python_module``.

Losses: one op per direction. The forward computes the loss and, when an input requires grad,
the gradient for an upstream gradient of one per valid row ("unit" gradient) and what the weight
gradient needs, in the same parallel pass over the rows; the backward rescales by the real
upstream gradient and runs the two weight-gradient GEMMs (docs/design.md). The autograd formulas
are registered in C++, so a training step is one dispatcher call per direction, and the backward
is itself an op with a fake kernel here, so ``torch.compile`` traces both.

* :data:`CPU` (``backend="cpu"``): every sum, the GEMMs' included
  (``csrc/cpu/fixed_order_gemm.h``), runs in one fixed order, so results are bitwise the same for
  any ``torch.set_num_threads``. Rows of logits and weights far from 1 in magnitude are computed
  divided by a power of two (exact), so squares and margins do not overflow: any finite float32
  logits, and weights up to about 1e30 in magnitude, give the float64 reference's loss and
  gradients to float32 precision. It also serves logit scores and the KNN search.
* :data:`CUDA` (``backend="cuda"``): the same loss ops on CUDA tensors: a warp per row for small
  C, a block per row otherwise, fp32 accumulation, the distance rows by a direct (no TF32) kernel
  and the weight-gradient GEMMs through cuBLAS, all on the current stream, no host syncs.

Importing this module never fails: when the extension is missing or lacks an op family's ops,
``unavailable_reason`` says why and the callers must not be used.

Example::

    loss = elogitnorm_fast.elogitnorm_loss(logits, fc.weight, target, backend="cpu")
"""

from __future__ import annotations

import torch

from ..extension import has_ops, load_error
from ..geometry import accumulation_dtype

_NAMESPACE = "elogitnorm_fast"
#: The ops each op family needs, per family name of :mod:`elogitnorm_fast.backends`.
_LOSS_OPS = ("elogitnorm_forward", "elogitnorm_backward", "logitnorm_forward",
             "logitnorm_backward")
OPS = {
    "losses": _LOSS_OPS,
    "linear_losses": _LOSS_OPS,  # the fused linear losses run the same row ops by chunks
    "logit_scores": ("logit_scores",),
    "knn": ("knn_search_update", "knn_search_kernels"),
}
#: The ops of each family that have device kernels (the rest run anywhere).
_DEVICE_OPS = {"losses": _LOSS_OPS, "linear_losses": _LOSS_OPS,
               "logit_scores": ("logit_scores",), "knn": ("knn_search_update",)}


def _kernel_reason(op: str, dispatch_key: str) -> str | None:
    error = load_error()
    if error is not None:
        return error
    missing = [name for name in OPS[op] if not has_ops(name)]
    if missing:
        return f"elogitnorm_fast._C lacks the ops {missing}; rebuild it (pip install -e .)"
    for name in _DEVICE_OPS[op]:
        qualified = f"{_NAMESPACE}::{name}"
        if not torch._C._dispatch_has_kernel_for_dispatch_key(qualified, dispatch_key):
            return f"elogitnorm_fast._C was built without {dispatch_key} kernels"
    return None


# Computed once at import (no device query), so that torch.compile traces a dict lookup.
_KERNEL_REASONS = {(op, key): _kernel_reason(op, key) for op in OPS for key in ("CPU", "CUDA")}


def kernel_reason(op: str, dispatch_key: str) -> str | None:
    """Why the compiled ops of family ``op`` cannot run for ``dispatch_key`` ("CPU", "CUDA");
    None: they can."""
    return _KERNEL_REASONS[(op, dispatch_key)]


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


class CompiledBackend:
    """One device of the compiled extension as a backend: ``NAME``, ``unavailable_reason``,
    ``elogitnorm_loss``, ``logitnorm_loss`` and ``CHECKS_TARGET_VALUES``, like a backend module."""

    def __init__(self, name: str, device_type: str, checks_target_values: bool) -> None:
        self.NAME = name
        self.device_type = device_type
        self.dispatch_key = device_type.upper()
        #: Whether the kernels raise ValueError for a target outside [0, C) (other than
        #: ignore_index), so that the public API skips its own pass over the targets.
        self.CHECKS_TARGET_VALUES = checks_target_values

    def __repr__(self) -> str:
        return f"<{self.NAME} backend (compiled extension)>"

    def unavailable_reason(self, device: torch.device | None, op: str = "losses") -> str | None:
        """Why this backend's ops of family ``op`` cannot run on ``device`` (None where they
        can; any device of this type if None)."""
        if device is not None and device.type != self.device_type:
            return (f"the {self.NAME} backend runs on {self.dispatch_key} tensors, "
                    f"got device {device}")
        reason = _KERNEL_REASONS[(op, self.dispatch_key)]
        if reason is None and self.device_type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is available"
        return reason

    @staticmethod
    def elogitnorm_loss(logits, weight, target, *, reduction, ignore_index, eps, divisor):
        """:func:`elogitnorm_loss` (the dispatcher picks the device's kernel)."""
        return elogitnorm_loss(logits, weight, target, reduction=reduction,
                               ignore_index=ignore_index, eps=eps, divisor=divisor)

    @staticmethod
    def logitnorm_loss(logits, target, *, tau, reduction, ignore_index):
        """:func:`logitnorm_loss` (the dispatcher picks the device's kernel)."""
        return logitnorm_loss(logits, target, tau=tau, reduction=reduction,
                              ignore_index=ignore_index)


#: ``backend="cpu"``: the C++ kernels (``csrc/cpu/``).
CPU = CompiledBackend("cpu", "cpu", checks_target_values=True)
#: ``backend="cuda"``: the CUDA kernels (``csrc/cuda/``).
CUDA = CompiledBackend("cuda", "cuda", checks_target_values=False)


# --------------------------------------------------------------------------------------------
# fake kernels (output shapes for torch.compile and meta tensors)
# --------------------------------------------------------------------------------------------


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


def _logit_scores_fake(logits, msp, max_logit, energy, entropy, gen, temperature, gamma, top_m):
    torch._check(logits.dim() == 2, lambda: "logits must be 2-D")
    count = int(msp) + int(max_logit) + int(energy) + int(entropy) + int(gen)
    return logits.new_empty((count, logits.shape[0]), dtype=accumulation_dtype(logits))


if has_ops(*OPS["losses"]):
    torch.library.register_fake(f"{_NAMESPACE}::elogitnorm_forward")(_elogitnorm_forward_fake)
    torch.library.register_fake(f"{_NAMESPACE}::elogitnorm_backward")(_elogitnorm_backward_fake)
    torch.library.register_fake(f"{_NAMESPACE}::logitnorm_forward")(_logitnorm_forward_fake)
    torch.library.register_fake(f"{_NAMESPACE}::logitnorm_backward")(_logitnorm_backward_fake)
if has_ops(*OPS["logit_scores"]):
    torch.library.register_fake(f"{_NAMESPACE}::logit_scores")(_logit_scores_fake)
