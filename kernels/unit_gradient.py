"""The C++ autograd node that the eager ``sum`` / ``mean`` steps return their loss through.

The kernels of such a step write every gradient for an upstream gradient of one in the forward;
the node (``csrc/unit_gradients.cpp``) multiplies them by the loss's upstream gradient in its
backward: no Python and no Triton launch there. Rows where ``target == ignore_index`` get 0
whatever the upstream gradient (a NaN or inf included), as in the Python backwards and
``F.cross_entropy``.
"""

from __future__ import annotations

import functools

import torch

from ..extension import has_ops


@functools.cache
def has_unit_gradient_node() -> bool:
    """Whether the compiled extension has the node (an extension built before it does not)."""
    return has_ops("unit_gradient_node")


def unit_gradient_node(loss: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor | None,
                       logits_grad: torch.Tensor | None, weight_grad: torch.Tensor | None,
                       target: torch.Tensor, ignore_index: int, loss_name: str) -> torch.Tensor:
    """``loss`` (0-d) with the C++ backward that gives ``logits`` / ``weight`` the gradients
    ``logits_grad`` / ``weight_grad`` (for an upstream gradient of one; None: none) times the
    upstream gradient, 0 on the rows ``target`` ignores."""
    return torch.ops.elogitnorm_fast.unit_gradient_node(
        loss, logits, weight, logits_grad, weight_grad, "triton", loss_name, target, ignore_index)
