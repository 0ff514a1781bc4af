"""What torch.compile believes each traced Triton launch writes, checked without a GPU.

Inside a ``triton_op``, ``wrap_triton`` launches are functionalized: torch reads the kernel's
TTIR, follows every store address back to the kernel's pointer arguments, copies each argument it
finds, runs the kernel on the copies and writes them back. Two ways that goes wrong, both seen on
an H100 (torch 2.11, triton 3.6) before this test existed:

- an address that comes out of a helper call counts every pointer that helper takes as written
  (the targets, the upstream gradient, the logits), so a compiled step copies inputs it never
  writes, and Inductor failed to schedule the backward;
- one tensor passed for two arguments, both believed written, comes back as whichever copy is
  written back last: ``opcheck`` found the LogitNorm row statistics replaced by garbage.

So for every launch the ops make when traced: the arguments believed written are exactly the
launch's outputs, and no tensor the caller can see is passed for two arguments.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                       reason="triton is not installed"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="kernels defined under the interpreter have no TTIR"),
]

N, C, D = 16, 100, 8


class _Sm90Driver:
    """What torch's TTIR generation asks of triton's active driver, without a GPU."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


@pytest.fixture
def launches(monkeypatch):
    """A recording ``launch`` for the launchers: records ``(kernel, keyword arguments)`` per
    traced launch (the arguments ``wrap_triton`` would see)."""
    import triton

    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("this triton build has no NVIDIA backend")
    monkeypatch.setattr(triton.runtime.driver, "_active", _Sm90Driver())
    recorded = []

    def launch(kernel, grid, *args, **kwargs):
        named = dict(zip(kernel.arg_names, args, strict=False))
        named.update({k: v for k, v in kwargs.items() if k in kernel.arg_names})
        recorded.append((kernel, named))

    launch.recorded = recorded
    return launch


def _written(kernel, named: dict) -> set[str]:
    from torch._higher_order_ops import triton_kernel_wrap

    if hasattr(triton_kernel_wrap, "identify_accessed_tensors"):  # torch >= 2.10
        accesses = triton_kernel_wrap.identify_accessed_tensors(kernel, dict(named), {})
        return {dep.name for dep in accesses.read_writes.writes}
    return set(triton_kernel_wrap.identify_mutated_tensors(kernel, dict(named), {}))


def _cases(launch=None):
    from elogitnorm_fast.geometry import predicted_rows
    from elogitnorm_fast.kernels import class_gradient, elogitnorm, logitnorm, rows

    torch.manual_seed(0)
    z = torch.randn(N, C)
    w = torch.randn(C, D)
    y = torch.randint(0, C, (N,))
    up = torch.rand(1).expand(N)  # stride 0, as after loss.sum()
    stats = torch.rand(4 * N + 1)
    predicted = z.argmax(1)
    w_rows, per_sample = predicted_rows(w, predicted)
    inner = w_rows @ w.t()
    norms = torch.linalg.vector_norm(w, dim=1)
    options = {"eps": 1e-6, "divisor": C, "ignore_index": -100, "write_grad": True,
               "write_coefficients": True}
    traced = {"traced": True, "launch": launch}  # the ops' launches, recorded
    return {
        # name: (call, its inputs, the kernel arguments it writes)
        "logitnorm forward": (
            lambda: logitnorm.logitnorm_rows(z, y, inv_tau=25.0, ignore_index=-100, **traced),
            (z, y), {"loss_ptr", "stats_ptr"}),
        "logitnorm backward": (
            lambda: logitnorm.logitnorm_backward_rows(z, y, stats, up, ignore_index=-100,
                                                      **traced),
            (z, y, stats, up), {"grad_ptr"}),
        "elogitnorm small C": (
            lambda: elogitnorm.elogitnorm_rows_fused(z, y, w, **options, **traced),
            (z, y, w), {"loss_ptr", "grad_ptr", "coefficient_ptr", "predicted_ptr"}),
        "elogitnorm GEMM distances": (
            lambda: elogitnorm.elogitnorm_rows(z, y, predicted, inner, w, norms,
                                               per_sample=per_sample, **options, **traced),
            (z, y, predicted, inner, w, norms), {"loss_ptr", "grad_ptr", "coefficient_ptr"}),
        "scale rows, two": (
            lambda: rows.scale_rows(z, z * 2, up, y, ignore_index=-100, **traced),
            (z, y, up), {"first_out_ptr", "second_out_ptr"}),
        "scale rows, one": (
            lambda: rows.scale_rows(z, torch.empty(0, C), up, y, ignore_index=-100, **traced),
            (z, y, up), {"first_out_ptr"}),
        "pooled weight gradient": (
            lambda: class_gradient.pooled_weight_gradient(w, z, predicted, up, y,
                                                          ignore_index=-100, **traced),
            (w, z, predicted, up, y), {"grad_weight_ptr"}),
        "pooled weight gradient, unit upstream": (
            lambda: class_gradient.pooled_weight_gradient(w, z, predicted, None, y,
                                                          ignore_index=-100, **traced),
            (w, z, predicted, y), {"grad_weight_ptr"}),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_traced_launch_writes_only_its_outputs(launches, case):
    call, inputs, outputs = _cases(launches)[case]
    returned = call()
    assert len(launches.recorded) == 1, case
    kernel, named = launches.recorded[0]
    assert _written(kernel, named) == outputs, case
    visible = {id(t) for t in inputs}
    visible |= {id(t) for t in (returned if isinstance(returned, tuple) else (returned,))
                if isinstance(t, torch.Tensor)}
    by_storage: dict[int, list[str]] = {}
    for name, value in named.items():
        if isinstance(value, torch.Tensor) and value.numel() > 0:
            by_storage.setdefault(value.data_ptr(), []).append(name)
    for names in by_storage.values():
        if len(names) > 1:  # allowed only for a stand-in nothing reads
            assert all(id(named[n]) not in visible for n in names), (case, names)
