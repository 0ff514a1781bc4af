"""Fused linear layer + ELogitNorm / LogitNorm: the loss of ``F.linear(features, weight, bias)``
without ever holding the N x C logits.

The rows are processed in chunks: a chunk's logits (fp32 accumulation, fp64 for fp64 inputs),
its losses and its logits gradient are formed, turned into the chunk's share of the features,
weight and bias gradients, and freed before the next chunk. The gradients are computed in the
forward when an input needs one, so the backward only scales them by the upstream gradient;
with ``reduction="none"`` the upstream gradient is per row and unknown in the forward, so the
backward recomputes the chunks instead. Extra memory is ``O(chunk_rows x C + C x D)``.

The row computations are those of the unfused backends (:mod:`.linear_losses_rows`): ``torch``
on any device, the compiled ops on CPU (``cpu``) and CUDA (``cuda``), the Triton kernels on CUDA
(``triton``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from . import linear_losses_rows as rows
from .backends import check_backend_name, resolve_backend
from .geometry import accumulation_dtype, as_dtype
from .linear_losses_weight import WeightGradient
from .reference import DEFAULT_EPS, DEFAULT_TAU, divisor_value
from .validation import (
    check_compute_range,
    check_count,
    check_ignore_index,
    check_options,
    check_target,
)

#: ``chunk_rows=None`` takes as many rows as fit one chunk's logits in this many bytes: the loop
#: holds a few chunk-sized buffers (logits, their gradient, distance rows) beside the C x D
#: weight gradient, so this bounds the part that grows with the batch...
CHUNK_BYTES = 32 * 2**20
#: ... or in this fraction of the weight's bytes, where that is more: every chunk reads the
#: weight and writes its gradient, so a larger head takes larger chunks to amortise those passes.
WEIGHT_SHARE = 8
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def default_chunk_rows(rows_total: int, classes: int, features: int, itemsize: int) -> int:
    """Rows per chunk for ``chunk_rows=None``: chunk x C x itemsize <= the larger of
    :data:`CHUNK_BYTES` and C x D x itemsize / :data:`WEIGHT_SHARE`, at least 1 and at most the
    batch."""
    budget = max(CHUNK_BYTES, classes * features * itemsize // WEIGHT_SHARE)
    return max(1, min(rows_total, budget // max(1, classes * itemsize)))


class _LogitsShape(NamedTuple):
    """What the shared target and range checks read from logits: those of
    ``F.linear(features, weight, bias)``, which are never formed."""

    shape: tuple[int, int]
    device: torch.device
    dtype: torch.dtype


def _check_tensor(name: str, value: object, dims: int, shape_text: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D {shape_text}, got shape {tuple(value.shape)}")
    if value.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")


def _check_linear(features, weight, bias) -> _LogitsShape:
    """Types, shapes and devices of the linear layer's inputs; the logits they would give."""
    _check_tensor("features", features, 2, "(batch, features)")
    _check_tensor("weight", weight, 2, "(classes, features)")
    if weight.shape[0] == 0:
        raise ValueError(f"weight must have at least one class row, got shape "
                         f"{tuple(weight.shape)}")
    if weight.shape[1] != features.shape[1]:
        raise ValueError(f"features must have D = {weight.shape[1]} columns to match weight "
                         f"{tuple(weight.shape)}, got shape {tuple(features.shape)}")
    if weight.device != features.device:
        raise ValueError(f"weight is on {weight.device} but features are on {features.device}")
    dtype = torch.promote_types(features.dtype, weight.dtype)
    if bias is not None:
        _check_tensor("bias", bias, 1, "(classes,)")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},) to match weight "
                             f"{tuple(weight.shape)}, got {tuple(bias.shape)}")
        if bias.device != features.device:
            raise ValueError(f"bias is on {bias.device} but features are on {features.device}")
        dtype = torch.promote_types(dtype, bias.dtype)
    return _LogitsShape((features.shape[0], weight.shape[0]), features.device, dtype)


def _loss_dtype(logits: _LogitsShape) -> torch.dtype:
    """The unfused loss's dtype: the logits', or float32 for 16-bit logits under autocast
    (as ``F.cross_entropy`` there)."""
    try:
        autocasting = torch.is_autocast_enabled(logits.device.type)
    except RuntimeError:
        autocasting = False
    if autocasting:
        return torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.dtype


#: The row computations per backend (``cpu`` and ``cuda``: the compiled ops).
_ELOGITNORM_ROWS = {"torch": rows.elogitnorm_rows_torch, "triton": rows.elogitnorm_rows_triton}
_LOGITNORM_ROWS = {"torch": rows.logitnorm_rows_torch, "triton": rows.logitnorm_rows_triton}


def _chunk_rows(
    z: torch.Tensor, target: torch.Tensor, kind: str, backend: str, reduction: str,
    upstream: torch.Tensor | None, weight_grad: WeightGradient | None, weight: torch.Tensor,
    options: tuple, own_pairs: bool,
) -> rows.Rows:
    """One chunk's ``(loss, grad_logits)`` from the row computation of ``kind`` on ``backend``
    (:mod:`.linear_losses_rows`); ELogitNorm's distance term goes to ``weight_grad``."""
    if kind == "elogitnorm":
        ignore_index, eps, divisor = options
        compute = _ELOGITNORM_ROWS.get(backend, rows.elogitnorm_rows_compiled)
        return compute(z, weight, target, reduction=reduction, upstream=upstream,
                       weight_grad=weight_grad, ignore_index=ignore_index, eps=eps,
                       divisor=divisor, own_pairs=own_pairs)
    ignore_index, tau = options
    compute = _LOGITNORM_ROWS.get(backend, rows.logitnorm_rows_compiled)
    return compute(z, target, reduction=reduction, upstream=upstream, ignore_index=ignore_index,
                   tau=tau)


def _chunked(features, weight, bias, target, kind, backend, reduction, upstream, chunk,
             needs, options):
    """Loops over the row chunks: the loss (summed, or per row for ``"none"``) and, where
    ``upstream`` is given, the gradients (None where ``needs`` says not needed) in the
    accumulation dtype.

    ``upstream``: 0-d (every row's upstream gradient, the mean's 1 / count included) or one per
    row (``"none"``); ``needs``: whether features, weight and bias need their gradients.
    """
    need_x, need_w, need_b = needs
    dtype = accumulation_dtype(features, weight, *(() if bias is None else (bias,)))
    w = as_dtype(weight.detach(), dtype)
    b = None if bias is None else as_dtype(bias.detach(), dtype)
    n, classes = features.shape[0], weight.shape[0]
    chunk_reduction = "none" if reduction == "none" else "sum"
    losses = []
    grad_x = grad_b = None
    weight_grad = WeightGradient(w) if upstream is not None and need_w else None
    if upstream is not None and need_x:
        grad_x = torch.empty(features.shape, dtype=dtype, device=features.device)
    # The CPU kernels' distance-term weight gradient is formed here, by GEMMs into the one
    # C x D buffer, where they compute with the weight as it is (a host sync, on the CPU).
    own_pairs = (weight_grad is not None and kind == "elogitnorm" and backend == "cpu"
                 and not torch.compiler.is_compiling() and rows.weight_is_unscaled(w))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        x = as_dtype(features[start:stop].detach(), dtype)
        z = x @ w.t() if b is None else torch.addmm(b, x, w.t())
        chunk_upstream = upstream
        if upstream is not None and upstream.dim() == 1:
            chunk_upstream = upstream[start:stop].contiguous()
        loss, grad_z = _chunk_rows(z, target[start:stop], kind, backend, chunk_reduction,
                                   chunk_upstream, weight_grad, w, options, own_pairs)
        del z
        losses.append(loss)
        if upstream is None:
            continue
        if weight_grad is not None:
            part = weight_grad.add_chunk(grad_z, x, need_x)
            if need_x:
                grad_x[start:stop] = part
        elif need_x:
            grad_x[start:stop] = grad_z @ w
        if need_b:
            column_sums = grad_z.sum(dim=0)
            grad_b = column_sums if grad_b is None else grad_b.add_(column_sums)
    grad_w = None if weight_grad is None else weight_grad.result()
    if need_b and grad_b is None and upstream is not None:
        grad_b = torch.zeros(classes, dtype=dtype, device=features.device)
    if reduction == "none":
        loss = torch.cat(losses) if losses else torch.zeros(0, dtype=dtype, device=w.device)
    else:
        loss = torch.stack(losses).sum() if losses else torch.zeros((), dtype=dtype,
                                                                    device=w.device)
    return loss, grad_x, grad_w, grad_b


def _upstream_for_mean(target, ignore_index, reduction, dtype):
    """The mean's divisor (the number of valid rows of the whole batch; None for ``"sum"``) and
    the 0-d upstream gradient each row's loss gets; 1 / count is clamped to 1 / 1 where no row
    is valid, so that an all-ignored batch gives zero gradients (the loss is 0 / 0 = NaN, as
    the unfused path's)."""
    ones = torch.ones((), dtype=dtype, device=target.device)
    if reduction != "mean":
        return None, ones
    count = (target != ignore_index).sum(dtype=dtype)
    return count, ones / count.clamp_min(1.0)


class _FusedLinearLoss(torch.autograd.Function):
    """Inputs: features, weight, bias (or None), target, then the options: the loss kind
    (``"elogitnorm"`` / ``"logitnorm"``), the backend name, the reduction, the chunk size,
    the loss dtype, whether each of the three inputs needs its gradient, and the kind's
    options (``(ignore_index, eps, divisor)`` or ``(ignore_index, tau)``)."""

    @staticmethod
    def forward(ctx, features, weight, bias, target, kind, backend, reduction, chunk,
                loss_dtype, needs, options):
        ignore_index = options[0]
        dtype = accumulation_dtype(features, weight, *(() if bias is None else (bias,)))
        ctx.options = (kind, backend, reduction, chunk, needs, options)
        ctx.dtypes = (features.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.grads = None  # the forward's gradients, where the first backward may take them over
        with torch.autocast(features.device.type, enabled=False):
            if reduction == "none":
                # The per-row upstream gradient comes with the backward: recompute there.
                loss = _chunked(features, weight, bias, target, kind, backend, reduction, None,
                                chunk, needs, options)[0]
                ctx.save_for_backward(features, weight, bias, target)
                return loss.to(loss_dtype)
            count, upstream = _upstream_for_mean(target, ignore_index, reduction, dtype)
            if not any(needs):
                upstream = None
            loss, grad_x, grad_w, grad_b = _chunked(features, weight, bias, target, kind,
                                                    backend, reduction, upstream, chunk, needs,
                                                    options)
        # The inputs are saved (no copy) so that a second backward (retain_graph) can
        # recompute; the first takes over the gradients and scales them in place, so the
        # C x D weight gradient is never copied. Under torch.compile they are saved as usual.
        if torch.compiler.is_compiling():
            ctx.save_for_backward(features, weight, bias, target, grad_x, grad_w, grad_b)
        else:
            ctx.grads = [grad_x, grad_w, grad_b]
            ctx.save_for_backward(features, weight, bias, target)
        if count is not None:
            loss = loss / count
        return loss.to(loss_dtype)

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the fused linear losses compute first derivatives only, so backward with "
                "create_graph=True cannot go through them; use the unfused path "
                "elogitnorm_loss(F.linear(features, weight, bias), weight, target) (or "
                "logitnorm_loss) with backend='reference'")
        kind, backend, reduction, chunk, needs, options = ctx.options
        features, weight, bias, target, *saved = ctx.saved_tensors
        dtype = accumulation_dtype(features, weight, *(() if bias is None else (bias,)))
        grads = ctx.grads
        if grads is not None:  # the first backward: the forward's gradients, ours to scale
            ctx.grads = None
            grads = [None if g is None else g.mul_(grad_output.to(g.dtype)) for g in grads]
        elif saved:  # traced by torch.compile
            grads = [None if g is None else g * grad_output.to(g.dtype) for g in saved]
        else:  # reduction="none", or a second backward: recompute the chunks
            upstream = grad_output.to(dtype)
            if reduction != "none":
                upstream = upstream * _upstream_for_mean(target, options[0], reduction, dtype)[1]
            with torch.autocast(features.device.type, enabled=False):
                _, *grads = _chunked(features, weight, bias, target, kind, backend, reduction,
                                     upstream, chunk, needs, options)
        out = [None if g is None else g.to(dtype)
               for g, dtype in zip(grads, ctx.dtypes, strict=True)]
        return (*out,) + (None,) * 8


def _fused(kind, features, weight, bias, target, reduction, ignore_index, chunk_rows, backend,
           options_of):
    logits = _check_linear(features, weight, bias)
    ignore_index = check_ignore_index(ignore_index)
    chunk_rows = check_count("chunk_rows", chunk_rows, optional=True)
    name = resolve_backend(backend, features.device, op="linear_losses").NAME
    target = check_target(target, logits, ignore_index, values=name == "torch")
    options = options_of(logits, ignore_index)
    n, classes = logits.shape
    dtype = accumulation_dtype(features, weight)
    chunk = chunk_rows or default_chunk_rows(n, classes, features.shape[1],
                                             torch.finfo(dtype).bits // 8)
    grad = torch.is_grad_enabled()
    needs = (grad and features.requires_grad, grad and weight.requires_grad,
             grad and bias is not None and bias.requires_grad)
    return _FusedLinearLoss.apply(features, weight, bias, target, kind, name, reduction, chunk,
                                  _loss_dtype(logits), needs, options)


def linear_elogitnorm_loss(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    eps: float = DEFAULT_EPS,
    divisor: str = "classes",
    chunk_rows: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``elogitnorm_loss(F.linear(features, weight, bias), weight, target)`` without the N x C
    logits: extra memory ``O(chunk_rows x C + C x D)`` instead of ``O(N x C)``.

    Gradients reach ``features``, ``weight`` (through the logits and through the class
    distances, which use the bias-free weight) and ``bias``. Use it for heads with many classes
    (10^4 and more), where the logits, their gradient and the distance rows dominate memory.

    Args:
        features: (N, D) float16 / bfloat16 / float32 / float64 inputs of the head.
        weight: (C, D) head weight; may be float32 while the features are bfloat16.
        bias: (C,) head bias, or None.
        target: (N,) integer class indices; ``ignore_index`` rows contribute no loss or gradient.
        reduction: ``"mean"`` (over non-ignored rows), ``"sum"`` or ``"none"``.
        ignore_index: an integer within int64.
        eps: as in :func:`elogitnorm_fast.elogitnorm_loss`.
        divisor: ``"classes"`` (C, the released code's) or ``"paper"`` (C - 1).
        chunk_rows: rows per chunk; None: :func:`default_chunk_rows` (32 MiB of logits, more
            for heads over 256 MiB).
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"`` (the row
            computation used; the logits are formed with ``torch.addmm`` in the accumulation
            dtype).

    Raises:
        TypeError / ValueError: naming the argument and the value, before any work.
        RuntimeError: from a backward with ``create_graph=True`` (first derivatives only).

    Example::

        loss = linear_elogitnorm_loss(features, model.fc.weight, model.fc.bias, y)
    """
    check_options(reduction, eps=eps)

    def options(logits, ignore_index):
        check_compute_range("eps", eps, logits, weight)
        return (ignore_index, float(eps), float(divisor_value(logits.shape[1], divisor)))

    return _fused("elogitnorm", features, weight, bias, target, reduction, ignore_index,
                  chunk_rows, backend, options)


def linear_logitnorm_loss(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    tau: float = DEFAULT_TAU,
    reduction: str = "mean",
    ignore_index: int = -100,
    chunk_rows: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``logitnorm_loss(F.linear(features, weight, bias), target, tau=tau)`` without the N x C
    logits (extra memory ``O(chunk_rows x C + C x D)``); gradients reach all three inputs.

    Args as :func:`linear_elogitnorm_loss`, with ``tau`` the temperature of
    :func:`elogitnorm_fast.logitnorm_loss`.

    Example::

        loss = linear_logitnorm_loss(features, model.fc.weight, model.fc.bias, y, tau=0.04)
    """
    check_options(reduction, tau=tau)

    def options(logits, ignore_index):
        check_compute_range("tau", tau, logits)
        return (ignore_index, float(tau))

    return _fused("logitnorm", features, weight, bias, target, reduction, ignore_index,
                  chunk_rows, backend, options)


def _head(head: nn.Linear | torch.Tensor, bias: torch.Tensor | None):
    if isinstance(head, nn.Linear):
        if bias is not None:
            raise ValueError("bias must be None when an nn.Linear is given (its own bias is "
                             f"used), got a tensor of shape {tuple(bias.shape)}")
        return head, None, None
    if not isinstance(head, torch.Tensor):
        raise TypeError(f"head must be an nn.Linear or a weight tensor, got "
                        f"{type(head).__name__}")
    return None, head, bias


class _LinearLoss(nn.Module):
    def __init__(self, head: nn.Linear | torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.linear, weight, bias = _head(head, bias)
        if self.linear is None:
            # Parameters register here (and stay shared with the model that owns them).
            self.weight, self.bias = weight, bias

    def _weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.linear is not None:
            return self.linear.weight, self.linear.bias
        return self.weight, self.bias


class LinearELogitNormLoss(_LinearLoss):
    """Module form of :func:`linear_elogitnorm_loss`, in place of ``model.fc`` + criterion:
    ``criterion(features, target)``.

    Args:
        head: the ``nn.Linear`` head, or its weight (C, D) with ``bias`` beside it.
        bias: (C,) or None; only with a weight tensor.
        the rest: as :func:`linear_elogitnorm_loss`.

    Example::

        criterion = LinearELogitNormLoss(model.fc)
        loss = criterion(backbone(x), y)
    """

    def __init__(self, head: nn.Linear | torch.Tensor, bias: torch.Tensor | None = None, *,
                 reduction: str = "mean", ignore_index: int = -100, eps: float = DEFAULT_EPS,
                 divisor: str = "classes", chunk_rows: int | None = None,
                 backend: str = "auto") -> None:
        super().__init__(head, bias)
        check_options(reduction, eps=eps)
        divisor_value(2, divisor)  # validates the name
        self.ignore_index = check_ignore_index(ignore_index)
        self.chunk_rows = check_count("chunk_rows", chunk_rows, optional=True)
        check_backend_name(backend, op="linear_losses")
        self.reduction, self.eps, self.divisor, self.backend = reduction, eps, divisor, backend

    def forward(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight, bias = self._weight_bias()
        return linear_elogitnorm_loss(
            features, weight, bias, target, reduction=self.reduction,
            ignore_index=self.ignore_index, eps=self.eps, divisor=self.divisor,
            chunk_rows=self.chunk_rows, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, divisor={self.divisor!r}, "
                f"chunk_rows={self.chunk_rows}, backend={self.backend!r}")


class LinearLogitNormLoss(_LinearLoss):
    """Module form of :func:`linear_logitnorm_loss`: ``criterion(features, target)``.

    Args:
        head: the ``nn.Linear`` head, or its weight (C, D) with ``bias`` beside it.
        bias: (C,) or None; only with a weight tensor.
        the rest: as :func:`linear_logitnorm_loss`.

    Example::

        criterion = LinearLogitNormLoss(model.fc, tau=0.04)
        loss = criterion(backbone(x), y)
    """

    def __init__(self, head: nn.Linear | torch.Tensor, bias: torch.Tensor | None = None, *,
                 tau: float = DEFAULT_TAU, reduction: str = "mean", ignore_index: int = -100,
                 chunk_rows: int | None = None, backend: str = "auto") -> None:
        super().__init__(head, bias)
        check_options(reduction, tau=tau)
        self.ignore_index = check_ignore_index(ignore_index)
        self.chunk_rows = check_count("chunk_rows", chunk_rows, optional=True)
        check_backend_name(backend, op="linear_losses")
        self.tau, self.reduction, self.backend = tau, reduction, backend

    def forward(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight, bias = self._weight_bias()
        return linear_logitnorm_loss(
            features, weight, bias, target, tau=self.tau, reduction=self.reduction,
            ignore_index=self.ignore_index, chunk_rows=self.chunk_rows, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"tau={self.tau}, reduction={self.reduction!r}, chunk_rows={self.chunk_rows}, "
                f"backend={self.backend!r}")
