"""The compiled ``cpu`` backend gives bitwise the same losses and gradients for any thread count.

Each thread count runs in its own process (``torch.set_num_threads`` before any work, as a user
would set it), on shapes that take every path of the kernels: the distance rows by one GEMM and
the weight gradient by two (N = 7, C = 5000, D = 64, where a BLAS sgemm changes its summation
with the thread count), the weight gradient by the one C x C GEMM (C <= 2U), the direct paths,
float64, and LogitNorm. The results are compared bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import elogitnorm_fast as ef

pytestmark = pytest.mark.skipif(
    ef.unavailable_reason("cpu", "cpu") is not None, reason="the cpu backend is not built"
)

# (N, C, D, dtype): two-GEMM weight gradient; one C x C GEMM; direct paths; float64 GEMM path.
CASES = [(7, 5000, 64, "float32"), (128, 100, 512, "float32"), (33, 40, 24, "float32"),
         (9, 700, 80, "float64")]

CHILD = r"""
import sys
import torch
torch.set_num_threads(int(sys.argv[1]))
import elogitnorm_fast as ef

results = []
for n, c, d, dtype in {cases}:
    generator = torch.Generator().manual_seed(n * c + d)
    dtype = getattr(torch, dtype)
    logits = (3 * torch.randn(n, c, generator=generator)).to(dtype).requires_grad_(True)
    weight = torch.randn(c, d, generator=generator).to(dtype).requires_grad_(True)
    target = torch.randint(0, c, (n,), generator=generator)
    target[::5] = -100
    for reduction in ("mean", "none"):
        loss = ef.elogitnorm_loss(logits, weight, target, reduction=reduction, backend="cpu")
        grads = torch.autograd.grad(loss.sum(), (logits, weight))
        results += [loss.detach(), *grads]
    loss = ef.logitnorm_loss(logits, target, backend="cpu")
    results += [loss.detach(), *torch.autograd.grad(loss, logits)]
assert torch.get_num_threads() == int(sys.argv[1])
torch.save(results, sys.argv[2])
"""


def _run(threads: int, path: str) -> list[torch.Tensor]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the same package as here
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", CHILD.format(cases=CASES), str(threads), path],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return torch.load(path)


def test_cpu_backend_is_bitwise_the_same_for_one_and_two_threads(tmp_path):
    one = _run(1, str(tmp_path / "one.pt"))
    two = _run(2, str(tmp_path / "two.pt"))
    assert len(one) == len(two) == len(CASES) * 8
    for index, (a, b) in enumerate(zip(one, two, strict=True)):
        assert torch.equal(a, b), (
            f"result {index} (case {CASES[index // 8]}) differs by "
            f"{(a.double() - b.double()).abs().max().item():.3e}"
        )
