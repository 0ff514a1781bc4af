"""Public loss API: functional forms and drop-in ``nn.Module`` wrappers.

Every call validates its inputs once, then dispatches to a backend
(:mod:`elogitnorm_fast.backends`): ``triton`` / ``cuda`` on GPU, ``cpu`` (the C++ extension) on
CPU, ``torch`` anywhere, ``reference`` for the all-pairs formula.

The loss has the logits' dtype, except under autocast, where it is what ``F.cross_entropy``
returns there: float32 for float16 / bfloat16 logits, computed in float32 from them.
"""

from __future__ import annotations

import torch
from torch import nn

from .backends import check_backend_name, resolve_backend
from .geometry import as_dtype
from .reference import DEFAULT_EPS, DEFAULT_TAU, divisor_value
from .validation import (
    check_compute_range,
    check_ignore_index,
    check_logits,
    check_options,
    check_target,
    check_weight,
)

_HALF = (torch.float16, torch.bfloat16)


def _autocasting(device: torch.device) -> bool:
    """Whether autocast is on for ``device``'s type (never for a type autocast does not know,
    such as ``meta``)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:
        return False


def _run(module, name: str, logits: torch.Tensor, *args, **options) -> torch.Tensor:
    """``module.<name>(logits, *args, **options)``, the loss in the dtype this module's text states.

    Under autocast the backend runs with autocast off, so that its matrix products keep the
    precision it computes in (autocast would take them to 16 bits), and a float16 / bfloat16
    loss becomes float32 as ``F.cross_entropy``'s: a backend that takes ``loss_dtype``
    (``TAKES_LOSS_DTYPE``) returns its float32 accumulation directly, the others are given
    float32 logits, which is what autocast does for ``F.cross_entropy``.
    """
    call = getattr(module, name)
    if not _autocasting(logits.device):
        return as_dtype(call(logits, *args, **options), logits.dtype)
    loss_dtype = torch.float32 if logits.dtype in _HALF else logits.dtype
    with torch.autocast(logits.device.type, enabled=False):
        if loss_dtype != logits.dtype:
            if getattr(module, "TAKES_LOSS_DTYPE", False):
                options["loss_dtype"] = loss_dtype
            else:
                logits = logits.float()
        return as_dtype(call(logits, *args, **options), loss_dtype)


def elogitnorm_loss(
    logits: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    backend: str = "auto",
    eps: float = DEFAULT_EPS,
    divisor: str = "classes",
) -> torch.Tensor:
    """ELogitNorm loss (Ding et al., CVPR 2026, https://arxiv.org/abs/2504.11434).

    Cross-entropy on ``z / s`` where, per row with predicted class ``m = argmax z`` and
    ``v = z_m``::

        s = max((1 / C) * sum_j (v - z_j) / max(||w_m - w_j||, eps), eps)   (the j = m term is 0)

    Gradients reach both ``logits`` and ``weight`` (the classifier head, C x D; pass the bias-free
    weight, the bias acts through the logits). Memory is ``O(N C + C D)`` on every backend but
    ``reference``.

    Args:
        logits: (N, C) float16 / bfloat16 / float32 / float64 logits.
        weight: (C, D) classifier weight; may be float32 while the logits are bfloat16.
        target: (N,) integer class indices; ``ignore_index`` rows contribute no loss or gradient.
        reduction: ``"mean"`` (over non-ignored rows), ``"sum"`` or ``"none"``.
        ignore_index: an integer within int64 (numpy integers too).
        backend: ``"auto"`` or one of :func:`elogitnorm_fast.available_backends`.
        eps: lower clamp for ``s`` and for the class distances (keeps degenerate rows finite):
            a normal number of the dtype the loss computes in (float32, or float64 where the
            logits or the weight are float64).
        divisor: ``"classes"`` divides by C as the released code (and its checkpoints) do;
            ``"paper"`` divides by C - 1 as the paper's text writes it.

    Raises:
        TypeError / ValueError: naming the argument and the value, before any work, for any
            input or option outside what is documented here.

    Example::

        loss = elogitnorm_loss(model(x), model.fc.weight, y)
    """
    check_logits(logits)
    check_weight(weight, logits)
    check_options(reduction, eps=eps)
    check_compute_range("eps", eps, logits, weight)
    ignore_index = check_ignore_index(ignore_index)
    divisor_number = divisor_value(logits.shape[1], divisor)
    module = resolve_backend(backend, logits.device)
    target = check_target(target, logits, ignore_index,
                          values=not getattr(module, "CHECKS_TARGET_VALUES", False))
    return _run(module, "elogitnorm_loss", logits, weight, target, reduction=reduction,
                ignore_index=ignore_index, eps=eps, divisor=divisor_number)


def logitnorm_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    tau: float = DEFAULT_TAU,
    reduction: str = "mean",
    ignore_index: int = -100,
    backend: str = "auto",
) -> torch.Tensor:
    """LogitNorm loss (Wei et al., ICML 2022, https://arxiv.org/abs/2205.09310).

    ``CE(z / (tau * (||z||_2 + 1e-7)), y)``; ``tau = 0.04`` is OpenOOD's setting.

    Args:
        logits: (N, C) float16 / bfloat16 / float32 / float64 logits.
        target: (N,) integer class indices; ``ignore_index`` rows contribute no loss or gradient.
        tau: the temperature: a normal number of the dtype the loss computes in (float32, or
            float64 for float64 logits).
        reduction: ``"mean"`` (over non-ignored rows), ``"sum"`` or ``"none"``.
        ignore_index: an integer within int64 (numpy integers too).
        backend: ``"auto"`` or one of :func:`elogitnorm_fast.available_backends`.

    Raises:
        TypeError / ValueError: naming the argument and the value, before any work.

    Example::

        loss = logitnorm_loss(model(x), y, tau=0.04)
    """
    check_logits(logits)
    check_options(reduction, tau=tau)
    check_compute_range("tau", tau, logits)
    ignore_index = check_ignore_index(ignore_index)
    module = resolve_backend(backend, logits.device)
    target = check_target(target, logits, ignore_index,
                          values=not getattr(module, "CHECKS_TARGET_VALUES", False))
    return _run(module, "logitnorm_loss", logits, target, tau=tau, reduction=reduction,
                ignore_index=ignore_index)


class ELogitNormLoss(nn.Module):
    """Module form of :func:`elogitnorm_loss`: ``criterion(logits, weight, target)``.

    The options are checked here (the backend's name too; whether it runs on the logits'
    device is decided per call), and what depends on the logits' dtype at each call.

    Example::

        criterion = ELogitNormLoss()
        loss = criterion(model(x), model.fc.weight, y)
    """

    def __init__(
        self,
        *,
        reduction: str = "mean",
        ignore_index: int = -100,
        backend: str = "auto",
        eps: float = DEFAULT_EPS,
        divisor: str = "classes",
    ) -> None:
        super().__init__()
        check_options(reduction, eps=eps)
        ignore_index = check_ignore_index(ignore_index)
        check_backend_name(backend)
        divisor_value(2, divisor)  # validates the name
        self.reduction, self.ignore_index, self.backend = reduction, ignore_index, backend
        self.eps, self.divisor = eps, divisor

    def forward(
        self, logits: torch.Tensor, weight: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        return elogitnorm_loss(
            logits, weight, target, reduction=self.reduction, ignore_index=self.ignore_index,
            backend=self.backend, eps=self.eps, divisor=self.divisor,
        )

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, backend={self.backend!r}, divisor={self.divisor!r}"


class LogitNormLoss(nn.Module):
    """Module form of :func:`logitnorm_loss`: ``criterion(logits, target)``.

    The options are checked here (the backend's name too), and what depends on the logits'
    dtype at each call.

    Example::

        criterion = LogitNormLoss(tau=0.04)
        loss = criterion(model(x), y)
    """

    def __init__(
        self,
        *,
        tau: float = DEFAULT_TAU,
        reduction: str = "mean",
        ignore_index: int = -100,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_options(reduction, tau=tau)
        ignore_index = check_ignore_index(ignore_index)
        check_backend_name(backend)
        self.tau, self.reduction, self.ignore_index, self.backend = (
            tau, reduction, ignore_index, backend
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return logitnorm_loss(
            logits, target, tau=self.tau, reduction=self.reduction,
            ignore_index=self.ignore_index, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"tau={self.tau}, reduction={self.reduction!r}, backend={self.backend!r}"
