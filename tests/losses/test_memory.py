"""The torch backend never builds the C x C x D tensor nor the C x C matrix."""

from __future__ import annotations

import pytest

from peak_memory import measure


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_elogitnorm_peak_memory_far_below_class_by_class(backend):
    n, c, d = 32, 16000, 32
    result = measure("elogitnorm", backend, n, c, d)
    assert result["status"] == "ok", result
    extra = result["peak_extra_bytes"]
    assert extra >= 0, "peak RSS could not be reset on this kernel"
    class_by_class = c * c * 4  # one fp32 C x C matrix: 1 GB
    # Outputs alone (grad W: C*D*4 = 2 MB, grad logits: N*C*4 = 2 MB) plus O(N C) temporaries.
    assert extra < class_by_class / 16, f"{extra / 2**20:.1f} MiB extra at N={n} C={c} D={d}"
