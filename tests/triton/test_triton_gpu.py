"""The ``triton`` backend on a CUDA device: parity (fp32, bf16), streaming rows, int64 offsets,
``torch.compile(fullgraph=True)`` and CUDA-graph capture of a training step, ``opcheck``.

Every test is GPU-marked (skipped without a CUDA device; nothing queries the device at import).
"""

from __future__ import annotations

import pytest
import torch

import elogitnorm_fast as ef
from elogitnorm_fast.reference import logitnorm_reference

from parity import (
    KINDS,
    REDUCTIONS,
    check_bf16_error,
    check_elogitnorm,
    check_logitnorm,
    make_case,
)

pytestmark = pytest.mark.gpu
RTOL, ATOL = 2e-4, 2e-6


@pytest.fixture(autouse=True)
def _needs_triton():
    pytest.importorskip("triton")
    reason = ef.unavailable_reason("triton", "cuda")
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n,c,d", [(1, 1, 3), (5, 3, 4), (128, 10, 64), (128, 100, 512),
                                   (64, 257, 16), (256, 1000, 32), (300, 200, 8)])
def test_fp32_matches_reference(n, c, d, reduction):
    logits, weight, target = make_case(n, c, d, dtype=torch.float32, device="cuda")
    target[::5] = -100
    check_elogitnorm("triton", logits, weight, target, reduction, rtol=RTOL, atol=ATOL)
    check_logitnorm("triton", logits, target, reduction, rtol=RTOL, atol=ATOL)


class _CountedHits(dict):
    """The direct launch's table of compiled kernels, counting the lookups that found one."""

    hits = 0

    def get(self, key, default=None):
        entry = super().get(key, default)
        self.hits += entry is not None
        return entry


def _direct_launch():
    """benchmarks/direct_launch.py (the benchmarks import their helpers by plain name)."""
    import importlib
    import sys
    from pathlib import Path

    folder = str(Path(__file__).resolve().parents[2] / "benchmarks")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module("direct_launch")
    finally:
        sys.path.remove(folder)


@pytest.mark.parametrize("n,c,d", [(128, 10, 64), (128, 100, 512), (256, 1000, 64)])
def test_direct_launch_matches_reference(n, c, d, monkeypatch):
    """With the benchmark's direct launch as the configuration's ``launch``, each eager
    kernel's first launch goes through the JIT and the later ones straight to its launcher
    (addresses as integers, no hooks): every reduction twice, fused / pooled and GEMM paths; at
    C = 10 also logits at an address 4 bytes past a multiple of 16 (a specialization of their
    own; one size only, each new specialization compiles)."""
    from kernel_paths import check_elogitnorm as check_elogitnorm_path
    from kernel_paths import check_logitnorm as check_logitnorm_path
    from kernel_paths import elogitnorm_config, logitnorm_config

    direct_launch = _direct_launch()
    table = _CountedHits()
    monkeypatch.setattr(direct_launch, "_COMPILED", table)  # a benchmark module's table
    logits, weight, target = make_case(n, c, d, dtype=torch.float32, device="cuda")
    target[::5] = -100
    shifted = torch.empty(n * c + 1, device="cuda")[1:].view(n, c)
    shifted.copy_(logits.detach())
    shifted.requires_grad_(True)
    for z in (logits, shifted, logits, shifted) if c == 10 else (logits, logits):
        for reduction in REDUCTIONS:
            check_elogitnorm_path(z, weight, target, reduction, rtol=RTOL, atol=ATOL,
                                  config=elogitnorm_config(z, weight, reduction,
                                                           launch=direct_launch.launch))
            check_logitnorm_path(z, target, reduction, rtol=RTOL, atol=ATOL,
                                 config=logitnorm_config(z, reduction,
                                                         launch=direct_launch.launch))
    assert table and table.hits >= len(table)


@pytest.mark.parametrize("kind", KINDS)
def test_special_rows_match_reference(kind):
    logits, weight, target = make_case(33, 12, 5, kind, dtype=torch.float32, device="cuda")
    for reduction in REDUCTIONS:
        check_elogitnorm("triton", logits, weight, target, reduction, rtol=RTOL, atol=ATOL)
        check_logitnorm("triton", logits, target, reduction, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("n,c", [(4, 40000), (3, 1 << 20)])
def test_streamed_rows_match_float64(n, c):
    """Rows longer than one block (up to 2^20 classes) against the float64 closed form; the
    LogitNorm mean also through the block-wise in-kernel reduction."""
    logits, weight, target = make_case(n, c, 4, dtype=torch.float32, device="cuda")
    check_logitnorm("triton", logits, target, "none", rtol=RTOL, atol=ATOL)
    check_logitnorm("triton", logits, target, "mean", rtol=RTOL, atol=ATOL)
    loss = ef.elogitnorm_loss(logits, weight, target, reduction="none", backend="triton")
    ref_z = logits.detach().double().requires_grad_(True)
    ref_w = weight.detach().double().requires_grad_(True)
    # The reference's C x C x D tensor is infeasible here; the float64 torch backend (checked
    # against the reference in test_torch_backend.py) is the oracle.
    expected = ef.elogitnorm_loss(ref_z, ref_w, target, reduction="none", backend="torch")
    grads = torch.autograd.grad(loss.sum(), (logits, weight))
    ref_grads = torch.autograd.grad(expected.sum(), (ref_z, ref_w))
    torch.testing.assert_close(loss.double(), expected, rtol=RTOL, atol=ATOL)
    for actual, reference in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(actual.double(), reference, rtol=1e-3, atol=1e-6)


def test_int64_offsets_beyond_2_pow_31_elements():
    n, c = 3, (1 << 31) // 3 + 1024  # N * C > 2^31 elements, in bf16 (4 GiB)
    logits = torch.randn(n, c, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    target = torch.tensor([5, c - 1, c // 2], device="cuda")
    loss = ef.logitnorm_loss(logits, target, reduction="none", backend="triton")
    expected = logitnorm_reference(logits.detach().float(), target, reduction="none")
    torch.testing.assert_close(loss.float(), expected, rtol=2e-2, atol=2e-2)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    # the last row starts past 2^31 elements: its gradient against the float64 reference
    row = logits.detach()[2:].double().requires_grad_(True)
    (expected_grad,) = torch.autograd.grad(
        logitnorm_reference(row, target[2:], reduction="sum"), row)
    scale = expected_grad.abs().max().item()
    torch.testing.assert_close(grad[2:].double(), expected_grad, rtol=2e-2, atol=1e-2 * scale)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("c", [10, 32768])
def test_logitnorm_backward_completes_the_forward_gradient(c, reduction):
    """On the device too, the upstream gradient autograd delivers equals the expected one (the
    mean's 1 / count: the same IEEE division), so the backward skips every tile: logits
    scrambled between forward and backward leave the gradient bitwise unchanged."""
    logits, _, target = make_case(64, c, 1, "some_ignored", dtype=torch.float32, device="cuda")

    def gradient(scramble):
        z = logits.detach().clone().requires_grad_(True)
        loss = ef.logitnorm_loss(z, target, reduction=reduction, backend="triton")
        if scramble:
            z.data.copy_(torch.randn_like(z) * 50)
        return torch.autograd.grad(loss.sum() if reduction == "none" else loss, z)[0]

    plain = gradient(False)
    assert torch.equal(gradient(True), plain)
    check_logitnorm("triton", logits, target, reduction, rtol=RTOL, atol=ATOL)


def _gradients(native, logits, weight, target, scale):
    from kernel_paths import elogitnorm, elogitnorm_config, logitnorm, logitnorm_config

    z = logits.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    loss = (elogitnorm(z, w, target, config=elogitnorm_config(z, w, node=native)).to(z.dtype)
            + logitnorm(z, target, config=logitnorm_config(z, node=native)).to(z.dtype))
    assert _graph_has(loss.grad_fn, "UnitGradientNode", depth=3) == native
    return torch.autograd.grad(loss * scale, (z, w))


def _graph_has(node, name, depth):
    """Whether an autograd node named ``name`` is within ``depth`` steps of ``node``."""
    if node is None or depth < 0:
        return False
    return name in node.name() or any(_graph_has(child, name, depth - 1)
                                      for child, _ in node.next_functions)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,c,d", [(128, 10, 64), (256, 1000, 64)])
def test_cpp_node_and_python_backward_agree(n, c, d, dtype):
    """Eager mean through the C++ node (the forward's unit gradients times the upstream
    gradient) and through the Python Functions; fp32 and bf16 logits (fused and GEMM paths).

    A plain backward (upstream 1) gives bitwise equal gradients, except the GEMM path's weight
    gradient: its ``index_add_`` adds rows of the same predicted class in whatever order the
    device's atomics take, so it is only fp32-close. With a loss weight the node rounds the unit
    gradient, then its product (twice in bf16, where the Python path rounds once), so the two
    agree to a few units in the last place of the gradient's largest entry."""
    from elogitnorm_fast.kernels import class_gradient

    logits, weight, target = make_case(n, c, d, "some_ignored", dtype=dtype, device="cuda")
    atomics = class_gradient.pooled_config(n, c) is None  # the weight gradient from the GEMMs
    for scale in (1.0, 2.5):
        native = _gradients(True, logits, weight, target, scale)
        python = _gradients(False, logits, weight, target, scale)
        for name, ours, theirs in zip(("logits", "weight"), native, python, strict=True):
            assert ours.dtype == theirs.dtype, name
            if scale == 1.0 and not (name == "weight" and atomics):
                assert torch.equal(ours, theirs), name
                continue
            ulps = 4 * torch.finfo(ours.dtype).eps * theirs.float().abs().max().item()
            rtol = 1e-2 if ours.dtype == torch.bfloat16 else 1e-4
            torch.testing.assert_close(ours.float(), theirs.float(), rtol=rtol, atol=ulps,
                                       msg=lambda text, name=name: f"{name}: {text}")


@pytest.mark.parametrize("kind", ["elogitnorm", "logitnorm"])
@pytest.mark.parametrize("n,c,d", [(128, 10, 64), (256, 1000, 64)])
def test_bf16_error_at_most_twice_plain_bf16(kind, n, c, d):
    """Loss and gradients against float64 on the bf16-rounded inputs <= 2x the reference
    evaluated in bf16 (both the fused small-C and the GEMM path of ELogitNorm)."""
    check_bf16_error("triton", kind, n, c, d, "cuda")


def _model_and_batch(n=64, d=32, c=100):
    torch.manual_seed(1)
    model = torch.nn.Linear(d, c).cuda()
    x = torch.randn(n, d, device="cuda")
    y = torch.randint(0, c, (n,), device="cuda")
    y[::7] = -100
    return model, x, y


def _step(model, x, y):
    logits = model(x)
    return (ef.elogitnorm_loss(logits, model.weight, y, backend="triton")
            + ef.logitnorm_loss(logits, y, backend="triton"))


def _backend_step(model, x, y):
    """The same step calling the backend module directly (no dispatch, no validation)."""
    from elogitnorm_fast.backends import triton_backend

    logits = model(x)
    options = {"reduction": "mean", "ignore_index": -100}
    return (triton_backend.elogitnorm_loss(logits, model.weight, y, eps=1e-6,
                                           divisor=logits.shape[1], **options)
            + triton_backend.logitnorm_loss(logits, y, tau=0.04, **options))


@pytest.mark.parametrize("step", [_backend_step, _step], ids=["backend", "public_api"])
def test_torch_compile_fullgraph_training_step(step):
    model, x, y = _model_and_batch()
    eager = step(model, x, y)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(model, x, y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for actual, expected in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)


def test_cuda_graph_capture_of_a_training_step():
    model, x, y = _model_and_batch()
    static_x, static_y = x.clone(), y.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernels outside the capture
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            _step(model, static_x, static_y).backward()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = _step(model, static_x, static_y)
        static_loss.backward()
    new_x = torch.randn_like(x)
    new_y = torch.randint(0, 100, y.shape, device="cuda")
    static_x.copy_(new_x)
    static_y.copy_(new_y)
    graph.replay()
    torch.cuda.synchronize()
    expected = _step(model, new_x, new_y)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    torch.testing.assert_close(static_loss, expected, rtol=1e-5, atol=1e-6)
    for param, reference in zip(model.parameters(), expected_grads, strict=True):
        torch.testing.assert_close(param.grad, reference, rtol=1e-4, atol=1e-6)


def test_opcheck_triton_ops():
    import elogitnorm_fast.backends.triton_backend  # noqa: F401  (registers the ops)

    logits, weight, target = make_case(16, 10, 8, dtype=torch.float32, device="cuda")
    target[::4] = -100
    ops = torch.ops.elogitnorm_fast
    torch.library.opcheck(ops.triton_logitnorm_rows.default, (logits, target, 25.0, -100, 0))
    _, stats = ops.triton_logitnorm_rows(logits, target, 25.0, -100, 0)
    upstream = torch.rand(1, device="cuda").expand(16)  # stride 0, as after loss.sum()
    # The gradient op only runs inside the backward and has no derivative of its own (a second
    # derivative raises); opcheck differentiates every output whose inputs need grad, so none do.
    torch.library.opcheck(ops.triton_logitnorm_grad.default,
                          (logits.detach(), target, stats.detach(), upstream, -100))
    # C = 10: the fused small-C kernel (argmax and distances inside); C = 200: GEMM distances.
    torch.library.opcheck(ops.triton_elogitnorm_rows.default,
                          (logits, weight, target, -100, 1e-6, 10, True, True, 0))
    logits, weight, target = make_case(16, 200, 8, dtype=torch.float32, device="cuda")
    torch.library.opcheck(ops.triton_elogitnorm_rows.default,
                          (logits, weight, target, -100, 1e-6, 200, True, True, 0))


def test_capture_is_seen_by_the_small_batch_reduction_choice():
    """A small LogitNorm mean is reduced by one program and returns through the C++ node
    eager, and by blocks of rows through the Python Function while a CUDA graph is captured
    (the kernel modules look the capture up themselves)."""
    from kernel_paths import logitnorm, returned_by

    logits, _, target = make_case(128, 10, 1, "some_ignored", dtype=torch.float32,
                                  device="cuda")
    assert returned_by(logitnorm(logits, target)) == "native"
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles the blocks kernel outside the capture
        logitnorm(logits, target, capturing=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = logitnorm(logits, target)
    assert returned_by(captured) == "python"
    graph.replay()
    torch.cuda.synchronize()
    expected = logitnorm_reference(logits.detach().double(), target)
    torch.testing.assert_close(captured.double(), expected, rtol=RTOL, atol=ATOL)
