"""The fused linear losses never hold N x C: peak extra memory of linear + loss fwd+bwd, each
measured in a fresh process (benchmarks/linear_memory.py), against a bound from the chunk and
the weight, and against the unfused path."""

from __future__ import annotations

import pytest
from linear_memory import measure

import elogitnorm_fast as ef
from elogitnorm_fast.linear_losses import default_chunk_rows

N, C, D = 512, 50_000, 256
#: Chunk-sized fp32 buffers alive at once at most, per backend: logits, their gradient,
#: distance rows and the coefficients built from them, with masks; the torch rows compose eager
#: ops, each with its own chunk-sized temporary.
CHUNK_BUFFERS = {"cpu": 8, "torch": 12}
#: C x D buffers: the weight gradient, the distance term's own where a backend forms it whole,
#: the torch backend's scaled weight.
WEIGHT_BUFFERS = 3
SLACK = 48 * 2**20  # allocator and library working memory


def _bound(chunk: int, backend: str) -> int:
    return CHUNK_BUFFERS[backend] * chunk * C * 4 + WEIGHT_BUFFERS * C * D * 4 + SLACK


@pytest.mark.parametrize(
    ("variant", "backend"),
    [("fused_elogitnorm", "cpu"), ("fused_elogitnorm", "torch"), ("fused_logitnorm", "cpu")],
)
def test_fused_peak_is_bounded_and_below_unfused(variant, backend):
    if ef.unavailable_reason(backend, "cpu") is not None:
        pytest.skip(ef.unavailable_reason(backend, "cpu"))
    fused = measure(variant, backend, N, C, D)
    unfused = measure(variant.replace("fused", "unfused"), backend, N, C, D)
    assert fused["status"] == unfused["status"] == "ok", (fused, unfused)
    extra = fused["peak_extra_bytes"]
    assert extra >= 0, "peak RSS could not be reset on this kernel"
    chunk = default_chunk_rows(N, C, D, 4)
    assert chunk < N  # the default chunks this batch: the bound below is then not N x C
    bound = _bound(chunk, backend)
    assert extra < bound, f"{extra / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB"
    assert extra < unfused["peak_extra_bytes"], (fused, unfused)


def test_explicit_chunk_rows_bound_the_peak():
    chunk_rows = 16
    small = measure("fused_elogitnorm", "torch", N, C, D, chunk_rows=chunk_rows)
    assert small["status"] == "ok", small
    assert small["peak_extra_bytes"] < _bound(chunk_rows, "torch")
