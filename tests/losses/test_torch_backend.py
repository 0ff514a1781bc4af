"""The memory-lean ``torch`` backend against the all-pairs reference (docs/design.md)."""

from __future__ import annotations

import pytest
import torch

import elogitnorm_fast as ef
from elogitnorm_fast.reference import elogitnorm_reference, logitnorm_reference

from parity import (
    KINDS,
    REDUCTIONS,
    check_bf16_error,
    check_elogitnorm,
    check_logitnorm,
    make_case,
)

SIZES = [(1, 1, 3), (7, 2, 5), (7, 3, 4), (128, 10, 16), (7, 100, 8), (128, 100, 8),
         (1, 1000, 4), (7, 1000, 6)]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n,c,d", SIZES)
def test_elogitnorm_float64_matches_reference(n, c, d, reduction):
    logits, weight, target = make_case(n, c, d)
    check_elogitnorm("torch", logits, weight, target, reduction, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_elogitnorm_special_rows_float64(kind, reduction):
    logits, weight, target = make_case(9, 6, 5, kind)
    loss, grad_logits, grad_weight = check_elogitnorm(
        "torch", logits, weight, target, reduction, rtol=1e-9, atol=1e-11
    )
    if kind != "all_ignored" or reduction != "mean":
        assert torch.isfinite(loss).all()
    assert torch.isfinite(grad_logits).all() and torch.isfinite(grad_weight).all()


@pytest.mark.parametrize("n,c,d", [(128, 10, 64), (128, 1000, 32), (33, 257, 20)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_elogitnorm_float32_matches_reference(n, c, d, reduction):
    logits, weight, target = make_case(n, c, d, dtype=torch.float32)
    check_elogitnorm("torch", logits, weight, target, reduction, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_elogitnorm_float32_duplicate_weight_rows_match_reference(reduction):
    """fp32 GEMM-form distances of coincident rows are ~1e-3, not 0: they must be recomputed."""
    logits, weight, target = make_case(40, 6, 5, "duplicate_weights", dtype=torch.float32)
    check_elogitnorm("torch", logits, weight, target, reduction, rtol=2e-4, atol=2e-6)


def test_elogitnorm_paper_divisor_matches_reference():
    logits, weight, target = make_case(16, 7, 5)
    check_elogitnorm("torch", logits, weight, target, "mean", rtol=1e-9, atol=1e-11,
                     divisor="paper")
    classes = ef.elogitnorm_loss(logits, weight, target, backend="torch")
    paper = ef.elogitnorm_loss(logits, weight, target, backend="torch", divisor="paper")
    assert not torch.allclose(classes, paper)


@pytest.mark.parametrize("kind", ["elogitnorm", "logitnorm"])
def test_bf16_logits_error_at_most_twice_plain_pytorch(kind):
    """bf16 logits with fp32 weight: loss and gradients at most 2x plain bf16's error."""
    check_bf16_error("torch", kind, 64, 50, 16)


def test_elogitnorm_fp16_logits():
    logits, weight, target = make_case(16, 10, 8, dtype=torch.float16, weight_dtype=torch.float32)
    check_elogitnorm("torch", logits, weight, target, "mean", rtol=2e-2, atol=2e-3)


def test_noncontiguous_inputs_and_expanded_upstream_gradient():
    logits, weight, target = make_case(12, 9, 6)
    logits_t = logits.detach().t().contiguous().t().requires_grad_(True)  # column-major
    weight_strided = torch.stack([weight.detach()] * 2, dim=2)[:, :, 0].requires_grad_(True)
    assert not logits_t.is_contiguous() and not weight_strided.is_contiguous()
    loss = ef.elogitnorm_loss(logits_t, weight_strided, target[::1], reduction="none",
                              backend="torch")
    loss.sum().backward()  # upstream gradient: a stride-0 expanded tensor of ones
    ref_z = logits.detach().requires_grad_(True)
    ref_w = weight.detach().requires_grad_(True)
    elogitnorm_reference(ref_z, ref_w, target, reduction="none").sum().backward()
    torch.testing.assert_close(logits_t.grad, ref_z.grad)
    torch.testing.assert_close(weight_strided.grad, ref_w.grad)


def test_caller_logits_are_not_modified():
    logits, weight, target = make_case(8, 5, 4)
    before = logits.detach().clone()
    ef.elogitnorm_loss(logits, weight, target, backend="torch").backward()
    assert torch.equal(logits.detach(), before)


def test_elogitnorm_invariant_to_row_shift_and_positive_scale():
    logits, weight, target = make_case(20, 8, 5)
    shift = torch.randn(20, 1, dtype=torch.float64) * 10
    base = ef.elogitnorm_loss(logits, weight, target, reduction="none", backend="torch")
    shifted = ef.elogitnorm_loss(logits + shift, weight, target, reduction="none",
                                 backend="torch")
    scaled = ef.elogitnorm_loss(logits * 7.5, weight, target, reduction="none", backend="torch")
    torch.testing.assert_close(shifted, base)
    torch.testing.assert_close(scaled, base)


def test_gradcheck_float64():
    logits, weight, target = make_case(6, 5, 3)
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda z, w, r=reduction: ef.elogitnorm_loss(z, w, target, reduction=r,
                                                         backend="torch"),
            (logits, weight),
        )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n,c", [(1, 1), (7, 3), (128, 10), (33, 1000)])
def test_logitnorm_matches_reference(n, c, reduction):
    logits, _, target = make_case(n, c, 1)
    target[::4] = -100
    check_logitnorm("torch", logits, target, reduction, rtol=1e-9, atol=1e-11)


def test_logitnorm_matches_openood_formula():
    """OpenOOD's LogitNormLoss: norms = ||x|| + 1e-7; CE(x / norms / t, y), t = 0.04."""
    logits = torch.randn(32, 10, dtype=torch.float64)
    target = torch.randint(0, 10, (32,))
    norms = torch.norm(logits, p=2, dim=-1, keepdim=True) + 1e-7
    expected = torch.nn.functional.cross_entropy(torch.div(logits, norms) / 0.04, target)
    torch.testing.assert_close(ef.logitnorm_loss(logits, target, backend="torch"), expected)
    torch.testing.assert_close(logitnorm_reference(logits, target), expected)


def test_compiled_training_step_fullgraph_matches_float64_reference():
    """torch.compile(fullgraph=True) of the loss (forward compiled, backward from it) traces the
    CPU refinement of near-coincident weight rows (a data-dependent number of entries) without
    a graph break, and gives the float64 answer. One compile: tens of seconds on a small CPU."""
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(4)
    logits = (3 + 1e-3 * torch.randn(12, 6, generator=generator)).requires_grad_(True)
    weight = torch.randn(6, 5, generator=generator)
    weight[4] = weight[1] + 1e-4  # refined: the GEMM form cancels there
    weight.requires_grad_(True)
    target = torch.randint(0, 6, (12,), generator=generator)

    def loss_fn(z, w, y):
        return (ef.elogitnorm_loss(z, w, y, backend="torch")
                + 0.5 * ef.logitnorm_loss(z, y, backend="torch"))

    compiled = torch.compile(loss_fn, fullgraph=True)
    loss = compiled(logits, weight, target)
    grad_logits, grad_weight = torch.autograd.grad(loss, (logits, weight))
    ref_z = logits.detach().double().requires_grad_(True)
    ref_w = weight.detach().double().requires_grad_(True)
    shifted = ref_z - ref_z.detach().amax(dim=1, keepdim=True)  # the same loss, exact in fp64
    expected = (elogitnorm_reference(shifted, ref_w, target)
                + 0.5 * logitnorm_reference(ref_z, target))
    expected_grads = torch.autograd.grad(expected, (ref_z, ref_w))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    for got, want in zip((grad_logits, grad_weight), expected_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4,
                                   atol=1e-5 * want.abs().max().item())
