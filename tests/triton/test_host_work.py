"""The host work of an eager step: torch ops dispatched and Triton launches, counted.

Eager steps at small sizes are host-bound, so each path's op and launch counts are budgets that
must not grow. Launches are counted by a recording ``launch`` in the configuration; ops by a
dispatch mode (ops the interpreter itself dispatches while it runs a kernel are not counted).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from kernel_paths import check_elogitnorm, check_logitnorm
from torch.utils._python_dispatch import TorchDispatchMode

from elogitnorm_fast.kernels import elogitnorm, logitnorm

from parity import make_case


class HostWork(TorchDispatchMode):
    """Counts the torch ops dispatched, and through :meth:`launch` (a configuration's
    ``launch``) the Triton launches."""

    def __init__(self):
        super().__init__()
        self.ops, self.launches, self._in_kernel = [], [], False

    def launch(self, kernel, grid, *args, **kwargs):
        self.launches.append(kernel.__name__)
        self._in_kernel = True
        try:
            kernel[grid](*args, **kwargs)
        finally:
            self._in_kernel = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._in_kernel:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

    def take(self):
        counts = (list(self.ops), list(self.launches))
        self.ops.clear()
        self.launches.clear()
        return counts


def _elogitnorm_step(n, c, d, native):
    """Ops and launches of one eager ELogitNorm forward and backward (mean, both inputs
    requiring gradients): ``(forward_ops, forward_launches, backward_ops, backward_launches)``."""
    logits, weight, target = make_case(n, c, d, dtype=torch.float32)
    work = HostWork()
    config = dataclasses.replace(elogitnorm.config_for(n, c, d, "mean"), node=native,
                                 launch=work.launch)
    with work:
        loss = elogitnorm.elogitnorm_loss(logits, weight, target, reduction="mean",
                                          ignore_index=-100, eps=1e-6, divisor=c, config=config)
        forward_ops, forward_launches = work.take()
        loss.backward()
        backward_ops, backward_launches = work.take()
    return forward_ops, forward_launches, backward_ops, backward_launches


#: Host work of the fused small-C path at the CIFAR-10 size (N=128, C=10, D=512), eager, mean.
#: Python Function: forward = 4 output allocations, the sum of the rows' shares and 1 launch;
#: backward = autograd's seed, 2 allocations (logits and weight gradients), 2 leaf-gradient
#: detaches, the pooled dW launch and the rescale of the logits gradient (one job each).
#: Through the C++ node (the default): the forward also allocates dW and launches the pooled
#: kernel for the unit upstream gradient, and the node returns the loss (7 ops, 2 launches); the
#: backward is the seed, the node's row mask of the upstream gradient for the logits (ne,
#: unsqueeze, a 0-d zero, where, an allocation and one multiply into it) and for dW (any, a 0-d
#: zero, where, one multiply), and the two detaches: 13 ops, no Python and no launch.
FUSED_HOST_WORK = {
    "python": (5, ["_elogitnorm_fused_kernel"], 5,
               ["_pooled_weight_gradient_kernel", "_scale_rows_kernel"]),
    "native": (7, ["_elogitnorm_fused_kernel", "_pooled_weight_gradient_kernel"], 13, []),
}


@pytest.mark.parametrize("path", ["python", "native"])
def test_small_c_host_work_does_not_grow(path):
    forward_ops, forward_launches, backward_ops, backward_launches = _elogitnorm_step(
        128, 10, 512, path == "native")
    most_forward, launched_forward, most_backward, launched_backward = FUSED_HOST_WORK[path]
    assert forward_launches == launched_forward
    assert len(forward_ops) <= most_forward, forward_ops
    assert backward_launches == launched_backward
    assert len(backward_ops) <= most_backward, backward_ops
    if path == "native":
        # One multiply per gradient, each over the gradient once (no where over N x C).
        assert backward_ops.count("aten.mul.Tensor") + backward_ops.count("aten.mul.out") == 2
        assert backward_ops.count("aten.where.self") == 2, backward_ops


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n,c,forward_ops_at_most", [(128, 10, 3), (40, 1000, 4)])
def test_logitnorm_reduced_in_the_kernel_host_work(n, c, forward_ops_at_most, reduction,
                                                   native):
    """Eager sum / mean. CIFAR-10 size (one program): the forward is 3 allocations (loss,
    statistics, gradient) and 1 launch. Beyond one program (N=40, C=1000, blocks of rows):
    the same and the sum of the rows' shares. The Python Function's backward is 1 launch (and
    autograd's seed and the leaf's detach); the C++ node's (the default) is its row mask and
    one multiply and no launch, and its forward allocates no statistics (which only the Python
    backward reads). The per-row path would also run the count, its reciprocal and the
    division (7-8 ops + 1 launch), and their autograd (3 + 1)."""
    logits, _, target = make_case(n, c, 1, dtype=torch.float32)
    work = HostWork()
    config = dataclasses.replace(logitnorm.config_for(n, c, reduction), node=native,
                                 launch=work.launch)
    with work:
        loss = logitnorm.logitnorm_loss(logits, target, tau=0.04, reduction=reduction,
                                        ignore_index=-100, config=config)
        forward_ops, forward_launches = work.take()
        (grad,) = torch.autograd.grad(loss, logits)
        backward_ops, backward_launches = work.take()
    assert loss.shape == () and forward_launches == ["_logitnorm_kernel"]
    assert len(forward_ops) <= forward_ops_at_most, forward_ops
    assert forward_ops.count("aten.empty.memory_format") == 1 + (not native), forward_ops
    assert backward_launches == ([] if native else ["_logitnorm_backward_kernel"])
    # The seed (ones_like) and a detach; or the seed, the mask (ne, unsqueeze, a 0-d zero,
    # where), the allocation and the multiply.
    assert len(backward_ops) <= (7 if native else 2), backward_ops
    check_logitnorm(logits, target, reduction, config=dataclasses.replace(config, launch=None))


#: Host work of the GEMM path (eager, mean), N=256, C=1000 (one distance row per sample) and
#: N=300, C=200 (one per class), D=64, through the Python Function. Forward: argmax,
#: index_select of the rows (N < C only), t + mm (raw inner products), the row norms (one
#: reduction), 3 output allocations, the sum of the rows' shares and 1 launch: 9 / 8.
#: Backward: autograd's seed, 2 allocations, the weight gradient from the forward's saved rows
#: (per sample: sum, mul, t, addmm, mm, index_add_, the coefficient rows summing to zero; per
#: class: zeros, index_add_, t, add, sum, mul, addmm), 2 detaches and 1 launch: 11 / 12.
#: Through the C++ node (the default) the weight gradient's ops move to the forward (from the
#: unit coefficients, no rescale launch): 16 / 16; the backward is the seed, the node's masked
#: multiplies (as for the fused path) and the detaches: 13, no launch.
GEMM_HOST_WORK = {"python": (9, 12, ["_scale_rows_kernel"]), "native": (16, 13, [])}


@pytest.mark.parametrize("path", ["python", "native"])
@pytest.mark.parametrize("n,c", [(256, 1000), (300, 200)])
def test_gemm_path_host_work_does_not_grow(n, c, path):
    native = path == "native"
    forward_ops, forward_launches, backward_ops, backward_launches = _elogitnorm_step(
        n, c, 64, native)
    most_forward, most_backward, launched_backward = GEMM_HOST_WORK[path]
    assert forward_launches == ["_elogitnorm_kernel"]
    assert len(forward_ops) <= most_forward, forward_ops
    # The distances are formed in the kernel: one GEMM, no host-side clamp, root or scatter
    # (the node's forward has the weight gradient's GEMMs: an addmm, and per sample an mm).
    assert forward_ops.count("aten.mm.default") == 1 + (native and n < c), forward_ops
    assert not any(name in op for op in forward_ops
                   for name in ("clamp", "sqrt", "scatter")), forward_ops
    assert forward_ops.count("aten.addmm_.default") == native, forward_ops
    # In place: an out-of-place addmm would copy its input into the result first.
    assert "aten.addmm.default" not in forward_ops + backward_ops
    assert backward_launches == launched_backward
    assert len(backward_ops) <= most_backward, backward_ops
    # The rows were kept: never gathered twice.
    assert (forward_ops + backward_ops).count("aten.index_select.default") == (n < c)


#: (C, D, fused?) around the thresholds C <= 128 and C * D <= 2^17.
THRESHOLD_CASES = [(1, 4, True), (3, 4, True), (10, 512, True), (100, 512, True),
                   (100, 300, True), (128, 1024, True), (129, 4, False), (64, 2048, True),
                   (64, 2049, False)]


@pytest.mark.parametrize("c,d,fused", THRESHOLD_CASES)
def test_fused_threshold_and_parity(c, d, fused):
    assert elogitnorm.fuses_distances(c, d) == fused
    logits, weight, target = make_case(6, c, d, dtype=torch.float32)
    target[::4] = -100
    work = HostWork()
    config = dataclasses.replace(elogitnorm.config_for(6, c, d, "mean"), launch=work.launch)
    assert (config.fused is not None) == fused
    elogitnorm.elogitnorm_loss(logits.detach(), weight.detach(), target, reduction="mean",
                               ignore_index=-100, eps=1e-6, divisor=c, config=config)
    expected = "_elogitnorm_fused_kernel" if fused else "_elogitnorm_kernel"
    assert work.launches == [expected]
    check_elogitnorm(logits, weight, target, "mean")
