"""The ``cuda`` backend: the same tests as ``test_cpu_backend.py`` on a CUDA device.

Every test of the CPU module is imported here and runs with the ``backend_device`` fixture below;
all are GPU-marked (skipped without a CUDA device; conftest decides at collection time). The
thread-count test skips itself on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from test_cpu_backend import *  # noqa: F403  (the shared test bodies)

import elogitnorm_fast as ef
from elogitnorm_fast.reference import elogitnorm_reference, logitnorm_reference

pytestmark = pytest.mark.gpu


@pytest.fixture
def backend_device():
    """(backend name, device) under test: the CUDA kernels."""
    reason = ef.unavailable_reason("cuda", "cuda")
    if reason is not None:
        pytest.skip(reason)
    return "cuda", "cuda"


@pytest.mark.parametrize("classes", [3000, 70_000])
def test_block_per_row_kernels_at_large_class_counts(backend_device, classes):
    """C above the warp-per-row limit (2048) and far above one block's width."""
    logits = (torch.randn(5, classes, device="cuda") * 3).requires_grad_(True)
    weight = torch.randn(classes, 4, device="cuda", requires_grad=True)
    target = torch.randint(0, classes, (5,), device="cuda")
    loss = ef.elogitnorm_loss(logits, weight, target, backend="cuda")
    grads = torch.autograd.grad(loss, (logits, weight))
    ref_z = logits.detach().double().requires_grad_(True)
    ref_w = weight.detach().double().requires_grad_(True)
    # The all-pairs reference would need C x C x D memory: compare with the torch backend in
    # float64 instead (itself tested against the reference at smaller C).
    expected = ef.elogitnorm_loss(ref_z, ref_w, target, backend="torch")
    ref_grads = torch.autograd.grad(expected, (ref_z, ref_w))
    torch.testing.assert_close(loss.double(), expected, rtol=2e-4, atol=2e-6)
    for actual, reference in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(actual.double(), reference, rtol=2e-4, atol=2e-6)
    lognorm = ef.logitnorm_loss(logits, target, backend="cuda")
    ref_lognorm = logitnorm_reference(ref_z, target)
    torch.testing.assert_close(lognorm.double(), ref_lognorm, rtol=2e-4, atol=2e-6)
    torch.testing.assert_close(
        torch.autograd.grad(lognorm, logits)[0].double(),
        torch.autograd.grad(ref_lognorm, ref_z)[0], rtol=2e-4, atol=2e-6,
    )


def test_cuda_matches_cpu_backend_in_float32(backend_device):
    logits = torch.randn(300, 129, dtype=torch.float32) * 2
    weight = torch.randn(129, 64, dtype=torch.float32)
    target = torch.randint(0, 129, (300,))
    target[::5] = -100
    results = []
    for backend, device in (("cpu", "cpu"), ("cuda", "cuda")):
        z = logits.to(device).requires_grad_(True)
        w = weight.to(device).requires_grad_(True)
        loss = ef.elogitnorm_loss(z, w, target.to(device), reduction="none", backend=backend)
        grads = torch.autograd.grad(loss.sum(), (z, w))
        results.append([t.cpu() for t in (loss, *grads)])
    for cpu_value, cuda_value in zip(*results, strict=True):
        torch.testing.assert_close(cuda_value, cpu_value, rtol=2e-4, atol=2e-6)
    reference = elogitnorm_reference(logits.double(), weight.double(), target, reduction="none")
    torch.testing.assert_close(results[1][0].double(), reference, rtol=2e-4, atol=2e-6)
