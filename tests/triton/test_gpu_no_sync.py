"""No host synchronisation in an eager loss step on a CUDA device.

A training step that synchronises with the device (``.item()``, a data-dependent shape, a copy
to the host) stalls the host until the GPU drains, and the host can no longer run ahead of the
model. Each case runs one step to compile and cache its kernels, then forward and backward
again under ``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising call
torch makes (autograd's device thread included): every path of the ``triton`` backend
(ELogitNorm fused / GEMM per sample / GEMM per class, LogitNorm one-program / blocks /
streamed / per-row, the C++ node and the Python backward) and the ``cuda`` backend.

GPU-marked: skipped without a CUDA device (nothing queries the device at import).
"""

from __future__ import annotations

import pytest
import torch

import elogitnorm_fast as ef

from parity import make_case

pytestmark = pytest.mark.gpu

#: (loss, N, C, D, reduction): each a different path of the triton backend (see the module
#: docstring), in the order listed there.
CASES = [
    ("elogitnorm", 128, 10, 64, "mean"),
    ("elogitnorm", 256, 1000, 64, "mean"),
    ("elogitnorm", 300, 200, 8, "sum"),
    ("elogitnorm", 64, 257, 16, "none"),
    ("logitnorm", 128, 10, 0, "mean"),
    ("logitnorm", 4096, 1000, 0, "mean"),
    ("logitnorm", 5, 40000, 0, "sum"),
    ("logitnorm", 64, 257, 0, "none"),
]


def _step(backend, loss, n, c, d, reduction, native=True):
    """A forward and backward of ``backend``; ``native`` False: the triton backend's eager
    sum / mean through the Python Functions (a configuration without the C++ node)."""
    logits, weight, target = make_case(n, c, max(d, 1), "some_ignored", dtype=torch.float32,
                                       device="cuda")
    leaves = (logits, weight) if loss == "elogitnorm" else (logits,)
    path = {}
    if not native:
        import dataclasses

        from elogitnorm_fast.kernels import elogitnorm, logitnorm

        config = (elogitnorm.config_for(n, c, max(d, 1), reduction) if loss == "elogitnorm"
                  else logitnorm.config_for(n, c, reduction))
        path = {"config": dataclasses.replace(config, node=False)}

    def step():
        if loss == "elogitnorm" and path:
            from elogitnorm_fast.kernels import elogitnorm

            value = elogitnorm.elogitnorm_loss(logits, weight, target, reduction=reduction,
                                               ignore_index=-100, eps=1e-6, divisor=c, **path)
        elif loss == "elogitnorm":
            value = ef.elogitnorm_loss(logits, weight, target, reduction=reduction,
                                       backend=backend)
        elif path:
            from elogitnorm_fast.kernels import logitnorm

            value = logitnorm.logitnorm_loss(logits, target, tau=0.04, reduction=reduction,
                                             ignore_index=-100, **path)
        else:
            value = ef.logitnorm_loss(logits, target, reduction=reduction, backend=backend)
        return torch.autograd.grad(value.sum(), leaves)

    return step


def _check_no_sync(step):
    step()  # compiles and caches outside the check
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        grads = step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert all(torch.isfinite(grad).all() for grad in grads)


#: Every case with the C++ node where the case takes it (the default) and without it (the
#: Python backward), except ``none``, which never takes the node.
TRITON_PATHS = [pytest.param(*case, native, id=f"{'-'.join(map(str, case))}-native_{native}")
                for case in CASES for native in ((True, False) if case[4] != "none" else (True,))]


@pytest.mark.parametrize("loss,n,c,d,reduction,native", TRITON_PATHS)
def test_triton_step_never_synchronises(loss, n, c, d, reduction, native):
    pytest.importorskip("triton")
    reason = ef.unavailable_reason("triton", "cuda")
    if reason is not None:
        pytest.skip(reason)
    _check_no_sync(_step("triton", loss, n, c, d, reduction, native))


@pytest.mark.parametrize("loss,n,c,d,reduction", [CASES[1], CASES[3], CASES[5]])
def test_cuda_step_never_synchronises(loss, n, c, d, reduction):
    reason = ef.unavailable_reason("cuda", "cuda")
    if reason is not None:
        pytest.skip(reason)
    _check_no_sync(_step("cuda", loss, n, c, d, reduction))
