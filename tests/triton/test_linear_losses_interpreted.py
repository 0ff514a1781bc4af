"""The fused linear losses on the ``triton`` backend (the kernels under the interpreter, CPU
tensors), against the unfused loss on the reference (float64, on the same float32 inputs) and on
the ``triton`` backend (float32): loss and the three gradients, chunks of one row, an odd size
and more than N, N < C and N > C, ties, ignored rows, every reduction, no bias, frozen inputs."""

from __future__ import annotations

import pytest
import torch
from test_linear_losses import compare, compare_to_float64, make_inputs

import elogitnorm_fast as ef

LOSSES = ("elogitnorm", "logitnorm")
REDUCTIONS = ("mean", "sum", "none")


def _against_reference(loss, inputs, *, rtol=2e-4, atol=2e-6, **options):
    """Fused ``triton`` on float32 inputs against the float64 reference on the same values."""
    ours = compare_to_float64(loss, "triton", inputs, rtol=rtol, atol=atol, **options)
    assert ours.dtype == torch.float32


def test_auto_on_cpu_tensors_is_not_triton():
    assert ef.resolve_backend("auto", "cpu", op="linear_losses").NAME != "triton"
    assert ef.unavailable_reason("triton", "cpu", op="linear_losses") is None


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(7, 19, 5), (23, 6, 4)])
@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_matches_reference(loss, reduction, shape, chunk):
    inputs = make_inputs(*shape, "some_ignored", dtype=torch.float32)
    _against_reference(loss, inputs, reduction=reduction, chunk_rows=chunk)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("kind", ["ties", "all_ignored"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_special_rows_match_reference(loss, kind, reduction):
    inputs = make_inputs(11, 9, 6, kind, dtype=torch.float32)
    _against_reference(loss, inputs, reduction=reduction, chunk_rows=4)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_unfused_triton(loss, reduction):
    inputs = make_inputs(37, 300, 16, "some_ignored", dtype=torch.float32)
    compare(loss, "triton", "triton", inputs, rtol=2e-4, atol=2e-6, reduction=reduction,
            chunk_rows=7)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("frozen", ["weight", "features", "no_bias"])
def test_frozen_inputs_and_no_bias(loss, frozen):
    features, weight, bias, target = make_inputs(10, 14, 5, bias=frozen != "no_bias",
                                                 dtype=torch.float32)
    if frozen in ("weight", "features"):
        {"weight": weight, "features": features}[frozen].requires_grad_(False)
    _against_reference(loss, (features, weight, bias, target), chunk_rows=3)


@pytest.mark.parametrize("loss", LOSSES)
def test_float64_inputs_take_the_torch_rows(loss):
    inputs = make_inputs(9, 13, 4, "some_ignored")
    compare(loss, "triton", "reference", inputs, rtol=1e-9, atol=1e-10, chunk_rows=4)


@pytest.mark.parametrize("loss", LOSSES)
def test_options_reach_the_kernels(loss):
    inputs = make_inputs(9, 12, 5, dtype=torch.float32)
    inputs[3][1::3] = 3  # ignore_index below is a class: these rows are ignored
    options = {"ignore_index": 3, "reduction": "sum", "chunk_rows": 2}
    options.update({"eps": 0.3, "divisor": "paper"} if loss == "elogitnorm" else {"tau": 0.5})
    _against_reference(loss, inputs, **options)

