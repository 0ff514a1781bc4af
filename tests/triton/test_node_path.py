"""Eager sum / mean steps through the C++ node (``kernels.unit_gradient``), and the paths that
take the Python Functions instead (CUDA-graph capture, a node-less extension, large LogitNorm).

The node multiplies the forward's unit gradients by the upstream gradient: tested here against
the reference for any upstream, against the Python backward bitwise for a plain backward, and
for the rule every path shares: ignored rows get 0 even for a NaN upstream gradient.
"""

from __future__ import annotations

import pytest
import torch
from kernel_paths import (
    ATOL,
    KERNEL_PATHS,
    REDUCED_PATHS,
    RTOL,
    block_cols,
    check_elogitnorm,
    check_logitnorm,
    elogitnorm_config,
    logitnorm_config,
    returned_by,
)
from kernel_paths import elogitnorm as elogitnorm_loss
from kernel_paths import logitnorm as logitnorm_loss

from elogitnorm_fast.kernels import elogitnorm, logitnorm
from elogitnorm_fast.kernels.unit_gradient import has_unit_gradient_node
from elogitnorm_fast.reference import elogitnorm_reference

from parity import make_case

pytestmark = pytest.mark.skipif(not has_unit_gradient_node(),
                                reason="the compiled extension has no unit_gradient_node")


@pytest.mark.parametrize("native", [True, False])
def test_create_graph_is_refused(native):
    """No second derivative: a gradient penalty would be silently wrong, so it raises (the
    C++ node and the Python Functions alike)."""
    logits, weight, target = make_case(6, 5, 4, dtype=torch.float32)
    for loss in (logitnorm_loss(logits, target,
                                config=logitnorm_config(logits, node=native)),
                 elogitnorm_loss(logits, weight, target,
                                 config=elogitnorm_config(logits, weight, node=native))):
        assert returned_by(loss) == ("native" if native else "python")
        with pytest.raises(RuntimeError, match="first derivatives.*backend='reference'"):
            torch.autograd.grad(loss, logits, create_graph=True)


@pytest.mark.parametrize("c", [10, 257])  # pooled dW (fused path), GEMM dW
def test_elogitnorm_node_forward_records_no_autograd_history(c):
    """Through the C++ node, the forward's host ops (argmax, gather, GEMMs of the distances and
    of the weight gradient) run without autograd: the node's only edges lead to the logits and
    the weight themselves, so nothing (the coefficients, the gathered rows) stays alive for the
    backward beyond the gradients it keeps, and no op pays for recording."""
    logits, weight, target = make_case(12, c, 6, "some_ignored", dtype=torch.float32)
    loss = elogitnorm_loss(logits, weight, target)
    assert returned_by(loss) == "native"
    edges = [function for function, _ in loss.grad_fn.next_functions if function is not None]
    assert sorted(type(f).__name__ for f in edges) == ["AccumulateGrad", "AccumulateGrad"]
    assert {id(f.variable) for f in edges} == {id(logits), id(weight)}


@pytest.mark.parametrize("needs", ["both", "logits", "weight"])
@pytest.mark.parametrize("c", [10, 257])  # pooled dW (fused path), GEMM dW
def test_elogitnorm_node_scales_the_forward_gradients_by_any_upstream(c, needs):
    """The C++ node: the forward's unit gradients times the upstream gradient, for a loss
    weight and again through the retained graph with another, for either input alone; the
    logits are never read again (scrambled in between)."""
    logits, weight, target = make_case(12, c, 6, "some_ignored", dtype=torch.float32)
    logits = logits.detach().requires_grad_(needs != "weight")
    weight = weight.detach().requires_grad_(needs != "logits")
    inputs = [t for t in (logits, weight) if t.requires_grad]
    ref = [t.detach().double().requires_grad_(t.requires_grad) for t in (logits, weight)]
    expected = torch.autograd.grad(elogitnorm_reference(*ref, target, reduction="sum"),
                                   [t for t in ref if t.requires_grad])
    loss = elogitnorm_loss(logits, weight, target, "sum")
    assert returned_by(loss) == "native", loss.grad_fn.name()
    logits.data.copy_(torch.randn_like(logits) * 50)
    weighted = torch.autograd.grad(loss * 2.5, inputs, retain_graph=True)
    plain = torch.autograd.grad(loss, inputs)
    for got, half, want in zip(weighted, plain, expected, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), 2.5 * want, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(half.double(), want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("c", [10, 257])
def test_node_and_python_backward_are_bitwise_equal_for_a_plain_backward(c):
    """Upstream gradient 1 (``loss.backward()`` of a mean): the node's multiply by 1 and the
    Python backward give the same bits, for both losses and both ELogitNorm paths."""
    logits, weight, target = make_case(20, c, 6, "some_ignored", dtype=torch.float32)
    grads = {}
    for native in (True, False):
        z, w = logits.detach().requires_grad_(True), weight.detach().requires_grad_(True)
        e_loss = elogitnorm_loss(z, w, target,
                                 config=elogitnorm_config(z, w, node=native))
        l_loss = logitnorm_loss(z, target, config=logitnorm_config(z, node=native))
        assert {returned_by(e_loss), returned_by(l_loss)} == {"native" if native else "python"}
        grads[native] = (*torch.autograd.grad(e_loss, (z, w)), *torch.autograd.grad(l_loss, z))
    for ours, theirs in zip(grads[True], grads[False], strict=True):
        assert torch.equal(ours, theirs)


def test_node_needs_no_capture_and_the_extension():
    """While a CUDA graph is captured the eager sum / mean goes through the Python Functions
    (replayed, the node's multiplies would be extra kernels); where the extension has no node
    the configuration says so (``node`` False: the same Functions), and both match."""
    logits, weight, target = make_case(9, 10, 6, "some_ignored", dtype=torch.float32)
    assert elogitnorm.config_for(9, 10, 6, "mean").node
    assert not elogitnorm.config_for(9, 10, 6, "mean", capturing=True).node
    assert not logitnorm.config_for(9, 10, "mean", capturing=True).node
    for path in ({"capturing": True},
                 {"config": elogitnorm_config(logits, weight, node=False)}):
        loss = elogitnorm_loss(logits, weight, target, **path)
        assert returned_by(loss) == "python", loss.grad_fn.name()
        check_elogitnorm(logits, weight, target, "mean", **path)
    for path in ({"capturing": True}, {"config": logitnorm_config(logits, node=False)}):
        loss = logitnorm_loss(logits, target, **path)
        assert returned_by(loss) == "python", loss.grad_fn.name()
        check_logitnorm(logits, target, "mean", **path)


def test_logitnorm_node_only_up_to_its_size():
    """Above 2^20 elements the node's multiply would cost a pass over N x C that the Python
    backward skips: the Python Function takes over."""
    assert logitnorm.config_for(12, 10, "sum").node
    assert logitnorm.config_for(1024, 1024, "sum").node
    assert not logitnorm.config_for(1024, 1025, "sum").node
    logits, _, target = make_case(12, 10, 1, "some_ignored", dtype=torch.float32)
    config = logitnorm_config(logits, "sum", node=False)
    assert returned_by(logitnorm_loss(logits, target, "sum", config=config)) == "python"
    check_logitnorm(logits, target, "sum", config=config)


def _elogitnorm_paths():
    """(name, path keywords for kernel_paths.elogitnorm) of every ELogitNorm path."""
    for kernel in KERNEL_PATHS:
        for returns in REDUCED_PATHS:
            yield f"{kernel}, {returns}", kernel, returns
        yield f"{kernel}, op", kernel, "op"


@pytest.mark.parametrize("kind", ["some_ignored", "all_ignored"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name,kernel,returns", list(_elogitnorm_paths()))
def test_nan_upstream_gives_ignored_rows_zero_on_every_elogitnorm_path(name, kernel, returns,
                                                                        reduction, kind):
    """A NaN upstream gradient: NaN on the valid rows' logits gradient and in dW where a row
    is valid; 0 on ignored rows, and dW 0 when every row is ignored (F.cross_entropy's rule:
    an ignored row's upstream gradient is never read), whatever path runs."""
    logits, weight, target = make_case(9, 10, 6, kind, dtype=torch.float32)
    if returns == "op":
        path = {"traced": True, "block_cols": block_cols(kernel, 10)}
    else:
        path = {"config": elogitnorm_config(logits, weight, reduction, kernel=kernel,
                                            returns=returns)}
    loss = elogitnorm_loss(logits, weight, target, reduction, **path)
    grad = torch.full_like(loss, float("nan"))
    grad_logits, grad_weight = torch.autograd.grad(loss, (logits, weight), grad)
    valid = target != -100
    assert torch.equal(grad_logits[~valid], torch.zeros_like(grad_logits[~valid])), name
    assert torch.isnan(grad_logits[valid]).all(), name
    if valid.any():
        assert torch.isnan(grad_weight).any(), name
    else:
        assert torch.equal(grad_weight, torch.zeros_like(grad_weight)), name


@pytest.mark.parametrize("kind", ["some_ignored", "all_ignored"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("returns", ["one program", "one program, Python backward", "blocks",
                                     "host", "op"])
def test_nan_upstream_gives_ignored_rows_zero_on_every_logitnorm_path(returns, reduction,
                                                                       kind):
    logits, _, target = make_case(9, 10, 1, kind, dtype=torch.float32)
    path = ({"traced": True} if returns == "op"
            else {"config": logitnorm_config(logits, reduction, returns=returns)})
    loss = logitnorm_loss(logits, target, reduction, **path)
    (grad_logits,) = torch.autograd.grad(loss, logits, torch.full_like(loss, float("nan")))
    valid = target != -100
    assert torch.equal(grad_logits[~valid], torch.zeros_like(grad_logits[~valid]))
    assert torch.isnan(grad_logits[valid]).all()
