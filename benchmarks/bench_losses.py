"""CPU benchmark of LogitNorm / ELogitNorm: every CPU implementation side by side, one run.

For each size users train at (CIFAR-10 / 100, ImageNet-200, ImageNet-1k, 10^4 and 10^5 classes,
plus ImageNet-1k with D = 512, where the released formula still fits in memory) and each
implementation, times forward (grad enabled, as in
training) and forward+backward (``torch.autograd.grad`` of the loss w.r.t. logits and weight):

* ``reference``: the released all-pairs formula in eager PyTorch (``reference.py``);
* ``reference_compiled``: ``torch.compile`` of the same;
* ``torch`` / ``torch_compiled``: the memory-lean pure-PyTorch backend, eager and compiled;
* ``cpu``: the fused C++ backend through the public API (input validation included);
* ``cpu_op``: the same backend module called directly (no validation: the kernel's own cost);
* ``cross_entropy``: ``F.cross_entropy`` on pre-scaled logits, the floor for any loss kernel.

Infeasible cells are skipped with the reason (the all-pairs reference needs C x C x D floats:
8 GiB at ImageNet-1k with D = 2048 before its backward, 200 GB at C = 10^4). Slow cells run a
few rounds only. The machine, torch and commit land in the JSON (``benchmarks/conftest.py``).

Run (JSON for the README tables)::

    .venv/bin/python -m pytest benchmarks/bench_losses.py \\
        --benchmark-json benchmarks/results/losses_cpu.json

Smoke run (tiny sizes; CI): ``ELOGITNORM_BENCH_SIZE=smoke`` (or ``ELOGITNORM_BENCH_QUICK=1``)
with ``--benchmark-disable``.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.nn.functional as F

import elogitnorm_fast as ef
from elogitnorm_fast.backends import torch_backend
from elogitnorm_fast.reference import elogitnorm_reference, logitnorm_reference

SMOKE = (os.environ.get("ELOGITNORM_BENCH_SIZE") == "smoke"
         or os.environ.get("ELOGITNORM_BENCH_QUICK", "0") == "1")

#: name -> (N, C, D)
ELOGITNORM_SIZES = {
    "cifar10": (128, 10, 512),
    "cifar100": (128, 100, 512),
    "imagenet200": (256, 200, 512),
    "imagenet1k_d512": (256, 1000, 512),
    "imagenet1k": (256, 1000, 2048),
    "classes10k": (1024, 10_000, 512),
}
LOGITNORM_SIZES = {"cifar10": (128, 10), "cifar100": (128, 100), "n1024_c1000": (1024, 1000),
                   "imagenet1k": (256, 1000), "classes10k": (1024, 10_000)}
if SMOKE:
    ELOGITNORM_SIZES = {"tiny": (16, 10, 8), "tiny_wide": (8, 40, 4)}
    LOGITNORM_SIZES = {"tiny": (16, 10)}

IMPLEMENTATIONS = ("reference", "reference_compiled", "torch", "torch_compiled", "cpu", "cpu_op",
                   "cross_entropy")
#: Above this many C*C*D floats the all-pairs reference is not run eagerly (memory, minutes).
REFERENCE_MAX_PAIRS = 1000 * 1000 * 512
#: Above this, not even compiled (its backward still materialises C x C x D here).
COMPILED_REFERENCE_MAX_PAIRS = 1000 * 1000 * 2048
#: Cells slower than about a second: a few rounds, one warm-up.
SLOW_ROUNDS = 3


def _skip_unless_cpu_backend():
    reason = ef.unavailable_reason("cpu", "cpu")
    if reason is not None:
        pytest.skip(reason)


def _elogitnorm_fn(impl: str, size: tuple[int, int, int]):
    n, c, d = size
    if impl in ("cpu", "cpu_op"):
        _skip_unless_cpu_backend()
    if impl == "reference":
        if c * c * d > REFERENCE_MAX_PAIRS:
            pytest.skip(f"all-pairs reference needs {c * c * d * 4 / 2**30:.1f} GiB + backward")
        return elogitnorm_reference
    if impl == "reference_compiled":
        if c * c * d > COMPILED_REFERENCE_MAX_PAIRS:
            pytest.skip("all-pairs reference: C x C x D too large")
        return _compiled(elogitnorm_reference, size)
    if impl in ("torch", "cpu"):
        return functools.partial(ef.elogitnorm_loss, backend=impl)
    if impl == "torch_compiled":
        return _compiled(_torch_backend_elogitnorm, size)
    if impl == "cpu_op":
        module = ef.resolve_backend("cpu", torch.device("cpu"))
        return functools.partial(module.elogitnorm_loss, reduction="mean", ignore_index=-100,
                                 eps=1e-6, divisor=c)
    raise AssertionError(impl)


def _torch_backend_elogitnorm(logits, weight, target):
    return torch_backend.elogitnorm_loss(logits, weight, target, reduction="mean",
                                         ignore_index=-100, eps=1e-6, divisor=logits.shape[1])


@functools.cache
def _compiled(fn, size):
    # One compiled object per (function, size), static shapes: each cell gets its own graph.
    return torch.compile(fn, dynamic=False)


def _inputs(n, c, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, c, generator=g) * 3).requires_grad_(True)
    weight = (torch.randn(c, max(d, 1), generator=g) * 0.05).requires_grad_(True)
    target = torch.randint(0, c, (n,), generator=g)
    return logits, weight, target


#: Above this many C x C x D elements the float64 all-pairs reference is too slow to check
#: against; the float64 ``torch`` backend (itself checked against it in the test suite) is used.
CHECK_REFERENCE_MAX_PAIRS = 200 * 200 * 512


def _check_elogitnorm(loss_fn, logits, weight, target):
    """The timed implementation's loss and gradients equal float64 math before timing."""
    z = logits.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    c, d = weight.shape
    if c * c * d <= CHECK_REFERENCE_MAX_PAIRS:
        expected = elogitnorm_reference(z, w, target)
    else:
        expected = torch_backend.elogitnorm_loss(z, w, target, reduction="mean",
                                                 ignore_index=-100, eps=1e-6, divisor=c)
    loss = loss_fn()
    for got, want in zip(torch.autograd.grad(loss, (logits, weight)),
                         torch.autograd.grad(expected, (z, w)), strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-4, atol=1e-6)


def _check_logitnorm(loss_fn, logits, target):
    z = logits.detach().double().requires_grad_(True)
    expected = logitnorm_reference(z, target)
    loss = loss_fn()
    (got,) = torch.autograd.grad(loss, (logits,))
    (want,) = torch.autograd.grad(expected, (z,))
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-4, atol=1e-6)


def _run(benchmark, step, slow):
    step()  # warm-up (and compilation) outside the timing
    if slow:
        benchmark.pedantic(step, rounds=SLOW_ROUNDS, iterations=1, warmup_rounds=0)
    else:
        benchmark(step)


def _is_slow(impl, n, c, d):
    if impl == "reference":
        return c * c * d >= 100 * 100 * 512
    return n * c * d >= 256 * 1000 * 2048 or c >= 10_000


@pytest.mark.parametrize("mode", ["fwd_bwd", "fwd"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("size_name", list(ELOGITNORM_SIZES))
def test_elogitnorm(benchmark, size_name, impl, mode):
    n, c, d = ELOGITNORM_SIZES[size_name]
    benchmark.group = f"elogitnorm {size_name} N={n} C={c} D={d} {mode}"
    benchmark.extra_info.update(loss="elogitnorm", size=size_name, n=n, c=c, d=d, impl=impl,
                                mode=mode)
    logits, weight, target = _inputs(n, c, d)
    if impl == "cross_entropy":
        scaled = (logits.detach() / 2.0).requires_grad_(True)  # pre-scaled logits
        inputs = (scaled,)

        def loss_fn():
            return F.cross_entropy(scaled, target)
    else:
        fn = _elogitnorm_fn(impl, (n, c, d))
        inputs = (logits, weight)

        def loss_fn():
            return fn(logits, weight, target)

        _check_elogitnorm(loss_fn, logits, weight, target)

    def step():
        loss = loss_fn()
        if mode == "fwd_bwd":
            torch.autograd.grad(loss, inputs)
        return loss

    _run(benchmark, step, _is_slow(impl, n, c, d))


@pytest.mark.parametrize("mode", ["fwd_bwd", "fwd"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("size_name", list(LOGITNORM_SIZES))
def test_logitnorm(benchmark, size_name, impl, mode):
    n, c = LOGITNORM_SIZES[size_name]
    benchmark.group = f"logitnorm {size_name} N={n} C={c} {mode}"
    benchmark.extra_info.update(loss="logitnorm", size=size_name, n=n, c=c, impl=impl, mode=mode)
    logits, _, target = _inputs(n, c, 0)
    if impl == "cross_entropy":
        logits = (logits.detach() * 0.3).requires_grad_(True)

        def loss_fn():
            return F.cross_entropy(logits, target)
    elif impl in ("torch", "cpu"):
        if impl == "cpu":
            _skip_unless_cpu_backend()

        def loss_fn():
            return ef.logitnorm_loss(logits, target, backend=impl)
    elif impl == "cpu_op":
        _skip_unless_cpu_backend()
        module = ef.resolve_backend("cpu", torch.device("cpu"))

        def loss_fn():
            return module.logitnorm_loss(logits, target, tau=0.04, reduction="mean",
                                         ignore_index=-100)
    elif impl == "reference":
        def loss_fn():
            return logitnorm_reference(logits, target)
    elif impl == "reference_compiled":
        compiled = _compiled(logitnorm_reference, (n, c))

        def loss_fn():
            return compiled(logits, target)
    else:  # torch_compiled
        compiled = _compiled(_torch_backend_logitnorm, (n, c))

        def loss_fn():
            return compiled(logits, target)

    if impl != "cross_entropy":
        _check_logitnorm(loss_fn, logits, target)

    def step():
        loss = loss_fn()
        if mode == "fwd_bwd":
            torch.autograd.grad(loss, (logits,))
        return loss

    _run(benchmark, step, slow=False)


def _torch_backend_logitnorm(logits, target):
    return torch_backend.logitnorm_loss(logits, target, tau=0.04, reduction="mean",
                                        ignore_index=-100)
