"""The ``triton`` backend under autocast, on CPU tensors through the Triton interpreter: the
float32 loss ``F.cross_entropy`` returns there, from float16 logits (the interpreter has no
bfloat16 arithmetic), on the fused and GEMM paths (the behaviour and its CPU half:
``tests/losses/test_loss_autocast.py``)."""

from __future__ import annotations

import pytest
import torch
from test_loss_autocast import REDUCTIONS, _call, check_autocast

import elogitnorm_fast as ef

#: (loss, reduction, C, logits dtype: None for autocast's float16). C = 6 takes the fused
#: distances, C = 130 the GEMM distances and weight gradient (which autocast would run in
#: 16 bits whatever the logits' dtype); ``none`` runs its backward inside the region.
TRITON_CASES = [("elogitnorm", reduction, c, dtype) for reduction in REDUCTIONS
                for c, dtype in ((6, None), (130, None), (130, torch.float32))] + [
               ("logitnorm", reduction, 6, None) for reduction in REDUCTIONS] + [
               ("logitnorm", "mean", 6, torch.float32)]


@pytest.mark.parametrize("kind, reduction, c, logits_dtype", TRITON_CASES)
def test_triton_float16_autocast_gives_a_float32_loss(kind, reduction, c, logits_dtype):
    check_autocast(_call("triton", kind), kind, shape=(5, c, 8), reduction=reduction,
                   amp=torch.float16, logits_dtype=logits_dtype,
                   backward_inside=reduction == "none")


def test_triton_outside_autocast_the_loss_keeps_the_logits_dtype():
    logits = torch.randn(4, 3).half()
    weight, target = torch.randn(3, 2), torch.tensor([0, 1, 2, 0])
    assert ef.elogitnorm_loss(logits, weight, target, backend="triton").dtype == torch.half
    assert ef.logitnorm_loss(logits, target, backend="triton").dtype == torch.half
