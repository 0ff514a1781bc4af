"""The Triton kernels against the float64 reference under the interpreter, on every path.

Each path is named by the arguments of the loss modules (``kernel_paths``): the fused small-C
ELogitNorm kernel, GEMM distances with rows on chip or streamed, the ``triton_op`` path that
torch.compile traces, and the block sizes the benchmarks compare.
"""

from __future__ import annotations

import os

import pytest
import torch
from kernel_paths import (
    ATOL,
    KERNEL_PATHS,
    RTOL,
    block_cols,
    check_elogitnorm,
    check_logitnorm,
    elogitnorm_config,
)

import elogitnorm_fast as ef
from elogitnorm_fast.backends import triton_backend
from elogitnorm_fast.kernels import class_gradient, elogitnorm, rows
from elogitnorm_fast.reference import elogitnorm_reference, logitnorm_reference

from parity import KINDS, REDUCTIONS, make_case


def test_interpreter_is_active():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert triton_backend.unavailable_reason(torch.device("cpu")) is None
    assert ef.resolve_backend("triton", torch.device("cpu")) is triton_backend


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("c", [1, 3, 10, 128, 129, 257, 1000])
@pytest.mark.parametrize("n", [1, 5, 64])
def test_elogitnorm_matches_reference(n, c, reduction):
    logits, weight, target = make_case(n, c, 6, dtype=torch.float32)
    check_elogitnorm(logits, weight, target, reduction)


#: (N, C, column block) for rows longer than one block: partial last blocks, C = 1000.
STREAMING = [(1, 3, 2), (5, 10, 4), (7, 257, 64), (16, 100, 32), (3, 1000, 128)]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("n,c,block", STREAMING)
def test_streamed_rows_match_reference(n, c, block, reduction):
    assert not rows.row_blocks(c, block).single
    logits, weight, target = make_case(n, c, 6, dtype=torch.float32)
    target[::3] = -100
    check_elogitnorm(logits, weight, target, reduction, block_cols=block)
    check_logitnorm(logits, target, reduction, block_cols=block)


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_special_rows_match_reference(kind, reduction, path):
    """Ties with the max, all-equal rows, ignored rows, coincident weight rows."""
    logits, weight, target = make_case(9, 6, 5, kind, dtype=torch.float32)
    loss, grad_logits, grad_weight = check_elogitnorm(logits, weight, target, reduction,
                                                      block_cols=block_cols(path, 6))
    if kind != "all_ignored" or reduction != "mean":
        assert torch.isfinite(loss).all()
    else:
        assert torch.isnan(loss)
    assert torch.isfinite(grad_logits).all() and torch.isfinite(grad_weight).all()
    check_logitnorm(logits, target, reduction, block_cols=block_cols(path, 6))


def test_zero_row_logitnorm_matches_reference():
    logits = torch.zeros(3, 5, requires_grad=True)
    target = torch.tensor([0, 4, 2])
    check_logitnorm(logits, target, "none")


#: Fused kernel with one dW row per class (N = 9 >= C) and per sample (coefficient rows
#: summing to zero), GEMM distances.
@pytest.mark.parametrize("c", [7, 12, 130])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_triton_op_path_matches_reference(reduction, c):
    """The torch.library.triton_op path (what torch.compile traces), run eagerly."""
    logits, weight, target = make_case(9, c, 5, "some_ignored", dtype=torch.float32)
    check_elogitnorm(logits, weight, target, reduction, traced=True)
    losses = elogitnorm.elogitnorm_loss(logits, weight, target, reduction="none",
                                        ignore_index=-100, eps=1e-6, divisor=c, traced=True)
    assert "triton_elogitnorm_rows" in type(losses.grad_fn).__name__
    check_logitnorm(logits, target, reduction, traced=True)


def test_op_path_launches_directly_where_torch_refuses_interpreted_kernels(monkeypatch):
    """torch 2.11 wraps only ``triton.jit`` functions (``wrap_triton`` raises on the
    interpreter's kernels): the op path then launches them itself (that torch simulated)."""
    from triton.runtime.jit import JITFunction

    wrap_triton = torch.library.wrap_triton
    refused = []

    def older_wrap_triton(kernel):
        if not isinstance(kernel, JITFunction):
            refused.append(kernel)
            raise RuntimeError("wrap_triton only works on functions annotated with "
                               "triton.jit or triton.autotune")
        return wrap_triton(kernel)

    monkeypatch.setattr(torch.library, "wrap_triton", older_wrap_triton)
    logits, weight, target = make_case(9, 7, 5, "some_ignored", dtype=torch.float32)
    check_elogitnorm(logits, weight, target, "mean", traced=True)
    check_logitnorm(logits, target, "sum", traced=True)
    assert refused  # asked, refused, launched directly


@pytest.mark.parametrize("c", [10, 100])
def test_fused_kernel_with_four_rows_per_program(c):
    """The fused small-C ELogitNorm kernel on 4 rows per program (the variant gpu_losses
    times against the default of one row) matches the reference."""
    logits, weight, target = make_case(7, c, 40, "some_ignored", dtype=torch.float32)
    config = elogitnorm_config(logits, weight, fused=elogitnorm.fused_blocks(c, 40, rows=4))
    assert config.fused.rows == 4
    check_elogitnorm(logits, weight, target, "mean", config=config)


@pytest.mark.parametrize("tile", [16384, 4096])
@pytest.mark.parametrize("deferred", [True, False])
@pytest.mark.parametrize("c", [10, 100])
def test_fused_kernel_with_either_summation_and_pooled_products(c, deferred, tile):
    """The fused kernel's distance loop, summed once after the loop (the default) or at every
    step (the variant gpu_losses times), on the default tile and on the 4096 of the ``fused
    tiles of 4096`` variant, and the pooled weight gradient's products (C = 10: one block of
    classes; C = 100: seven, the last one partial) match the reference, through the C++ node
    (pooled in the forward) and the Python backward. D takes several feature tiles, the last
    one partial (default tile, C = 10: 2 of 1024 for D = 1100; C = 100: 3 of 128 for D = 300).
    """
    d = 1100 if c == 10 else 300
    blocks = elogitnorm.fused_blocks(c, d, tile=tile, deferred_sums=deferred)
    assert d // blocks.features >= (1 if c == 10 else 2) and d % blocks.features
    logits, weight, target = make_case(37, c, d, "some_ignored", dtype=torch.float32)
    assert elogitnorm.fuses_distances(c, d) and class_gradient.pooled_config(37, c) is not None
    for returns in ("native", "python"):
        config = elogitnorm_config(logits, weight, returns=returns, fused=blocks)
        assert config.pooled is not None
        check_elogitnorm(logits, weight, target, "mean", config=config)


def test_fused_argmax_and_predicted_match_torch():
    """First index on ties, NaN counts as the maximum, +-inf; ``predicted`` as argmax."""
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[1.0, nan, 5.0, nan], [-inf, -inf, -inf, -inf],
                           [2.0, inf, inf, 1.0], [3.0, 3.0, 3.0, 3.0],
                           [0.0, 2.0, -1.0, 2.0], [-inf, 1.0, -inf, 0.5]])
    logits = torch.cat([logits, torch.randint(-1, 2, (7, 4)).float()])
    weight = torch.randn(4, 3)
    target = torch.tensor([0, 1, 2, 3, 1, -100, 0, 1, 2, 3, 0, 1, 2])
    losses, grad, coefficients, predicted = elogitnorm.elogitnorm_rows_fused(
        logits, target, weight, eps=1e-6, divisor=4, ignore_index=-100, write_grad=True,
        write_coefficients=True, traced=False)
    assert predicted.dtype == torch.int64
    assert torch.equal(predicted, logits.argmax(dim=1))
    assert torch.isnan(losses[0]) and losses[5] == 0
    assert torch.isfinite(losses[[3, 4, *range(6, 13)]]).all()
    assert grad.shape == coefficients.shape == logits.shape


def test_fused_duplicate_weight_rows_are_exact():
    """Distance 0 from the difference form (clamped at eps, no gradient through it), where
    the GEMM form would leave ~1e-3 |w| (large D, large norms)."""
    logits, weight, target = make_case(16, 5, 512, "duplicate_weights", dtype=torch.float32)
    with torch.no_grad():
        weight.mul_(30.0)
        weight[3] = weight[1]
    for reduction in REDUCTIONS:
        check_elogitnorm(logits, weight, target, reduction)


@pytest.mark.parametrize("path", ["gemm", "streaming"])
@pytest.mark.parametrize("n", [12, 41])  # C = 40: one row per sample; one row per class
def test_gemm_duplicate_weight_rows_are_exact(n, path):
    """GEMM path: ``|a|^2 + |b|^2 - 2 a.b`` from the raw inner products cancels for
    (near-)duplicate weight rows (~1e-3 |w|^2 in fp32 at large norms); the kernel recomputes
    those entries from ``W``, so a duplicate's distance is 0 (clamped at eps, no gradient
    through it) and a near duplicate's is its true small value, in both layouts."""
    c, d = 40, 64
    block = 64 if path == "gemm" else 16
    logits, weight, target = make_case(n, c, d, "duplicate_weights", dtype=torch.float32)
    with torch.no_grad():
        weight.mul_(30.0)
        weight[7] = weight[3]
        for row_slice, cls in ((slice(0, 3), 3), (slice(3, 6), 7), (slice(6, 9), 5),
                               (slice(9, 12), 11)):
            logits[row_slice, cls] += 10.0  # these rows predict the duplicated classes
    target[1] = -100
    for reduction in REDUCTIONS:
        check_elogitnorm(logits, weight, target, reduction, block_cols=block)
    # A near duplicate (0.008 apart, where the GEMM form is off by ~0.1): its distance drives
    # the loss and the logits gradient. (The weight gradient's own GEMM form, c (w_m - w_j) as
    # c w_m - c w_j, loses digits there in every fp32 backend.)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(5)
        weight[11] = weight[5] + 1e-3 * torch.randn(d, generator=generator)
    loss = elogitnorm.elogitnorm_loss(logits, weight.detach(), target, reduction="none",
                                      ignore_index=-100, eps=1e-6, divisor=c, block_cols=block)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    ref_z = logits.detach().double().requires_grad_(True)
    expected = elogitnorm_reference(ref_z, weight.detach().double(), target, reduction="none")
    (ref_grad,) = torch.autograd.grad(expected.sum(), ref_z)
    torch.testing.assert_close(loss.double(), expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=RTOL, atol=ATOL)


def test_paper_divisor_matches_reference():
    logits, weight, target = make_case(16, 7, 5, dtype=torch.float32)
    check_elogitnorm(logits, weight, target, "mean", divisor="paper")


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_strided_inputs_and_expanded_upstream_gradient(path):
    logits, weight, target = make_case(12, 9, 6, dtype=torch.float32)
    column_major = logits.detach().t().contiguous().t().requires_grad_(True)
    padded = torch.zeros(12, 16)[:, :9].copy_(logits.detach()).requires_grad_(True)
    weight_strided = torch.stack([weight.detach()] * 2, dim=2)[:, :, 0].requires_grad_(True)
    ref_z = logits.detach().double().requires_grad_(True)
    ref_w = weight.detach().double().requires_grad_(True)
    elogitnorm_reference(ref_z, ref_w, target, reduction="none").sum().backward()
    for z in (column_major, padded):
        loss = triton_backend.elogitnorm_loss(z, weight_strided, target, reduction="none",
                                              ignore_index=-100, eps=1e-6, divisor=9,
                                              block_cols=block_cols(path, 9))
        # loss.sum().backward(): the upstream gradient is a stride-0 expansion of ones.
        grad_z, grad_w = torch.autograd.grad(loss.sum(), (z, weight_strided))
        torch.testing.assert_close(grad_z.double(), ref_z.grad, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(grad_w.double(), ref_w.grad, rtol=RTOL, atol=ATOL)
    ref_z.grad = None
    logitnorm_reference(ref_z, target, reduction="none").sum().backward()
    loss = ef.logitnorm_loss(column_major, target, reduction="none", backend="triton")
    (grad_z,) = torch.autograd.grad(loss.sum(), column_major)
    torch.testing.assert_close(grad_z.double(), ref_z.grad, rtol=RTOL, atol=ATOL)


def test_caller_logits_are_not_modified():
    logits, weight, target = make_case(8, 5, 4, dtype=torch.float32)
    before = logits.detach().clone()
    ef.elogitnorm_loss(logits, weight, target, backend="triton").backward()
    ef.logitnorm_loss(logits, target, backend="triton").backward()
    assert torch.equal(logits.detach(), before)


def test_second_backward_with_retained_graph_is_unchanged():
    logits, weight, target = make_case(8, 5, 4, dtype=torch.float32)
    loss = ef.elogitnorm_loss(logits, weight, target, reduction="none", backend="triton")
    first = torch.autograd.grad(loss.sum() * 2, (logits, weight), retain_graph=True)
    second = torch.autograd.grad(loss.sum(), (logits, weight))
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, 2 * b)


def test_only_the_inputs_that_need_it_get_a_gradient():
    logits, weight, target = make_case(10, 7, 4, dtype=torch.float32)
    ref_z = logits.detach().double().requires_grad_(True)
    ref_w = weight.detach().double().requires_grad_(True)
    ref_gz, ref_gw = torch.autograd.grad(elogitnorm_reference(ref_z, ref_w, target),
                                         (ref_z, ref_w))
    loss = ef.elogitnorm_loss(logits, weight.detach(), target, backend="triton")
    (grad_z,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(grad_z.double(), ref_gz, rtol=RTOL, atol=ATOL)
    loss = ef.elogitnorm_loss(logits.detach(), weight, target, backend="triton")
    (grad_w,) = torch.autograd.grad(loss, weight)
    torch.testing.assert_close(grad_w.double(), ref_gw, rtol=RTOL, atol=ATOL)
    with torch.no_grad():
        loss = ef.elogitnorm_loss(logits, weight, target, backend="triton")
    torch.testing.assert_close(loss.double(), elogitnorm_reference(ref_z, ref_w, target)
                               .detach(), rtol=RTOL, atol=ATOL)


def test_nan_logits_propagate_to_their_row_only():
    logits, weight, target = make_case(6, 5, 4, dtype=torch.float32)
    logits = logits.detach().clone()
    logits[2, 3] = float("nan")
    rest = [0, 1, 3, 4, 5]
    cases = (
        (ef.elogitnorm_loss(logits, weight.detach(), target, reduction="none",
                            backend="triton"),
         elogitnorm_reference(logits.double(), weight.detach().double(), target,
                              reduction="none")),
        (ef.logitnorm_loss(logits, target, reduction="none", backend="triton"),
         logitnorm_reference(logits.double(), target, reduction="none")),
    )
    for loss, expected in cases:
        assert torch.isnan(loss[2])
        torch.testing.assert_close(loss[rest].double(), expected[rest], rtol=RTOL, atol=ATOL)


def test_float64_runs_the_torch_closed_form():
    from parity import check_elogitnorm as check_backend_elogitnorm
    from parity import check_logitnorm as check_backend_logitnorm

    logits, weight, target = make_case(7, 5, 3)
    check_backend_elogitnorm("triton", logits, weight, target, "mean", rtol=1e-9, atol=1e-11)
    check_backend_logitnorm("triton", logits, target, "sum", rtol=1e-9, atol=1e-11)


def test_block_override_rejects_non_powers_of_two():
    with pytest.raises(ValueError, match="block_cols"):
        rows.row_blocks(10, block_cols=12)
