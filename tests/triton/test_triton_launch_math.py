"""The host's launch arithmetic (``kernels.rows.cdiv`` / ``next_power_of_2``, plain Python in
place of triton's constexpr functions, which cost microseconds a call) agrees with triton's."""

from __future__ import annotations

import importlib.util
import random

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")


def test_cdiv_and_next_power_of_2_match_triton():
    import triton

    from elogitnorm_fast.kernels.rows import cdiv, next_power_of_2

    rng = random.Random(0)
    values = list(range(0, 4100)) + [rng.randrange(1, 1 << 40) for _ in range(2000)]
    values += [(1 << k) + d for k in range(1, 41) for d in (-1, 0, 1)]
    for n in values:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for b in (1, 2, 3, 16, 2048, rng.randrange(1, 1 << 20)):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)
