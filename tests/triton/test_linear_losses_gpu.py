"""The fused linear losses on a CUDA device (``triton``, ``cuda`` and ``torch`` rows): parity with
the float64 reference, bf16 features and weight, ``torch.compile(fullgraph=True)``.

GPU-marked: skipped without a CUDA device (the interpreter suite checks the Triton rows' values
on CPU tensors, ``test_linear_losses_interpreted.py``).
"""

from __future__ import annotations

import pytest
import torch
from test_linear_losses import compare_to_float64, fused, grads, make_inputs

import elogitnorm_fast as ef

pytestmark = pytest.mark.gpu
LOSSES = ("elogitnorm", "logitnorm")


def _available(backend: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    reason = ef.unavailable_reason(backend, "cuda", op="linear_losses")
    if reason is not None:
        pytest.skip(reason)


def _cuda_inputs(n, c, d, dtype):
    features, weight, bias, target = make_inputs(n, c, d, "some_ignored")
    leaves = [t.detach().to("cuda", dtype).requires_grad_(True) for t in (features, weight, bias)]
    return (*leaves, target.cuda())


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("shape", [(37, 300, 16), (64, 20_000, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_reference(backend, loss, reduction, shape, dtype):
    _available(backend)
    tolerance = {"rtol": 2e-4, "atol": 2e-5} if dtype == torch.float32 else {"rtol": 2e-2,
                                                                            "atol": 2e-3}
    # The torch backend in float64: the reference's all-pairs form would not fit at C = 20,000.
    compare_to_float64(loss, backend, _cuda_inputs(*shape, dtype), reference="torch",
                       reduction=reduction, chunk_rows=29, **tolerance)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("loss", LOSSES)
def test_compile_fullgraph_matches_eager(backend, loss):
    _available(backend)
    features, weight, bias, target = _cuda_inputs(48, 500, 32, torch.float32)
    torch._dynamo.reset()

    def step(x, w, b, y):
        return fused(loss, x, w, b, y, backend, chunk_rows=17)

    ours = torch.compile(step, fullgraph=True)(features, weight, bias, target)
    eager = step(features, weight, bias, target)
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-6)
    upstream = torch.ones((), device="cuda")
    for value, expected in zip(grads(ours, (features, weight, bias), upstream),
                               grads(eager, (features, weight, bias), upstream), strict=True):
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-6)
