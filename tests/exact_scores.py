"""Exact logit scores with mpmath (60 significant digits, unbounded exponents): the oracle for
the log-form scores and for rows with infinite logits.

Written from the definitions, independently of the package: the probabilities come from
``exp(z_j - z_top)`` summed in mpmath, ``1 - p_top`` from the sum of the other classes (so it
survives any margin), and the conventions for infinite logits are the documented ones: ``+inf``
entries share the probability equally, an all ``-inf`` row is uniform, NaN gives NaN.
"""

from __future__ import annotations

import math

import mpmath
import torch

NAMES = ("msp", "max_logit", "energy", "entropy", "gen")
_CTX = mpmath.MPContext()
_CTX.dps = 60


def _effective(row: list[float]) -> list:
    """Logits with the same softmax as ``row`` under the documented limits, as mpmath numbers."""
    if any(math.isinf(v) and v > 0 for v in row):
        return [_CTX.mpf(0) if math.isinf(v) and v > 0 else _CTX.ninf for v in row]
    if all(math.isinf(v) for v in row):  # all -inf: equal entries, uniform
        return [_CTX.mpf(0)] * len(row)
    return [_CTX.mpf(v) if math.isfinite(v) else _CTX.ninf for v in row]


def exact_row(row: list[float], temperature=1.0, gamma=0.1, top_m=100) -> dict[str, float]:
    """The five scores of one row (list of floats) as Python floats."""
    if any(math.isnan(v) for v in row):
        return {name: math.nan for name in NAMES}
    ctx = _CTX
    w = _effective(row)
    top = max(range(len(w)), key=lambda j: (w[j], -j))  # first index of the maximum
    rel = [ctx.exp(v - w[top]) for v in w]  # exp(z_j - z_top), 0 for -inf
    others = ctx.fsum(rel[j] for j in range(len(w)) if j != top)
    norm = 1 + others
    log_norm = ctx.log1p(others)
    out: dict[str, float] = {"max_logit": max(row)}
    # energy on the logits themselves: +inf / -inf rows are +inf / -inf
    if any(math.isinf(v) and v > 0 for v in row):
        out["energy"] = math.inf
    elif all(math.isinf(v) for v in row):
        out["energy"] = -math.inf
    else:
        finite = [ctx.mpf(v) for v in row if math.isfinite(v)]
        t = ctx.mpf(temperature)
        out["energy"] = float(t * ctx.log(ctx.fsum(ctx.exp(v / t) for v in finite)))
    out["msp"] = math.inf if others == 0 else float(-ctx.log(others))
    # entropy: H = sum_j p_j (-log p_j), -log p_j = (z_top - z_j) + log(1 + o)
    entropy = ctx.fsum(
        (rel[j] / norm) * ((w[top] - w[j]) + log_norm)
        for j in range(len(w)) if rel[j] != 0 and j != top
    ) + log_norm / norm
    out["entropy"] = math.inf if entropy == 0 else float(-ctx.log(entropy))
    # GEN: the top-M probabilities, 1 - p_top = o / (1 + o)
    order = sorted(range(len(w)), key=lambda j: (-w[j], j))[: min(top_m, len(w))]
    g = ctx.mpf(gamma)
    total = 0
    for j in order:
        p = rel[j] / norm
        q = others / norm if j == top else 1 - p
        if p != 0 and q != 0:
            total += ctx.exp(g * (ctx.log(p) + ctx.log(q)))
    out["gen"] = math.inf if total == 0 else float(-ctx.log(total))
    return out


def exact_scores(logits: torch.Tensor, **options) -> dict[str, torch.Tensor]:
    """:func:`exact_row` of every row, as float64 tensors."""
    rows = [exact_row([float(v) for v in row], **options) for row in logits.double().tolist()]
    return {name: torch.tensor([r[name] for r in rows], dtype=torch.float64) for name in NAMES}
