"""Logit-based OOD scores (higher = more in-distribution), one pass over the logits.

For logits ``z`` (N x C), with ``p = softmax(z)`` (design.md section 2.3):

* ``msp``        max softmax probability ``max_j p_j`` (Hendrycks & Gimpel 2017).
* ``max_logit``  ``max_j z_j`` (Hendrycks et al. 2022).
* ``energy``     ``T * logsumexp(z / T)`` (Liu et al. 2020; the negative free energy), T=1.
* ``entropy``    ``-H(p) = sum_j p_j log p_j`` (negated entropy, so higher = more ID).
* ``gen``        ``-sum_{j in top-M} p_j^gamma (1 - p_j)^gamma`` over the ``M`` largest
                 probabilities (generalized entropy, Liu, Lochman & Zach, CVPR 2023), gamma=0.1,
                 M = min(top_m, C) with top_m=100 (the paper's / OpenOOD's defaults).

All of them are row reductions: one streaming pass keeps, per row, the running max ``m``,
``S = sum_j exp(z_j - m)``, ``A = sum_j exp(z_j - m) (z_j - m)`` (and ``S_T`` for T != 1), from
which ``msp = 1/S``, ``energy = m + log S``, ``entropy = A/S - log S``. GEN needs the top-M
probabilities, i.e. the normaliser first: the C++ op does it per row while the row is in cache;
the Triton and torch paths use ``torch.topk`` on the logits plus the streamed ``log S`` (a
second read of the logits, only when GEN is requested; see kernels/logit_scores.py).

Backends (``backend=``):

* ``"triton"``: the Triton kernel (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
* ``"cpu"``: the C++ op ``torch.ops.elogitnorm_fast.logit_scores`` (CPU tensors, extension built).
* ``"torch"``: plain PyTorch, chunked over rows so no N x C float32 softmax is materialised.
* ``"auto"`` (default): triton for CUDA tensors when triton imports, the C++ op for CPU tensors
  when it is registered, torch otherwise. :func:`resolve_backend` tells which one runs.

fp16 / bf16 logits are read as they are and accumulated in float32; results are float32 (float64
for float64 logits). No gradients (scores are for evaluation); inputs are never modified.

Example::

    scores = logit_scores(logits, names=("msp", "energy", "gen"))   # dict of (N,) tensors
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import torch

from ..extension import load_error, triton_interpreting
from ..geometry import accumulation_dtype

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
    "cpu_op_available",
    "triton_available",
]

#: Scores :func:`logit_scores` can compute, in the canonical order used by every backend.
SCORE_NAMES = ("msp", "max_logit", "energy", "entropy", "gen")
BACKENDS = ("auto", "torch", "cpu", "triton")
DEFAULT_GAMMA = 0.1
DEFAULT_TOP_M = 100
#: Elements per row chunk of the torch path (float32: 16 MiB per temporary).
_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------
# backend availability
# --------------------------------------------------------------------------------------------


def cpu_op_available() -> bool:
    """True when the compiled extension is loaded and registered the CPU ``logit_scores`` op."""
    if load_error() is not None:
        return False
    try:
        available = torch._C._dispatch_has_kernel_for_dispatch_key(
            "elogitnorm_fast::logit_scores", "CPU"
        )
    except RuntimeError:
        return False
    if available:
        _register_fake()
    return available


_FAKE_REGISTERED = False


def _register_fake() -> None:
    """Shape / dtype rule of the C++ op for fake tensors (torch.compile, opcheck)."""
    global _FAKE_REGISTERED
    if _FAKE_REGISTERED:
        return
    _FAKE_REGISTERED = True

    @torch.library.register_fake("elogitnorm_fast::logit_scores")
    def _logit_scores_fake(logits, msp, max_logit, energy, entropy, gen, temperature, gamma, top_m):
        torch._check(logits.dim() == 2, lambda: "logits must be 2-D")
        count = int(msp) + int(max_logit) + int(energy) + int(entropy) + int(gen)
        return logits.new_empty((count, logits.shape[0]), dtype=accumulation_dtype(logits))


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when ``triton`` imports (no device query)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(logits: torch.Tensor, backend: str = "auto") -> str:
    """The backend :func:`logit_scores` uses for these logits (raises if a forced one can't run)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if logits.is_cuda and triton_available():
            return "triton"
        if logits.device.type == "cpu" and cpu_op_available():
            return "cpu"
        return "torch"
    if backend == "cpu":
        if logits.device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU logits, got device {logits.device}")
        if not cpu_op_available():
            raise RuntimeError(
                "backend='cpu' needs the compiled extension (elogitnorm_fast._C) with the "
                "logit_scores op; build it with `pip install -e .` or use backend='torch'"
            )
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs triton installed; use backend='torch'")
        if not logits.is_cuda and not (logits.device.type == "cpu" and triton_interpreting()):
            raise ValueError(
                f"backend='triton' needs CUDA logits (or CPU logits with TRITON_INTERPRET=1 set "
                f"before triton was imported), got device {logits.device}"
            )
    return backend


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _normalise_names(names: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(names, str):
        names = (names,)
    names = tuple(names)
    aliases = {"entropy_score": "entropy", "maxlogit": "max_logit", "mls": "max_logit"}
    names = tuple(aliases.get(n, n) for n in names)
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
# GEN from logits and the per-row log-normaliser
# --------------------------------------------------------------------------------------------


def _gen_from_top(
    top_logits: torch.Tensor, log_norm: torch.Tensor, others: torch.Tensor, gamma: float
) -> torch.Tensor:
    """``-sum p^gamma (1 - p)^gamma`` over the selected logits ``top_logits`` (n x M).

    ``log p = z - log_norm`` and ``1 - p = -expm1(log p)`` for every entry but the row's maximum
    (``p <= 1/2`` there, so that is accurate); for the maximum ``1 - p = others / S`` where
    ``others = sum_{k != argmax} exp(z_k - max)`` is summed separately, because ``1 - p_max`` is
    far below float32's resolution of ``p_max`` for confident rows while ``(1 - p)^0.1`` is not
    small (``(1e-9)^0.1 = 0.13``).
    """
    log_p = top_logits - log_norm[:, None]
    terms = torch.exp(gamma * (log_p + torch.log(-torch.expm1(log_p))))
    # log_norm = max + log S, so log p_max = -log S and log(1 - p_max) = log(others) - log S
    top, where = top_logits.max(dim=1, keepdim=True)
    log_p_max = top.squeeze(1) - log_norm
    max_term = torch.exp(gamma * (2.0 * log_p_max + torch.log(others)))
    terms = terms.scatter(1, where, max_term[:, None])
    return -terms.sum(dim=1)


def _others_sum(shifted_exp: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``sum_{k != argmax} exp(z_k - max)`` per row from ``exp(z - max)`` and the argmax
    column ``where`` (n x 1; the first index on ties, as ``max`` gives it)."""
    return shifted_exp.scatter(1, where, 0.0).sum(dim=1)


def _gen_chunked(
    logits: torch.Tensor, log_norm: torch.Tensor, gamma: float, top_m: int, acc: torch.dtype
) -> torch.Tensor:
    n_rows, n_cols = logits.shape
    m = min(top_m, n_cols)
    rows = max(1, _CHUNK_ELEMENTS // n_cols)
    out = torch.empty(n_rows, dtype=acc, device=logits.device)
    for start in range(0, n_rows, rows):
        z = logits[start : start + rows].to(acc)
        top, where = z.max(dim=1, keepdim=True)
        others = _others_sum(torch.exp(z - top), where)
        selected = z if m == n_cols else torch.topk(z, m, dim=1, sorted=False).values
        out[start : start + rows] = _gen_from_top(
            selected, log_norm[start : start + rows], others, gamma
        )
    return out


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------


def _torch_scores(logits, names, temperature, gamma, top_m) -> dict[str, torch.Tensor]:
    n_rows, n_cols = logits.shape
    acc = accumulation_dtype(logits)
    want = set(names)
    out = {name: torch.empty(n_rows, dtype=acc, device=logits.device) for name in names}
    m_eff = min(top_m, n_cols)
    rows = max(1, _CHUNK_ELEMENTS // n_cols)
    for start in range(0, n_rows, rows):
        sl = slice(start, start + rows)
        z = logits[sl].to(acc)
        top, where = z.max(dim=1)
        shifted = z - top[:, None]
        e = torch.exp(shifted)
        total = e.sum(dim=1)
        log_total = torch.log(total)
        if "msp" in want:
            out["msp"][sl] = 1.0 / total
        if "max_logit" in want:
            out["max_logit"][sl] = top
        if "energy" in want:
            if temperature == 1.0:
                out["energy"][sl] = top + log_total
            else:
                out["energy"][sl] = top + temperature * torch.logsumexp(
                    shifted / temperature, dim=1
                )
        if "entropy" in want:
            # sum p (z - m) - log S, with 0 * (-inf) -> 0 for masked (-inf) logits.
            weighted = torch.where(e > 0, e * shifted, torch.zeros_like(e)).sum(dim=1)
            out["entropy"][sl] = weighted / total - log_total
        if "gen" in want:
            sel = z if m_eff == n_cols else torch.topk(z, m_eff, dim=1, sorted=False).values
            others = _others_sum(e, where[:, None])
            out["gen"][sl] = _gen_from_top(sel, top + log_total, others, gamma)
    return out


def _cpu_scores(logits, names, temperature, gamma, top_m) -> dict[str, torch.Tensor]:
    flags = [name in names for name in SCORE_NAMES]
    stacked = torch.ops.elogitnorm_fast.logit_scores(
        logits, *flags, float(temperature), float(gamma), int(top_m)
    )
    requested = [name for name in SCORE_NAMES if name in names]
    return {name: stacked[k] for k, name in enumerate(requested)}


def _triton_scores(logits, names, temperature, gamma, top_m) -> dict[str, torch.Tensor]:
    from elogitnorm_fast.kernels.logit_scores import logit_row_stats

    stats = logit_row_stats(logits, float(temperature))  # (4, N): m, S, A, S_T
    top, total, weighted, total_t = stats[0], stats[1], stats[2], stats[3]
    acc = accumulation_dtype(logits)
    top, total, weighted, total_t = (t.to(acc) for t in (top, total, weighted, total_t))
    log_total = torch.log(total)
    out: dict[str, torch.Tensor] = {}
    if "msp" in names:
        out["msp"] = 1.0 / total
    if "max_logit" in names:
        out["max_logit"] = top
    if "energy" in names:
        out["energy"] = top + (
            log_total if temperature == 1.0 else temperature * torch.log(total_t)
        )
    if "entropy" in names:
        out["entropy"] = weighted / total - log_total
    if "gen" in names:
        # Second path (documented): top-M selection is not done inside the streaming kernel.
        out["gen"] = _gen_chunked(logits, top + log_total, gamma, top_m, acc)
    return {name: out[name] for name in names}


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
) -> dict[str, torch.Tensor]:
    """Several logit scores in one pass over ``logits`` (N x C); returns ``{name: (N,) tensor}``.

    ``names`` is any non-empty subset of :data:`SCORE_NAMES` (``"msp"``, ``"max_logit"``,
    ``"energy"``, ``"entropy"``, ``"gen"``), returned in the order asked. ``temperature`` is the
    energy temperature ``T``; ``gamma`` and ``top_m`` are GEN's. See the module docstring for the
    formulas and ``backend``. Higher = more in-distribution for every score.
    """
    _check_logits(logits)
    names = _normalise_names(names)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if int(top_m) < 1:
        raise ValueError(f"top_m must be >= 1, got {top_m}")
    chosen = resolve_backend(logits, backend)
    with torch.no_grad():
        if logits.shape[0] == 0:
            acc = accumulation_dtype(logits)
            return {n: torch.empty(0, dtype=acc, device=logits.device) for n in names}
        if chosen == "cpu":
            return _cpu_scores(logits, names, temperature, gamma, top_m)
        if chosen == "triton":
            return _triton_scores(logits, names, temperature, gamma, top_m)
        return _torch_scores(logits, names, temperature, gamma, top_m)


def msp(logits: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Maximum softmax probability ``max_j softmax(z)_j`` (Hendrycks & Gimpel, ICLR 2017)."""
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
    """GEN (Liu, Lochman & Zach, CVPR 2023): ``-sum_{j in top-M} p_j^gamma (1 - p_j)^gamma``.

    ``p = softmax(z)``, the sum over the ``min(top_m, C)`` largest probabilities; negated so
    higher = more ID. Ties among probabilities do not matter (equal p, equal terms).
    """
    return logit_scores(logits, ("gen",), gamma=gamma, top_m=top_m, backend=backend)["gen"]


def entropy_score(logits: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Negated Shannon entropy of the softmax, ``sum_j p_j log p_j`` (higher = more ID)."""
    return logit_scores(logits, ("entropy",), backend=backend)["entropy"]
