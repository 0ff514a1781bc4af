"""The ``triton`` backend's losses modified in place, scaled, added and handed to a
``GradScaler``, on CPU tensors through the Triton interpreter: one case per path the backend
chooses between (the ``TRITON_PATHS`` table; the behaviour and its CPU half:
``tests/losses/test_loss_in_place.py``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_loss_in_place import OPS, REDUCTIONS, _case, _public, check_grad_scaler, check_ops

from elogitnorm_fast.backends import triton_backend
from elogitnorm_fast.kernels import elogitnorm
from elogitnorm_fast.reference import DEFAULT_EPS, DEFAULT_TAU


def _streaming(z, w, y, r):
    """GEMM distances and rows streamed over column blocks of 4 (C > 4)."""
    return triton_backend.elogitnorm_loss(z, w, y, reduction=r, ignore_index=-100,
                                          eps=DEFAULT_EPS, divisor=z.shape[1], block_cols=4)


def _python_function(z, w, y, r):
    """The Python Function that returns a sum / mean the kernel reduced, with its Python
    backward (what runs without the extension's C++ node, or under CUDA-graph capture)."""
    config = dataclasses.replace(
        elogitnorm.config_for(z.shape[0], z.shape[1], w.shape[1], r), node=False)
    assert config.reduce
    return elogitnorm.elogitnorm_loss(z, w, y, reduction=r, ignore_index=-100, eps=DEFAULT_EPS,
                                      divisor=z.shape[1], config=config)


def _logitnorm_blocks(block):
    """A block of rows per program (``block`` columns at a time: with ``block`` < C the
    rows stream and the Python Function returns the loss, else the C++ node does)."""
    return lambda z, w, y, r: triton_backend.logitnorm_loss(
        z, y, tau=DEFAULT_TAU, reduction=r, ignore_index=-100, block_cols=block)


REDUCED = ("mean", "sum")
#: path -> (loss, (N, C, D), logits / weight require grad, call, reductions). ``none``
#: takes one per-row path per kernel; ``sum`` and ``mean`` choose between the others.
TRITON_PATHS = {
    "elogitnorm fused, pooled weight gradient": (
        "elogitnorm", (5, 6, 3), (True, True), _public("triton", "elogitnorm"), REDUCTIONS),
    "elogitnorm fused, logits only": (
        "elogitnorm", (5, 6, 3), (True, False), _public("triton", "elogitnorm"), REDUCED),
    "elogitnorm fused, weight only": (
        "elogitnorm", (5, 6, 3), (False, True), _public("triton", "elogitnorm"), REDUCED),
    "elogitnorm fused, no gradient": (
        "elogitnorm", (5, 6, 3), (False, False), _public("triton", "elogitnorm"),
        ("mean",)),
    "elogitnorm GEMM distances, GEMM weight gradient (C > 128)": (
        "elogitnorm", (4, 130, 2), (True, True), _public("triton", "elogitnorm"),
        REDUCTIONS),
    "elogitnorm GEMM distances, pooled weight gradient (C D > 2^17)": (
        "elogitnorm", (3, 40, 3300), (True, True), _public("triton", "elogitnorm"),
        ("mean",)),
    "elogitnorm streaming columns": (
        "elogitnorm", (5, 9, 3), (True, True), _streaming, REDUCTIONS),
    "elogitnorm Python Function": (
        "elogitnorm", (5, 6, 3), (True, True), _python_function, REDUCED),
    "logitnorm one program": (
        "logitnorm", (5, 6, 1), (True, False), _public("triton", "logitnorm"), REDUCTIONS),
    "logitnorm one program, no gradient": (
        "logitnorm", (5, 6, 1), (False, False), _public("triton", "logitnorm"), ("mean",)),
    "logitnorm blocks of rows (N C > 32768)": (
        "logitnorm", (34, 1000, 1), (True, False), _public("triton", "logitnorm"),
        ("mean",)),
    "logitnorm blocks, rows on chip": (
        "logitnorm", (5, 6, 1), (True, False), _logitnorm_blocks(8), REDUCED),
    "logitnorm blocks, streamed rows": (
        "logitnorm", (5, 9, 1), (True, False), _logitnorm_blocks(4), REDUCED),
}
_CASES = [(path, reduction) for path, spec in TRITON_PATHS.items() for reduction in spec[4]]


@pytest.mark.parametrize("path, reduction", _CASES)
def test_triton_path_may_be_modified_in_place(path, reduction):
    kind, (n, c, d), grads, call, _ = TRITON_PATHS[path]
    logits, weight, target = _case(n, c, d, logits_grad=grads[0], weight_grad=grads[1])
    check_ops(call, kind, logits, weight, target, reduction, ["/=", "*=", "+="])


def test_triton_grad_scaler_with_accumulation():
    check_grad_scaler("triton", enabled_values=(True,))


@settings(max_examples=6, deadline=None)
@given(
    path=st.sampled_from(sorted(p for p in TRITON_PATHS if "C D" not in p)),
    ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=4),
    ignored=st.booleans(),
    seed=st.integers(0, 2 ** 16),
)
def test_triton_any_in_place_sequence_matches_the_reference(path, ops, ignored, seed):
    kind, (n, c, d), grads, call, reductions = TRITON_PATHS[path]
    generator = torch.Generator().manual_seed(seed)
    reduction = reductions[seed % len(reductions)]
    logits, weight, target = _case(n, c, d, logits_grad=grads[0], weight_grad=grads[1],
                                   ignored=ignored, generator=generator)
    check_ops(call, kind, logits, weight, target, reduction, ops, generator=generator)
