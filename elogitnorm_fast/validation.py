"""Input checks shared by the public loss functions. Errors name the argument and the value."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from .reduction import REDUCTIONS

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
#: The normal numbers of each compute dtype, as (least, greatest). Subnormal values lose
#: precision and GPU math may flush them to zero, so an ``eps`` / ``tau`` among them would not
#: hold the bound it promises; zero (float32(1e-50)) turned all-equal rows into 0 / 0.
_NORMAL_RANGE = {dtype: (torch.finfo(dtype).tiny, torch.finfo(dtype).max)
                 for dtype in (torch.float32, torch.float64)}


def check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(
            f"logits must be 2-D (batch, classes), got shape {tuple(logits.shape)}"
        )
    if logits.dtype not in _FLOATS:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError(f"logits must have at least one class, got shape {tuple(logits.shape)}")


def check_weight(weight: torch.Tensor, logits: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (classes, features), got shape {tuple(weight.shape)}")
    if weight.shape[0] != logits.shape[1]:
        raise ValueError(
            f"weight must have one row per class: logits have C={logits.shape[1]} classes, "
            f"weight has {weight.shape[0]} rows (shape {tuple(weight.shape)})"
        )
    if weight.dtype not in _FLOATS:
        raise TypeError(f"weight must be a floating tensor, got {weight.dtype}")
    if weight.device != logits.device:
        raise ValueError(f"weight is on {weight.device} but logits are on {logits.device}")


def check_target(
    target: torch.Tensor, logits: torch.Tensor, ignore_index: int, *, values: bool = True
) -> torch.Tensor:
    """Type, shape and device of ``target``; with ``values``, also its range (CPU only).
    Returns it as int64 (any integer dtype is accepted; the backends index with int64).

    Backends whose kernels check the range themselves (``CHECKS_TARGET_VALUES``) skip the
    value pass: it costs a reduction over the targets per call.
    """
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"target must hold class indices (an integer dtype), got {target.dtype}")
    if target.shape != logits.shape[:1]:
        raise ValueError(
            f"target must have shape (N,) = {tuple(logits.shape[:1])} to match logits "
            f"{tuple(logits.shape)}, got {tuple(target.shape)}"
        )
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    if target.dtype != torch.int64:
        target = target.long()
    if target.numel() == 0:
        return target
    if not values or target.device.type != "cpu" or torch.compiler.is_compiling():
        # Checking values on an accelerator would be a host sync, and inside torch.compile a
        # graph break: there the kernels' own bounds checks apply, as in F.cross_entropy.
        return target
    num_classes = logits.shape[1]
    # Fast path (one reduction): every target is a class index.
    low, high = torch.aminmax(target)
    if int(low) >= 0 and int(high) < num_classes:
        return target
    in_range = ((target >= 0) & (target < num_classes)) | (target == ignore_index)
    if not bool(in_range.all()):
        bad = target[~in_range][:5].tolist()
        raise ValueError(
            f"target values must be in [0, {num_classes}) or equal ignore_index={ignore_index}; "
            f"got {bad}"
        )
    return target


def check_options(reduction: str, **positive: object) -> None:
    """``reduction`` one of :data:`~elogitnorm_fast.reduction.REDUCTIONS`; each keyword
    (``eps=...``, ``tau=...``) a finite number > 0 (:func:`check_positive`). What depends on
    the logits' dtype is :func:`check_compute_range`'s."""
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    for name, value in positive.items():
        check_positive(name, value)


def check_positive(name: str, value: object) -> None:
    """``value`` is a real number (a bool is not), finite and > 0; errors name ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number > 0, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def is_count(value: object) -> bool:
    """A Python or numpy integer >= 1 (a bool or an integral float is not an integer here)."""
    return not isinstance(value, bool) and isinstance(value, int | np.integer) and value >= 1


def check_count(name: str, value: object, *, optional: bool = False) -> int | None:
    """``value`` as an int when :func:`is_count` (or None with ``optional``); ``ValueError``
    naming ``name`` otherwise."""
    if optional and value is None:
        return None
    if not is_count(value):
        tail = " or None" if optional else ""
        raise ValueError(f"{name} must be an integer >= 1{tail}, got {value!r}")
    return int(value)


def compute_dtype(logits: torch.Tensor, weight: torch.Tensor | None = None) -> torch.dtype:
    """The dtype a loss computes in: float64 where the logits or the weight are float64, else
    float32 (float16 / bfloat16 inputs accumulate in float32)."""
    if logits.dtype == torch.float64 or (weight is not None and weight.dtype == torch.float64):
        return torch.float64
    return torch.float32


def check_compute_range(
    name: str, value: float, logits: torch.Tensor, weight: torch.Tensor | None = None
) -> None:
    """``value`` (already :func:`check_positive`) is a normal number of the dtype the loss
    computes in (:func:`compute_dtype`): neither 0 nor inf once converted to it."""
    dtype = compute_dtype(logits, weight)
    low, high = _NORMAL_RANGE[dtype]
    if not low <= value <= high:
        inputs = f"{_name(logits.dtype)} logits" + (
            "" if weight is None else f" and a {_name(weight.dtype)} weight")
        raise ValueError(
            f"{name} must lie in [{low!r}, {high!r}], the normal {_name(dtype)} numbers (the "
            f"loss computes in {_name(dtype)} for {inputs}), got {value!r}"
        )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_ignore_index(ignore_index: object) -> int:
    """``ignore_index`` as an int: an integer (a bool is not; numpy integers are) within int64,
    the dtype the targets are compared in."""
    if type(ignore_index) is int and _INT64_MIN <= ignore_index <= _INT64_MAX:
        return ignore_index
    message = f"ignore_index must be an integer in [-2**63, 2**63) (int64), got {ignore_index!r}"
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(message)
    value = int(ignore_index)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(message)
    return value


def check_first_derivative(backend: str, loss: str) -> None:
    """Raises inside a closed-form backward run with ``create_graph=True`` (grad mode on): its
    result would carry no second derivative, and a gradient penalty or meta-learning step built
    on it would be silently wrong."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"backend={backend!r} computes first derivatives of {loss} only, so backward with "
            f"create_graph=True cannot go through it; use backend='reference' for higher "
            f"derivatives"
        )
