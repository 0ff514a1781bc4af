"""CPU benchmark of linear layer + loss, fwd+bwd: fused against unfused (issue 25).

Each cell times one training step of the head: logits from (N x D) features and a (C x D)
weight with bias, the loss, and the gradients of features, weight and bias:

* ``fused_elogitnorm_cpu`` / ``fused_elogitnorm_torch``: :func:`elogitnorm_fast.
  linear_elogitnorm_loss` with the row computation of that backend;
* ``fused_logitnorm_cpu``: :func:`elogitnorm_fast.linear_logitnorm_loss`;
* ``unfused_elogitnorm_cpu`` / ``unfused_elogitnorm_torch``: ``F.linear`` then
  :func:`elogitnorm_fast.elogitnorm_loss`;
* ``unfused_cross_entropy``: ``F.linear`` then ``F.cross_entropy`` (the floor).

Peak memory of the same variants: ``benchmarks/linear_memory.py``.

Run::

    .venv/bin/python -m pytest benchmarks/bench_linear_losses.py \\
        --benchmark-json benchmarks/results/linear_losses_cpu.json

Sizes follow ``ELOGITNORM_BENCH_SIZE`` (``benchmarks/conftest.py``): ``full`` runs
N = 1024, C = 100,000, D = 512 and N = 256, C = 1,000,000, D = 256 (the ``torch`` variants at
the first only); ``quick`` C = 20,000; ``smoke`` tiny sizes (CI, with ``--benchmark-disable``).
"""

from __future__ import annotations

import os

import pytest
import torch
from linear_variants import loss_function

import elogitnorm_fast as ef

MODE = os.environ.get("ELOGITNORM_BENCH_SIZE", "full")
#: name -> (N, C, D)
SIZES = {
    "full": {"n1024_c100k_d512": (1024, 100_000, 512), "n256_c1m_d256": (256, 1_000_000, 256)},
    "quick": {"n1024_c20k_d512": (1024, 20_000, 512)},
    "smoke": {"tiny": (16, 40, 8)},
}[MODE]
VARIANTS = ("fused_elogitnorm_cpu", "fused_elogitnorm_torch", "fused_logitnorm_cpu",
            "unfused_elogitnorm_cpu", "unfused_elogitnorm_torch", "unfused_cross_entropy")
#: Cells of a second and more: a few rounds, one warm-up.
SLOW_ROUNDS = 3


def _loss_fn(variant: str):
    if variant.endswith("_cpu") and ef.unavailable_reason("cpu", "cpu") is not None:
        pytest.skip(ef.unavailable_reason("cpu", "cpu"))
    if variant == "unfused_cross_entropy":
        return loss_function(variant, "-")
    name, _, backend = variant.rpartition("_")
    return loss_function(name, backend)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("size_name", list(SIZES))
def test_linear_loss_fwd_bwd(benchmark, size_name, variant):
    n, c, d = SIZES[size_name]
    if c >= 10**6 and variant.endswith("_torch"):
        pytest.skip("the torch rows take minutes a step at C = 10^6: single steps in "
                    "linear_memory.py")
    benchmark.group = f"linear + loss {size_name} N={n} C={c} D={d} fwd_bwd"
    benchmark.extra_info.update(size=size_name, n=n, c=c, d=d, variant=variant)
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(n, d, generator=generator).requires_grad_(True)
    weight = (torch.randn(c, d, generator=generator) / d**0.5).requires_grad_(True)
    bias = torch.zeros(c, requires_grad=True)
    target = torch.randint(0, c, (n,), generator=generator)
    loss_fn = _loss_fn(variant)

    def step():
        loss = loss_fn(features, weight, bias, target)
        torch.autograd.grad(loss, (features, weight, bias))
        return loss

    step()  # warm-up outside the timing
    if n * c * d >= 256 * 10_000 * 512:
        benchmark.pedantic(step, rounds=SLOW_ROUNDS, iterations=1, warmup_rounds=0)
    else:
        benchmark(step)
