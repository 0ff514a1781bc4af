"""ELogitNorm's weight gradient pooled by predicted class in one launch (``kernels.
class_gradient``), against the float64 torch form on random coefficients."""

from __future__ import annotations

import pytest
import torch

from elogitnorm_fast.geometry import weight_gradient
from elogitnorm_fast.kernels import class_gradient


@pytest.mark.parametrize("n,c,d", [(1, 1, 3), (7, 5, 70), (64, 10, 512), (40, 128, 9),
                                   (20, 100, 70), (3, 100, 1000), (130, 37, 20)])
def test_pooled_weight_gradient_matches_the_torch_form(n, c, d):
    """The one-launch class-pooled dW against geometry.weight_gradient (float64) on random
    coefficients, predicted classes, upstream gradients and ignored rows; W transposed
    (strided). Blocks of 16 classes, the last one partial (C = 5, 37, 100); D split between
    the programs of a block: 8 runs of one tile (C = 10, D = 512), 3 runs of one tile, the
    last partial (C = 100, D = 70), 18 runs of two tiles, the 16th partial and the last two
    empty (C = 100, D = 1000); rows in several scan steps, the last partial (N = 130,
    C = 37)."""
    generator = torch.Generator().manual_seed(n * 1000 + c)
    weight = torch.randn(d, c, generator=generator).t()
    coefficients = torch.randn(n, c, generator=generator)
    predicted = torch.randint(0, c, (n,), generator=generator)
    target = torch.randint(0, c, (n,), generator=generator)
    target[::3] = -100
    upstream = torch.randn(n, generator=generator)
    grad = class_gradient.pooled_weight_gradient(weight, coefficients, predicted, upstream,
                                                 target, ignore_index=-100)
    g = torch.where(target != -100, upstream, torch.zeros(())).double()
    expected = weight_gradient(weight.double(), weight.double(), False, predicted,
                               coefficients.double() * g[:, None])
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-5)
    # upstream None: the forward's unit upstream gradient, 1 on every valid row.
    unit_grad = class_gradient.pooled_weight_gradient(weight, coefficients, predicted, None,
                                                      target, ignore_index=-100)
    ones = class_gradient.pooled_weight_gradient(weight, coefficients, predicted,
                                                 torch.ones(n), target, ignore_index=-100)
    assert torch.equal(unit_grad, ones)
    # One program per block of classes (D not split): the same sums, each over all of D.
    unsplit = class_gradient.pooled_weight_gradient(
        weight, coefficients, predicted, upstream, target, ignore_index=-100,
        config=class_gradient.PooledConfig(**{**class_gradient.pooled_blocks(c).__dict__,
                                              "target_programs": 0}))
    torch.testing.assert_close(unsplit.double(), expected, rtol=1e-5, atol=1e-5)


def test_pooled_weight_gradient_refuses_large_c():
    with pytest.raises(ValueError, match="C <= 128"):
        class_gradient.pooled_weight_gradient(
            torch.zeros(129, 2), torch.zeros(3, 129), torch.zeros(3, dtype=torch.int64),
            torch.ones(3), torch.zeros(3, dtype=torch.int64), ignore_index=-100)


def test_pooled_only_for_few_classes_and_rows():
    """Each program scans all N x C coefficients: past the scan budget (C = 100: 1024 rows;
    C <= 16: 4096) and past 128 classes, the GEMMs form dW."""
    assert class_gradient.pooled_config(1024, 100) is not None
    assert class_gradient.pooled_config(1025, 100) is None
    assert class_gradient.pooled_config(4096, 16) is not None
    assert class_gradient.pooled_config(4097, 16) is None
    assert class_gradient.pooled_config(1, 129) is None
