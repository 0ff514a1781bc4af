"""Plain-PyTorch formulas for LogitNorm and ELogitNorm: the single source of truth.

Every backend, test and benchmark compares against the functions here. They are written for
clarity, not speed: :func:`elogitnorm_reference` builds the all-pairs ``C x C x D`` difference
tensor exactly like the authors' released code, so it is slow and memory-hungry at large ``C``.
Gradients come from autograd, which is what the closed-form backward of the fast backends is
checked against.

Math, for logits ``z`` (N x C), head weight ``W`` (C x D), targets ``y``:

* LogitNorm (Wei et al., ICML 2022)::

      loss = CE(z / (tau * (||z||_2 + 1e-7)), y)

* ELogitNorm (Ding et al., CVPR 2026, arXiv 2504.11434), per row::

      m = argmax_j z_j,  v = z_m
      Delta_j = max(||w_m - w_j||_2, eps) for j != m,  Delta_m = 1
      s = max((1 / divisor) * sum_j |v - z_j| / Delta_j, eps)
      loss = logsumexp(z / s) - z_y / s

  ``divisor`` is ``C`` in the released code (the default, ``"classes"``); the paper's text uses
  ``C - 1`` (``"paper"``).

The formulas are kept plain: they round in the inputs' dtype (the ``reference`` backend in fp32
overflows where the fast backends do not: ``||z||^2`` past ``|z| ~ 1e19``). In float64 on fp32
values they are the oracle the tests use: nothing overflows there, and ELogitNorm's ``z / s``
leaves an absolute error near ``1e-16 max |z / s|`` (1e-8 for equal rows of 100, where the
clamped ``s = 1e-6`` makes ``z / s = 1e8``); where ``z / s`` is larger still (small margins on
large logits), the tests shift each row by its maximum first, which the loss does not see.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Default clamp for the per-row scale ``s`` and the class distances ``Delta``.
DEFAULT_EPS = 1e-6
#: Default LogitNorm temperature (OpenOOD's setting).
DEFAULT_TAU = 0.04
#: Added to the logit norm by LogitNorm, as in the authors' code.
LOGITNORM_NORM_EPS = 1e-7

DIVISORS = ("classes", "paper")


def divisor_value(num_classes: int, divisor: str) -> int:
    """The number the summed margins are divided by: ``C`` ("classes") or ``C - 1`` ("paper").

    With ``C = 1`` the paper's form would divide by zero; it falls back to 1.
    """
    if divisor == "classes":
        return num_classes
    if divisor == "paper":
        return max(num_classes - 1, 1)
    raise ValueError(f"divisor must be one of {DIVISORS}, got {divisor!r}")


def logitnorm_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    tau: float = DEFAULT_TAU,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> torch.Tensor:
    """LogitNorm loss ``CE(z / (tau * (||z|| + 1e-7)), y)``, computed in the logits' dtype."""
    norms = torch.linalg.vector_norm(logits, dim=1, keepdim=True) + LOGITNORM_NORM_EPS
    return F.cross_entropy(
        logits / (norms * tau), target, reduction=reduction, ignore_index=ignore_index
    )


def elogitnorm_scale_reference(
    logits: torch.Tensor,
    weight: torch.Tensor,
    *,
    eps: float = DEFAULT_EPS,
    divisor: str = "classes",
) -> torch.Tensor:
    """The per-row ELogitNorm scale ``s`` (N,), all-pairs like the released code."""
    num_classes = logits.shape[1]
    values, predicted = logits.max(dim=1)
    # The released code's C x C x D broadcast, plus the identity on the diagonal.
    pairwise = torch.linalg.vector_norm(weight[:, None, :] - weight[None, :, :], dim=2)
    pairwise = pairwise + torch.eye(num_classes, dtype=pairwise.dtype, device=pairwise.device)
    distances = pairwise.clamp_min(eps)[predicted]
    margins = torch.abs(logits - values[:, None]) / distances
    scale = margins.sum(dim=1) / divisor_value(num_classes, divisor)
    return scale.clamp_min(eps)


def elogitnorm_reference(
    logits: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    eps: float = DEFAULT_EPS,
    divisor: str = "classes",
) -> torch.Tensor:
    """ELogitNorm loss ``CE(z / s(z, W), y)``; gradients reach both logits and weight."""
    scale = elogitnorm_scale_reference(logits, weight, eps=eps, divisor=divisor)
    return F.cross_entropy(
        logits / scale[:, None], target, reduction=reduction, ignore_index=ignore_index
    )
