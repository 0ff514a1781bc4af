"""Logit-based OOD scores (higher = more in-distribution), one pass over the logits.

For logits ``z`` (N x C) with ``p = softmax(z)``, ``top`` the first index of the row maximum
and ``o = sum_{j != top} exp(z_j - z_top)`` (so ``p_top = 1 / (1 + o)``):

* ``msp``        the **log-odds of the maximum softmax probability** (Hendrycks & Gimpel
                 2017), ``log(p_top / (1 - p_top)) = -log(o)``. It is a strictly
                 increasing function of ``p_top``, so AUROC, AUPR
                 and FPR@TPR equal those of the max softmax probability, and it stays resolved
                 where ``p_top`` rounds to 1 (float32 does so from a margin of about 17, float64
                 from about 37; confident models reach that on most ID samples). The probability
                 is ``torch.sigmoid(msp)``.
* ``max_logit``  ``max_j z_j`` (Hendrycks et al. 2022).
* ``energy``     ``T * logsumexp(z / T)`` (Liu et al. 2020; the negative free energy), T=1.
* ``entropy``    ``-log H(p)`` with ``H(p) = -sum_j p_j log p_j``: a strictly increasing
                 function of the negated entropy ``-H`` (same ranking metrics), resolved where
                 ``H`` underflows or ``1 - p_top`` rounds away. ``H = exp(-entropy)``.
* ``gen``        ``-log G`` with ``G = sum_{j in top-M} p_j^gamma (1 - p_j)^gamma`` over the
                 ``M = min(top_m, C)`` largest probabilities (generalized entropy, Liu, Lochman
                 & Zach, CVPR 2023; gamma=0.1, top_m=100 as in the paper and OpenOOD). The
                 paper's score is ``-G = -exp(-gen)``; ``-log G`` ranks exactly like it and does
                 not saturate at 0 for confident rows.

The three bounded scores are returned in these log forms because their natural values round
to their bound for confident models (``p_top == 1.0`` in float32 for most ID samples of a
well-trained network), which turns distinct samples into ties and changes the metrics.

How: one pass per row keeps the maximum ``m1``, the largest of the other entries ``m2`` (a
tie for the maximum makes ``m2 = m1``), ``R = sum_{j != top} exp(z_j - m2)`` (``>= 1``),
``B = sum_{j != top} exp(z_j - m2) (m2 - z_j)`` and, for ``T != 1``, ``S_T``. Shifting by
``m2`` instead of ``m1`` keeps ``o = exp(m2 - m1) R`` in log form, ``log o = m2 - m1 + log R``,
so no margin underflows it. Then, in float64 from these per-row numbers::

    msp     = (m1 - m2) - log R
    energy  = m1 + log1p(o)                     (T = 1; else m1 + T log S_T)
    entropy = (m1 - m2) - log R - log(L(o) + (m1 - m2 + B / R) / (1 + o)),  L(o) = log1p(o) / o
    gen     = -logsumexp_j gamma (log p_j + log(1 - p_j))   over the top-M entries, with
              log(1 - p_top) = log o - log1p(o) for the maximum

(``H = exp(m2 - m1) [R L(o) + ((m1 - m2) R + B) / (1 + o)]``: a sum of non-negative terms, no
cancellation). GEN needs the top-M entries: the C++ op selects them per row while the row is in
cache; the Triton and torch paths use ``torch.topk`` on the logits (a second read of the
logits, only when GEN is requested; see kernels/logit_scores.py).

Infinite and NaN logits (every backend gives the same): ``-inf`` entries have probability 0
(masked classes). ``+inf`` entries share the probability equally and every finite entry has 0
(the limit of scaling them up together), so a row with one ``+inf`` has ``msp = entropy = gen =
+inf`` and ``energy = max_logit = +inf``. Equal infinite entries tie like equal finite ones: an
all ``-inf`` row is read as uniform (``msp = -log(C - 1)``) with ``energy = max_logit = -inf``.
With a single class (C = 1) ``msp``, ``entropy`` and ``gen`` are ``+inf`` (``p_top = 1``).
A NaN anywhere in a row makes all five of its scores NaN. ``msp``, ``entropy`` and ``gen`` are
finite for every finite row with C >= 2 whose margin ``m1 - m2`` is below the float range of
the result (3.4e38 for float32).

Backends (``backend=``, the names of :mod:`elogitnorm_fast.backends`, op family
``"logit_scores"``; ``docs/backends.md``):

* ``"triton"``: the Triton kernel (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
* ``"cpu"``: the C++ op ``torch.ops.elogitnorm_fast.logit_scores`` (CPU tensors, extension built).
* ``"torch"``: plain PyTorch, chunked over rows so no N x C float32 softmax is materialised.
* ``"auto"`` (default): triton for CUDA tensors when it can run, the C++ op for CPU tensors
  when it is built, torch otherwise. :func:`resolve_backend` tells which one runs;
  ``elogitnorm_fast.unavailable_reason(name, device, op="logit_scores")`` why one cannot.

fp16 / bf16 logits are read as they are and accumulated in float32; results are float32 (float64
for float64 logits). No gradients (scores are for evaluation); inputs are never modified.

Example::

    scores = logit_scores(logits, names=("msp", "energy", "gen"))   # dict of (N,) tensors
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from ..backends import IMPLEMENTS
from ..backends import resolve_backend as _resolve
from ..geometry import accumulation_dtype
from ..validation import check_count

__all__ = [
    "SCORE_NAMES",
    "BACKENDS",
    "logit_scores",
    "msp",
    "max_logit",
    "energy",
    "gen",
    "entropy_score",
    "resolve_backend",
]

#: Scores :func:`logit_scores` can compute, in the canonical order used by every backend.
SCORE_NAMES = ("msp", "max_logit", "energy", "entropy", "gen")
#: Values of ``backend=``: ``"auto"`` and the backends that implement logit scores.
BACKENDS = ("auto", *IMPLEMENTS["logit_scores"])
DEFAULT_GAMMA = 0.1
DEFAULT_TOP_M = 100
#: Elements per row chunk of the torch path when ``chunk_rows`` is not given (float32: 16 MiB
#: per temporary).
CHUNK_ELEMENTS = 1 << 22


def resolve_backend(logits: torch.Tensor, backend: str = "auto") -> str:
    """The name of the backend :func:`logit_scores` uses for these logits (the registry's
    :func:`elogitnorm_fast.resolve_backend` for op family ``"logit_scores"``; raises like it
    when a named one cannot run)."""
    return _resolve(backend, logits.device, op="logit_scores").NAME


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _normalise_names(names: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(names, str):
        names = (names,)
    names = tuple(names)
    aliases = {"entropy_score": "entropy", "maxlogit": "max_logit", "mls": "max_logit"}
    names = tuple(dict.fromkeys(aliases.get(n, n) for n in names))  # first mention wins
    unknown = [n for n in names if n not in SCORE_NAMES]
    if unknown or not names:
        raise ValueError(f"names must be a non-empty subset of {SCORE_NAMES}, got {names}")
    return names


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits)}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (N, C), got shape {tuple(logits.shape)}")
    if logits.shape[1] == 0:
        raise ValueError("logits must have at least one class (C >= 1), got C = 0")
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"logits must be a floating dtype, got {logits.dtype}")


# --------------------------------------------------------------------------------------------
# per-row statistics -> scores (shared by the torch and triton paths)
# --------------------------------------------------------------------------------------------


def _row_stats(z: torch.Tensor, inv_t: float, want_t: bool) -> tuple[torch.Tensor, ...]:
    """``(m1, m2, R, B, S_T)`` per row of ``z`` (module docstring), in ``z``'s dtype; ``m1`` is
    NaN for a row holding a NaN.

    Rows whose two largest entries are finite take a short path (the first maximum's slot set
    to ``-inf`` contributes ``exp(-inf) = 0``); the rest (infinite or NaN entries at the top, a
    single class) are redone by :func:`_row_stats_exact`, which has the tie rules.
    """
    m1, where = z.max(dim=1, keepdim=True)  # NaN propagates
    rest = z.scatter(1, where, float("-inf"))
    m2 = rest.amax(dim=1, keepdim=True)
    e = torch.exp(rest - m2)
    r = e.sum(dim=1)
    b = -torch.xlogy(e, e).sum(dim=1)  # sum e (m2 - z) with e log e = 0 where e = 0
    st = torch.exp((z - m1) * inv_t).sum(dim=1) if want_t else torch.zeros_like(r)
    special = ~(torch.isfinite(m1) & torch.isfinite(m2)).squeeze(1)
    if bool(special.any()):
        rows = special.nonzero().squeeze(1)
        _, _, r[rows], b[rows], st[rows] = _row_stats_exact(z[rows], inv_t, want_t)
    return m1.squeeze(1), m2.squeeze(1), r, b, st


def _row_stats_exact(z: torch.Tensor, inv_t: float, want_t: bool) -> tuple[torch.Tensor, ...]:
    """:func:`_row_stats` for any row: equal values (infinite ones too) are 0 apart, and only
    the other entries (not the first maximum's slot) are summed."""
    neg_inf = float("-inf")
    m1, where = z.max(dim=1, keepdim=True)
    others = torch.ones_like(z, dtype=torch.bool).scatter_(1, where, False)
    rest = z.masked_fill(~others, neg_inf)
    m2 = rest.amax(dim=1, keepdim=True)
    d = torch.where(rest == m2, 0.0, rest - m2)
    e = torch.where(others, torch.exp(d), 0.0)
    r = e.sum(dim=1)
    b = torch.where(e > 0, e * -d, 0.0).sum(dim=1)
    st = torch.zeros_like(r)
    if want_t:
        st = torch.exp(torch.where(z == m1, 0.0, z - m1) * inv_t).sum(dim=1)
    return m1.squeeze(1), m2.squeeze(1), r, b, st


class _Finished:
    """The float64 quantities every score is read from, per row."""

    def __init__(self, m1, m2, r, b, st) -> None:
        m1, m2, r, b, st = (t.to(torch.float64) for t in (m1, m2, r, b, st))
        self.nan = torch.isnan(m1)
        self.m1 = m1
        self.gap = torch.where(m1 == m2, 0.0, m1 - m2)  # m1 - m2 >= 0, or +inf
        self.r = r
        self.b = b
        self.st = st
        # log o = m2 - m1 + log R (-inf with no other class or an infinite margin)
        self.log_o = torch.where(
            (r == 0) | torch.isinf(self.gap), float("-inf"), torch.log(r) - self.gap
        )
        self.o = torch.exp(self.log_o)
        self.log1p_o = torch.log1p(self.o)  # log of the softmax normaliser relative to m1

    def _nan(self, values: torch.Tensor) -> torch.Tensor:
        return torch.where(self.nan, float("nan"), values)

    def msp(self) -> torch.Tensor:
        return self._nan(-self.log_o)

    def max_logit(self) -> torch.Tensor:
        return self._nan(self.m1)

    def energy(self, temperature: float) -> torch.Tensor:
        if temperature == 1.0:
            return self._nan(self.m1 + self.log1p_o)
        return self._nan(self.m1 + temperature * torch.log(self.st))

    def entropy(self) -> torch.Tensor:
        o = self.o
        ratio = torch.where(o > 0, self.log1p_o / o, 1.0)  # log1p(o) / o -> 1 as o -> 0
        safe_r = torch.where(self.r > 0, self.r, 1.0)
        inner = ratio + (self.gap + self.b / safe_r) / (1.0 + o)
        value = self.gap - torch.log(safe_r) - torch.log(inner)
        # H = 0 (one class, or one +inf logit): -log H = +inf
        degenerate = (self.r == 0) | torch.isinf(self.gap)
        return self._nan(torch.where(degenerate, float("inf"), value))

    def gen(self, top_values: torch.Tensor, gamma: float) -> torch.Tensor:
        """``-log G`` from the ``M`` largest logits of each row, largest first (n x M)."""
        top = top_values.to(torch.float64)
        m1 = self.m1[:, None]
        d = torch.where(top == m1, 0.0, top - m1)
        log_p = d - self.log1p_o[:, None]
        # p <= 1/2 for every entry but the first maximum: -expm1 is exact there
        log_terms = gamma * (log_p + torch.log(-torch.expm1(log_p)))
        first = gamma * (self.log_o - 2.0 * self.log1p_o)
        log_terms = torch.cat([first[:, None], log_terms[:, 1:]], dim=1)
        return self._nan(-torch.logsumexp(log_terms, dim=1))


def _top_values(z: torch.Tensor, top_m: int) -> torch.Tensor:
    """The ``min(top_m, C)`` largest entries of each row, largest first."""
    return torch.topk(z, min(top_m, z.shape[1]), dim=1, sorted=True).values


def _scores_from(
    finished: _Finished, names, temperature: float, gen_values
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if name == "msp":
            out[name] = finished.msp()
        elif name == "max_logit":
            out[name] = finished.max_logit()
        elif name == "energy":
            out[name] = finished.energy(temperature)
        elif name == "entropy":
            out[name] = finished.entropy()
        else:
            out[name] = gen_values()
    return out


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------


def _torch_scores(logits, names, temperature, gamma, top_m, rows) -> dict[str, torch.Tensor]:
    n_rows = logits.shape[0]
    acc = accumulation_dtype(logits)
    out = {name: torch.empty(n_rows, dtype=acc, device=logits.device) for name in names}
    for start in range(0, n_rows, rows):
        z = logits[start : start + rows].to(acc)
        finished = _Finished(*_row_stats(z, 1.0 / temperature, temperature != 1.0))
        part = _scores_from(
            finished, names, temperature,
            lambda z=z, finished=finished: finished.gen(_top_values(z, top_m), gamma),
        )
        for name in names:
            out[name][start : start + rows] = part[name]
    return out


def _cpu_scores(logits, names, temperature, gamma, top_m, rows) -> dict[str, torch.Tensor]:
    flags = [name in names for name in SCORE_NAMES]
    stacked = torch.ops.elogitnorm_fast.logit_scores(
        logits, *flags, float(temperature), float(gamma), int(top_m)
    )
    # the op's rows come in the canonical order; the caller asked for its own
    canonical = [name for name in SCORE_NAMES if name in names]
    return {name: stacked[canonical.index(name)] for name in names}


def _gen_chunked(logits, stats, gamma: float, top_m: int, acc, rows: int) -> torch.Tensor:
    """GEN from the kernel's per-row ``stats`` and ``torch.topk`` of the logits, by row chunks."""
    n_rows = logits.shape[0]
    out = torch.empty(n_rows, dtype=torch.float64, device=logits.device)
    for start in range(0, n_rows, rows):
        sl = slice(start, start + rows)
        part = _Finished(*(t[sl] for t in stats))
        out[sl] = part.gen(_top_values(logits[sl].to(acc), top_m), gamma)
    return out


def _triton_scores(logits, names, temperature, gamma, top_m, rows) -> dict[str, torch.Tensor]:
    from elogitnorm_fast.kernels.logit_scores import logit_row_stats

    stats = logit_row_stats(logits, float(temperature))  # (5, N): m1, m2, R, B, S_T
    acc = accumulation_dtype(logits)
    raw = tuple(stats[k] for k in range(5))
    out = _scores_from(
        _Finished(*raw), names, temperature,
        # second path (documented): the top-M selection is not done in the streaming kernel
        lambda: _gen_chunked(logits, raw, gamma, top_m, acc, rows),
    )
    return {name: value.to(acc) for name, value in out.items()}


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def logit_scores(
    logits: torch.Tensor,
    names: str | Sequence[str] = ("msp", "max_logit", "energy", "entropy"),
    *,
    temperature: float = 1.0,
    gamma: float = DEFAULT_GAMMA,
    top_m: int = DEFAULT_TOP_M,
    backend: str = "auto",
    chunk_rows: int | None = None,
) -> dict[str, torch.Tensor]:
    """Several logit scores in one pass over ``logits`` (N x C); returns ``{name: (N,) tensor}``.

    ``names`` is any non-empty subset of :data:`SCORE_NAMES` (``"msp"``, ``"max_logit"``,
    ``"energy"``, ``"entropy"``, ``"gen"``); the dict's keys come in the order asked (a repeated
    name once). ``temperature`` (finite, > 0) is the energy temperature ``T``; ``gamma`` (finite,
    > 0) and ``top_m`` (integer >= 1) are GEN's. ``msp``, ``entropy`` and ``gen`` are returned in
    log forms that rank exactly like the textbook scores; the module docstring gives every
    formula, the values on infinite / NaN logits and ``backend``. Higher = more
    in-distribution for every score.

    ``chunk_rows`` (integer >= 1; default: about ``CHUNK_ELEMENTS / C``) bounds the rows the
    torch path (and the triton path's GEN) processes at once, hence its temporary memory. Every
    row is computed on its own, so it never changes the results.
    """
    _check_logits(logits)
    names = _normalise_names(names)
    for label, value in (("temperature", temperature), ("gamma", gamma)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
            0 < value < math.inf
        ):
            raise ValueError(f"{label} must be a finite number > 0, got {value!r}")
    top_m = check_count("top_m", top_m)
    check_count("chunk_rows", chunk_rows, optional=True)
    temperature, gamma = float(temperature), float(gamma)
    chosen = resolve_backend(logits, backend)
    rows = max(1, CHUNK_ELEMENTS // logits.shape[1]) if chunk_rows is None else int(chunk_rows)
    with torch.no_grad():
        if logits.shape[0] == 0:
            acc = accumulation_dtype(logits)
            return {n: torch.empty(0, dtype=acc, device=logits.device) for n in names}
        if chosen == "cpu":
            return _cpu_scores(logits, names, temperature, gamma, top_m, rows)
        if chosen == "triton":
            return _triton_scores(logits, names, temperature, gamma, top_m, rows)
        return _torch_scores(logits, names, temperature, gamma, top_m, rows)


def msp(logits: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Maximum softmax probability (Hendrycks & Gimpel, ICLR 2017) as its log-odds.

    Returns ``log(p / (1 - p))`` for ``p = max_j softmax(z)_j``, i.e.
    ``-log(sum_{j != top} exp(z_j - z_top))``, computed without forming ``p``. The map from
    ``p`` is strictly increasing, so every ranking metric (AUROC, AUPR, FPR@TPR) equals that of
    the exact maximum softmax probability, also where ``p`` rounds to 1 in float32 / float64.
    ``torch.sigmoid(msp(z))`` is the probability. ``+inf`` for C = 1 or a row with one ``+inf``.
    """
    return logit_scores(logits, ("msp",), backend=backend)["msp"]


def max_logit(logits: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Maximum logit ``max_j z_j`` (Hendrycks et al., ICML 2022)."""
    return logit_scores(logits, ("max_logit",), backend=backend)["max_logit"]


def energy(
    logits: torch.Tensor, temperature: float = 1.0, *, backend: str = "auto"
) -> torch.Tensor:
    """Energy score ``T * logsumexp(z / T)`` (Liu et al., NeurIPS 2020), higher = more ID."""
    return logit_scores(logits, ("energy",), temperature=temperature, backend=backend)["energy"]


def gen(
    logits: torch.Tensor,
    gamma: float = DEFAULT_GAMMA,
    top_m: int = DEFAULT_TOP_M,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """GEN (Liu, Lochman & Zach, CVPR 2023) as ``-log G``, ``G = sum_{j in top-M} p_j^gamma
    (1 - p_j)^gamma``.

    ``p = softmax(z)``, the sum over the ``min(top_m, C)`` largest probabilities. The paper's
    score is ``-G = -exp(-gen)``; ``-log G`` is a strictly increasing function of it (the same
    ranking metrics) that stays resolved for confident rows, where ``G`` underflows.
    Ties among probabilities do not matter (equal p, equal terms).
    """
    return logit_scores(logits, ("gen",), gamma=gamma, top_m=top_m, backend=backend)["gen"]


def entropy_score(logits: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``-log H`` for the Shannon entropy ``H = -sum_j p_j log p_j`` of ``softmax(z)``.

    A strictly increasing function of the negated entropy ``-H`` (higher = more ID, the same
    ranking metrics) that stays resolved for confident rows, where ``H`` underflows or rounds;
    ``exp(-entropy_score(z))`` is the entropy.
    """
    return logit_scores(logits, ("entropy",), backend=backend)["entropy"]
