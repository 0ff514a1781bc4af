"""Activation shaping before the classifier head: ReAct, ASH-P / ASH-B / ASH-S, SCALE.

Features ``h`` are the penultimate activations (N x D; trailing dimensions, e.g. a C x H x W
feature map, are flattened per sample and the output keeps the input's shape). Each shaping
returns the shaped features; given the head ``(W, b)`` (``W``: K x D, ``b``: K or None) the
score is the energy of the shaped features, ``logsumexp(W h' + b)`` (higher = more ID), see
:func:`shaped_energy`.

* ReAct (Sun, Guo & Li, NeurIPS 2021): ``h' = min(h, c)`` with ``c`` the ``percentile``-th
  percentile (default 90) of **all** ID activations (``numpy.percentile``'s linear
  interpolation), fitted once on ID features.
* ASH (Djurisic et al., ICLR 2023), per sample, ``k = D - round(D * percentile / 100)`` largest
  activations kept (``torch.topk``; ties broken by topk's order), the rest set to 0:
  ASH-P keeps their values; ASH-B sets each kept entry to ``s1 / k`` with ``s1 = sum(h)``;
  ASH-S multiplies the kept values by ``exp(s1 / s2)``, ``s2`` the sum of the kept values.
* SCALE (Xu et al., ICLR 2024): ``h' = h * exp(s1 / s2)``, ``s1``, ``s2`` as in ASH-S, no
  pruning.

ASH and SCALE have no ID statistic (their percentile is per sample); their ``fit`` only checks
and returns ``self`` so every shaping has the same interface. Defaults follow OpenOOD v1.5
(ReAct 90, ASH 90, SCALE 85).

Example::

    react = ReAct(percentile=90).fit(id_features)
    scores = react.energy(test_features, head.weight, head.bias)
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "react",
    "ash_p",
    "ash_b",
    "ash_s",
    "scale_features",
    "shaped_energy",
    "percentile",
    "ReAct",
    "ASH",
    "SCALE",
]


def _check_percentile(value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {value}")
    return value


def _flat(features: torch.Tensor) -> torch.Tensor:
    if features.dim() < 2:
        raise ValueError(f"features must be (N, D, ...), got shape {tuple(features.shape)}")
    return features.reshape(features.shape[0], -1)


def percentile(values: torch.Tensor, q: float, name: str = "values") -> float:
    """``numpy.percentile(values, q)`` (linear interpolation) with two k-th value selections.

    ``values`` must be non-empty and finite: a NaN or inf would be sorted among the activations
    and silently move the threshold, so it raises ``ValueError`` naming ``name`` and the count.
    """
    q = _check_percentile(q)
    flat = values.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        raise ValueError(f"{name} is empty: cannot take a percentile of no values")
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    if flat.is_floating_point() and not bool(torch.isfinite(flat).all()):
        nan = int(torch.isnan(flat).sum())
        kind, count = ("NaN", nan) if nan else ("inf", int(torch.isinf(flat).sum()))
        raise ValueError(f"{name} contains {kind} ({count} of {n} values)")
    position = (n - 1) * q / 100.0
    lo = math.floor(position)
    hi = min(lo + 1, n - 1)
    low = float(torch.kthvalue(flat, lo + 1).values)
    if hi == lo or position == lo:
        return low
    high = float(torch.kthvalue(flat, hi + 1).values)
    return low + (high - low) * (position - lo)


def _kept_count(dim: int, pct: float) -> int:
    # ASH's reference code: k = n - int(np.round(n * percentile / 100)); numpy rounds half to
    # even, as Python's round does.
    k = dim - int(round(dim * _check_percentile(pct) / 100.0))
    return max(k, 0)


def react(features: torch.Tensor, threshold: float) -> torch.Tensor:
    """ReAct: clip activations from above at ``threshold``: ``min(h, threshold)``."""
    return features.clamp(max=threshold)


def ash_p(features: torch.Tensor, percentile: float = 90.0) -> torch.Tensor:
    """ASH-P: keep the top ``100 - percentile`` % activations per sample, zero the rest."""
    flat = _flat(features)
    k = _kept_count(flat.shape[1], percentile)
    values, index = torch.topk(flat, k, dim=1)
    out = torch.zeros_like(flat).scatter_(1, index, values)
    return out.reshape(features.shape)


def ash_b(features: torch.Tensor, percentile: float = 90.0) -> torch.Tensor:
    """ASH-B: kept entries set to ``sum(h) / k`` (the sample's total, spread evenly), rest 0."""
    flat = _flat(features)
    k = _kept_count(flat.shape[1], percentile)
    total = flat.sum(dim=1, keepdim=True)
    _, index = torch.topk(flat, k, dim=1)
    fill = (total / max(k, 1)).expand(-1, k).to(flat.dtype)
    out = torch.zeros_like(flat).scatter_(1, index, fill)
    return out.reshape(features.shape)


def _sum_ratio(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``s1 / s2`` per row (s1 the row's sum, s2 that of its ``k`` largest entries), the kept
    values and their indices. An all-zero row gets ratio 0: ``s1 / s2`` is 0 / 0 there, while
    ``h * exp(s1 / s2)`` tends to the zero row as ``h`` tends to it (for non-negative rows the
    ratio stays in ``[1, D / k]``), so any finite ratio gives that limit."""
    values, index = torch.topk(flat, k, dim=1)
    total = flat.sum(dim=1)
    kept = values.sum(dim=1)
    zero_row = (flat == 0).all(dim=1)
    ratio = torch.where(zero_row, torch.zeros_like(total), total / kept)
    return ratio, values, index


def _ash_s_parts(features: torch.Tensor, percentile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ASH-S as ``(pruned rows (N x D'), s1 / s2 per row)``: the shaped rows are
    ``pruned * exp(ratio)``."""
    flat = _flat(features)
    k = _kept_count(flat.shape[1], percentile)
    if k == 0:  # everything pruned: zero rows, whatever the factor
        return torch.zeros_like(flat), flat.new_zeros(flat.shape[0])
    ratio, values, index = _sum_ratio(flat, k)
    return torch.zeros_like(flat).scatter_(1, index, values), ratio


def _scale_parts(features: torch.Tensor, percentile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SCALE as ``(rows (N x D'), s1 / s2 per row)``; the shaped rows are ``rows * exp(ratio)``."""
    flat = _flat(features)
    k = _kept_count(flat.shape[1], percentile)
    if k == 0:
        raise ValueError(
            f"percentile={float(percentile)} keeps no activation of {flat.shape[1]} per sample "
            "(SCALE needs at least one: lower the percentile)"
        )
    ratio, _, _ = _sum_ratio(flat, k)
    return flat, ratio


def ash_s(features: torch.Tensor, percentile: float = 90.0) -> torch.Tensor:
    """ASH-S: prune like ASH-P, then multiply by ``exp(s1 / s2)`` (s1 before, s2 after).

    An all-zero row stays zero (the limit of the formula, which reads 0 / 0 there); a
    ``percentile`` that keeps no entry of the row prunes everything and returns zeros. The
    factor overflows float32 for ``s1 / s2 > 88`` (only when fewer than 1/88 of non-negative
    activations are kept); :meth:`ASH.energy` applies it to the head's output in float64.
    """
    pruned, ratio = _ash_s_parts(features, percentile)
    return (pruned * torch.exp(ratio)[:, None]).reshape(features.shape)


def scale_features(features: torch.Tensor, percentile: float = 85.0) -> torch.Tensor:
    """SCALE: ``h * exp(s1 / s2)`` with ASH-S's sum ratio, no pruning.

    An all-zero row stays zero (the formula's limit). ``ValueError`` when ``percentile`` keeps
    no entry of a row of ``D`` features (``s2`` would be an empty sum). For factors beyond
    float32 see :func:`ash_s`; :meth:`SCALE.energy` applies it in float64.
    """
    rows, ratio = _scale_parts(features, percentile)
    return (rows * torch.exp(ratio)[:, None]).reshape(features.shape)


def _scaled_energy(
    rows: torch.Tensor,
    ratio: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """``shaped_energy(rows * exp(ratio)[:, None], ...)`` with the factor applied to ``W rows``
    (N x K) in float64, so a factor beyond float32 (or an inf - inf in the GEMM) cannot turn a
    representable energy into inf or NaN. Returns the dtype :func:`shaped_energy` would."""
    acc = torch.float64 if torch.float64 in (rows.dtype, weight.dtype) else torch.float32
    head = (rows.to(acc) @ weight.detach().to(acc).T).to(torch.float64)
    logits = torch.exp(ratio.to(torch.float64))[:, None] * head
    if bias is not None:
        logits = logits + bias.detach().to(torch.float64)
    return (temperature * torch.logsumexp(logits / temperature, dim=1)).to(acc)


def shaped_energy(
    shaped: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Energy score ``T * logsumexp((W h' + b) / T)`` of shaped features (N,), higher = more ID.

    Computed in float32 at least (float64 for float64 inputs); the head is not modified.
    """
    acc = torch.float64 if torch.float64 in (shaped.dtype, weight.dtype) else torch.float32
    flat = _flat(shaped).to(acc)
    logits = flat @ weight.detach().to(acc).T
    if bias is not None:
        logits = logits + bias.detach().to(acc)
    return temperature * torch.logsumexp(logits / temperature, dim=1)


class _Shaping:
    """Common interface: ``fit(id_features) -> self``, ``__call__(h)``, ``energy(h, W, b)``."""

    def __init__(self, percentile: float):
        self.percentile = _check_percentile(percentile)

    def fit(self, id_features: torch.Tensor | None = None) -> _Shaping:
        return self

    @property
    def is_fitted(self) -> bool:
        return True

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def energy(
        self,
        features: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Energy of the shaped features under the head ``(weight, bias)``."""
        return shaped_energy(self(features), weight, bias, temperature)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(percentile={self.percentile})"


class ReAct(_Shaping):
    """ReAct, fitted once: ``threshold`` = ``percentile`` of all ID activations."""

    def __init__(self, percentile: float = 90.0, threshold: float | None = None):
        super().__init__(percentile)
        if threshold is not None and math.isnan(float(threshold)):
            raise ValueError(f"threshold must be a number, got {threshold}")
        self.threshold = None if threshold is None else float(threshold)

    def fit(self, id_features: torch.Tensor) -> ReAct:
        """Set :attr:`threshold` to the ``percentile`` of all ``id_features`` (finite values,
        ``ValueError`` naming ``id_features`` otherwise); returns ``self``."""
        self.threshold = percentile(id_features, self.percentile, name="id_features")
        return self

    @property
    def is_fitted(self) -> bool:
        return self.threshold is not None

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        if self.threshold is None:
            raise RuntimeError("ReAct is not fitted: call fit(id_features) or pass threshold=")
        return react(features, self.threshold)


class ASH(_Shaping):
    """ASH with ``mode`` "p" (prune), "b" (binarize) or "s" (scale); nothing to fit."""

    MODES = {"p": ash_p, "b": ash_b, "s": ash_s}

    def __init__(self, percentile: float = 90.0, mode: str = "s"):
        super().__init__(percentile)
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {tuple(self.MODES)}, got {mode!r}")
        self.mode = mode

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return self.MODES[self.mode](features, self.percentile)

    @torch.no_grad()
    def energy(
        self,
        features: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Energy of the shaped features under the head; ASH-S applies its factor to the
        head's output in float64 (see :func:`ash_s`)."""
        if self.mode != "s":
            return super().energy(features, weight, bias, temperature)
        return _scaled_energy(*_ash_s_parts(features, self.percentile), weight, bias,
                              temperature)

    def __repr__(self) -> str:
        return f"ASH(percentile={self.percentile}, mode={self.mode!r})"


class SCALE(_Shaping):
    """SCALE: ``h * exp(s1 / s2)``; nothing to fit."""

    def __init__(self, percentile: float = 85.0):
        super().__init__(percentile)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return scale_features(features, self.percentile)

    @torch.no_grad()
    def energy(
        self,
        features: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Energy of the shaped features under the head, the factor applied to the head's
        output in float64 (see :func:`scale_features`)."""
        return _scaled_energy(*_scale_parts(features, self.percentile), weight, bias,
                              temperature)
