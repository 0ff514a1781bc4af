"""The C++ autograd node of the triton backend's eager steps (``csrc/unit_gradients.cpp``), called
directly: no Triton needed, so it runs on the CPU like any other op (and on a GPU, GPU-marked).

Its backward gives each input the gradient its forward was handed times the loss's upstream
gradient, in the input's dtype: compared here with the per-tensor products, bitwise, for every
mix of logits and weight dtypes (one foreach multiply when both inputs want a gradient), for
either input alone, and through a retained graph a second time.
"""

from __future__ import annotations

import pytest
import torch

from elogitnorm_fast.extension import has_ops

pytestmark = pytest.mark.skipif(not has_ops("unit_gradient_node"),
                                reason="the compiled extension is not built")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
#: (logits dtype, weight dtype): fp32 throughout, low-precision logits with an fp32 weight
#: (autocast), and both low precision.
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
          (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)]


def _node_loss(logits, weight, logits_grad, weight_grad):
    loss = torch.randn((), device=logits.device)
    return torch.ops.elogitnorm_fast.unit_gradient_node(
        loss, logits, weight, logits_grad, weight_grad, "triton", "ELogitNorm")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("logits_dtype,weight_dtype", DTYPES)
@pytest.mark.parametrize("wanted", ["both", "logits", "weight"])
def test_node_gives_the_forward_gradients_times_the_upstream(device, logits_dtype,
                                                              weight_dtype, wanted):
    logits = torch.randn(7, 5, device=device, dtype=logits_dtype)
    weight = torch.randn(5, 3, device=device, dtype=weight_dtype)
    logits.requires_grad_(wanted != "weight")
    weight.requires_grad_(wanted != "logits")
    # What the kernels hand the node: the logits gradient in the logits' dtype, dW in fp32.
    logits_grad = torch.randn(7, 5, device=device).to(logits_dtype)
    weight_grad = torch.randn(5, 3, device=device)
    loss = _node_loss(logits, weight, logits_grad, weight_grad)
    inputs = [t for t in (logits, weight) if t.requires_grad]
    for upstream in (2.5, -0.3):
        g = torch.tensor(upstream, device=device)
        grads = torch.autograd.grad(loss * g, inputs, retain_graph=True)
        expected = {"logits": logits_grad * g, "weight": (weight_grad * g).to(weight_dtype)}
        names = [name for name, t in (("logits", logits), ("weight", weight)) if t.requires_grad]
        for name, grad in zip(names, grads, strict=True):
            assert grad.dtype == (logits_dtype if name == "logits" else weight_dtype), name
            assert torch.equal(grad, expected[name]), name


@pytest.mark.parametrize("device", DEVICES)
def test_node_without_a_weight_gradient_gives_the_weight_none(device):
    """LogitNorm hands no weight (and ELogitNorm none where W needs no gradient)."""
    logits = torch.randn(4, 6, device=device, requires_grad=True)
    logits_grad = torch.randn(4, 6, device=device)
    loss = _node_loss(logits, None, logits_grad, None)
    (grad,) = torch.autograd.grad(loss * 3.0, logits)
    assert torch.equal(grad, logits_grad * 3.0)
