"""Feature shaping against direct implementations of each paper's formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from elogitnorm_fast.scoring import (
    ASH,
    SCALE,
    ReAct,
    ash_b,
    ash_p,
    ash_s,
    react,
    scale_features,
    shaped_energy,
)
from elogitnorm_fast.scoring.shaping import percentile


def _relu_features(n=20, d=64, dtype=torch.float64):
    return torch.relu(torch.randn(n, d, dtype=dtype)) * 2


def _kept(d, pct):
    return d - int(np.round(d * pct / 100.0))


def direct_ash(x, pct, mode):
    """Per-sample loop over the ASH paper's rule (Djurisic et al. 2023, Alg. 1)."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        row = x[n]
        k = _kept(row.numel(), pct)
        order = torch.argsort(row, descending=True, stable=True)[:k]
        total = row.sum()
        if mode == "p":
            out[n, order] = row[order]
        elif mode == "b":
            out[n, order] = total / k
        else:
            out[n, order] = row[order] * torch.exp(total / row[order].sum())
    return out


@pytest.mark.parametrize("pct", [50, 65, 90, 95])
def test_react_threshold_is_numpy_percentile(pct):
    feats = _relu_features(100, 37)
    shaping = ReAct(pct).fit(feats)
    assert shaping.threshold == pytest.approx(np.percentile(feats.numpy(), pct), rel=1e-12)
    test = _relu_features(10, 37) * 3
    expected = torch.minimum(test, torch.tensor(shaping.threshold, dtype=test.dtype))
    torch.testing.assert_close(shaping(test), expected)
    torch.testing.assert_close(react(test, shaping.threshold), expected)


def test_percentile_float32_and_edges():
    values = torch.randn(1001)
    assert percentile(values, 0) == pytest.approx(float(values.min()))
    assert percentile(values, 100) == pytest.approx(float(values.max()))
    assert percentile(values, 37.5) == pytest.approx(np.percentile(values.numpy(), 37.5), rel=1e-6)
    with pytest.raises(ValueError, match="percentile"):
        percentile(values, 101)


@pytest.mark.parametrize("mode", ["p", "b", "s"])
@pytest.mark.parametrize("pct", [65, 90])
def test_ash_matches_direct_loop(mode, pct):
    feats = _relu_features(15, 50) + torch.linspace(0, 1e-3, 50, dtype=torch.float64)
    fn = {"p": ash_p, "b": ash_b, "s": ash_s}[mode]
    torch.testing.assert_close(fn(feats, pct), direct_ash(feats, pct, mode))
    torch.testing.assert_close(ASH(pct, mode)(feats), direct_ash(feats, pct, mode))


def test_ash_keeps_feature_map_shape_and_sum_for_b():
    maps = torch.relu(torch.randn(4, 8, 3, 3, dtype=torch.float64))
    out = ash_b(maps, 80)
    assert out.shape == maps.shape
    torch.testing.assert_close(out.sum(dim=(1, 2, 3)), maps.sum(dim=(1, 2, 3)))


@pytest.mark.parametrize("pct", [65, 85])
def test_scale_matches_formula(pct):
    feats = _relu_features(12, 40)
    k = _kept(40, pct)
    top = torch.topk(feats, k, dim=1).values
    expected = feats * torch.exp(feats.sum(1) / top.sum(1))[:, None]
    torch.testing.assert_close(scale_features(feats, pct), expected)
    torch.testing.assert_close(SCALE(pct)(feats), expected)


def test_energy_with_head():
    feats = _relu_features(9, 16)
    weight = torch.randn(5, 16, dtype=torch.float64)
    bias = torch.randn(5, dtype=torch.float64)
    shaping = ReAct(80).fit(feats)
    shaped = torch.clamp(feats, max=shaping.threshold)
    expected = torch.logsumexp(shaped @ weight.T + bias, dim=1)
    torch.testing.assert_close(shaping.energy(feats, weight, bias), expected)
    torch.testing.assert_close(shaped_energy(shaped, weight, bias), expected)
    torch.testing.assert_close(
        shaped_energy(shaped, weight, None, temperature=2.0),
        2.0 * torch.logsumexp(shaped @ weight.T / 2.0, dim=1),
    )


def test_unfitted_react_and_bad_arguments():
    with pytest.raises(RuntimeError, match="not fitted"):
        ReAct(90)(torch.rand(2, 3))
    with pytest.raises(ValueError, match="mode"):
        ASH(90, mode="x")
    with pytest.raises(ValueError, match="percentile"):
        ReAct(120)
    with pytest.raises(ValueError, match="features"):
        ash_p(torch.rand(5), 50)


def test_inputs_not_modified():
    feats = _relu_features(5, 10)
    before = feats.clone()
    for fn in (ash_p, ash_b, ash_s, scale_features):
        fn(feats, 70)
    assert torch.equal(feats, before)
