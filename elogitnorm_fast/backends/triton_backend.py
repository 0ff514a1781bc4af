"""The ``triton`` backend: fused Triton kernels for LogitNorm and ELogitNorm (the CUDA default).

LogitNorm: the forward kernel writes the per-row loss and four statistics per row, the backward
kernel recomputes the gradient from the logits and those, already times the upstream gradient
(one launch each way). Outside torch.compile the forward also writes the gradient for the
upstream gradient the reduction will deliver (1, or 1 / count for ``mean``) when its rows fit on
chip, and the backward only fills in rows that received something else, so a plain
``loss.backward()`` reads the logits once and writes the gradient once. ``sum`` / ``mean`` are
reduced in the kernel (``REDUCE_IN_KERNEL``): by one program for small batches (CIFAR sizes),
else by each program counting the valid rows itself and writing its rows' shares of the loss,
which one sum adds up: no count, division or autograd of them on the host. Eager ``sum`` /
``mean`` (not under CUDA-graph capture) returns the loss through a C++ autograd node whose
backward multiplies the forward's gradient by the upstream gradient (``NATIVE_BACKWARD``): no
Python and no launch in the backward.

ELogitNorm: one launch per direction and block of rows computes the loss (eager ``sum`` /
``mean``: each row's share of it) and, when a gradient will be needed, the logits gradient for
an upstream gradient of 1 and the coefficients ``c`` of the weight gradient (for the row's
share); the backward rescales rows by their upstream gradient and runs the weight-gradient GEMMs
(eager, C <= 128 and few rows: one launch pools the coefficients by predicted class into the
weight gradient and rescales the logits gradient,
:mod:`elogitnorm_fast.kernels.class_gradient`). Eager ``sum`` / ``mean`` (not captured) forms
the weight gradient for the unit upstream gradient in the forward instead (that launch, or the
GEMMs) and returns the loss through the same C++ node as LogitNorm. For small C
(:func:`elogitnorm_fast.kernels.elogitnorm.fuses_distances`: C <= 128, C * D <= 2^17) the
forward launch also takes the argmax and computes each row's distances from ``W`` directly, so the
forward is one launch plus the output allocations. Otherwise the host runs the argmax, the
squared norms of ``W`` and one GEMM of raw inner products ``w_m . w_j`` for the predicted
classes (rows as in :func:`elogitnorm_fast.geometry.predicted_rows`; TF32 follows
``torch.backends.cuda.matmul.allow_tf32``, off by default), and the kernel turns them into
distances (norms, clamp, root, self-distance 1, exact recomputation of cancelled entries). The
eager path keeps the gathered rows ``W[predicted]`` for the weight gradient. Never C x C x D,
never C x C unless N >= C. No host syncs; the caller's logits are never written.

The ops are ``torch.library.triton_op`` s with ``register_autograd``, so
``torch.compile(fullgraph=True)`` traces through them. Triton is imported only inside the ops.
With ``TRITON_INTERPRET=1`` set before triton is imported, CPU tensors are accepted (the Triton
interpreter; fp32 only), which is how the kernels are tested without a GPU. float64 inputs run
the ``torch`` backend's closed form (the kernels compute in fp32).

Example::

    loss = elogitnorm_fast.elogitnorm_loss(logits, fc.weight, y, backend="triton")
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from ..extension import has_ops, triton_interpreting
from ..geometry import as_dtype, predicted_rows, weight_gradient
from ..reduction import mean_count, reduce_rows
from ..validation import check_first_derivative
from . import torch_backend

NAME = "triton"
#: The loss functions take ``loss_dtype``: under autocast the public API asks for a float32
#: loss from float16 / bfloat16 logits, which the kernels accumulate in float32 anyway.
TAKES_LOSS_DTYPE = True

_HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
# Looked up once (without importing triton): torch.compile cannot trace importlib.
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def unavailable_reason(device: torch.device | None) -> str | None:
    """Why the kernels cannot run on ``device`` (None where they can; any device if None)."""
    if not _HAS_TRITON:
        return "triton is not installed (pip install triton)"
    if not _HAS_TRITON_OP:
        return f"torch >= 2.6 is needed for torch.library.triton_op, got torch {torch.__version__}"
    if device is None:
        if torch.cuda.is_available() or triton_interpreting():
            return None
        return ("no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU tensors in Triton's "
                "slow debugging interpreter, for tests only)")
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "torch cannot reach a CUDA device"
    if device.type == "cpu" and triton_interpreting():
        return None
    return f"needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got device {device}"


_KERNEL_MODULES: dict = {}


def _kernels(name: str):
    """``elogitnorm_fast.kernels.<name>``, imported on first use (triton is optional)."""
    module = _KERNEL_MODULES.get(name)
    if module is None:
        module = _KERNEL_MODULES[name] = importlib.import_module(f"elogitnorm_fast.kernels.{name}")
    return module


def _block(block_cols: int) -> int | None:
    return block_cols if block_cols > 0 else None


#: Outside torch.compile, skip the custom-op dispatch and ``wrap_triton`` (together ~350 us of
#: host time per call on an H100 machine, measured) and run the same kernels under a plain
#: autograd.Function.
EAGER_FAST_PATH = True

#: Eager LogitNorm: the forward also writes the gradient for the upstream gradient a plain
#: backward of the reduced loss delivers, and the backward leaves those rows alone (logits read
#: once, gradient written once). When the loss is scaled before the backward (a GradScaler, a
#: weighted sum of losses) every row is recomputed, and the forward's write was wasted: set this
#: to False there to keep the backward at one read of the logits and one write.
PREDICT_UPSTREAM = True

#: Eager LogitNorm with ``sum`` / ``mean``: the kernel reduces the loss, so the host runs no
#: count, no division and no autograd for them. Small batches (``kernels.logitnorm.
#: reduces_in_one_program``: CIFAR sizes, a host-bound step) in one program: 3 torch ops + 1
#: launch forward, 1 launch backward, where the per-row path runs 8 + 1 and 2 + 1 (autograd's
#: seed and leaf detach aside). Otherwise, and while a CUDA graph is captured
#: (:func:`_capturing`), a block of rows per program, each counting the valid rows itself
#: (``kernels.logitnorm.reduces_in_blocks``), and one sum: 4 ops + 1 launch, 1 launch.
#: ELogitNorm likewise, a block of rows per program (``kernels.rows.counts_within_budget``): its
#: kernels write each row's share of the loss with the gradient and coefficients for it, and the
#: Function returns their sum (no count, division or expansion on the host). False: per-row
#: losses and the reduction on the host, as the op path does.
REDUCE_IN_KERNEL = True

#: Eager ``sum`` / ``mean`` steps outside CUDA-graph capture: the forward writes every gradient
#: for an upstream gradient of one (LogitNorm's logits gradient, as above; ELogitNorm's also the
#: weight gradient, one more launch or the GEMMs), and the loss comes back from a C++ autograd
#: node (``unit_gradient_node``, ``csrc/unit_gradients.cpp``) whose backward multiplies them by
#: the upstream gradient: no Python and no Triton launch in the backward (autograd's device
#: thread runs it without the GIL). Needs the compiled extension; without it, or while a graph is
#: captured (replayed, host work costs nothing and the node's multiplies are extra kernels), the
#: Python Functions below run. LogitNorm: up to :data:`NATIVE_MAX_ELEMENTS`, because the
#: multiply reads and writes the gradient once more where the Python backward only checks the
#: upstream gradient. A NaN / inf upstream gradient reaches ignored rows as 0 x NaN = NaN (plain
#: IEEE, as autograd's own multiply), where the Python backward gives them 0.
NATIVE_BACKWARD = True
NATIVE_MAX_ELEMENTS = 1 << 20
_HAS_NODE: list[bool] = []  # whether the extension has the node (looked up once)


def _native_backward(capturing: bool) -> bool:
    """Whether an eager step returns its loss through the C++ node (:data:`NATIVE_BACKWARD`);
    ``capturing``: :func:`_capturing`, which the caller has already asked."""
    if not _HAS_NODE:
        _HAS_NODE.append(has_ops("unit_gradient_node"))
    return NATIVE_BACKWARD and _HAS_NODE[0] and not capturing


def logitnorm_kernel_reduction(n_rows: int, n_cols: int, reduction: str,
                               block_cols: int | None = None,
                               capturing: bool = False) -> str | None:
    """Where an eager ``sum`` / ``mean`` LogitNorm of this shape is reduced in the kernel:
    ``"one program"`` (small batches, not while a CUDA graph is captured: :func:`_capturing`),
    ``"blocks"`` (a block of rows per program), or None (per-row losses, reduced on the host)."""
    kernels = _kernels("logitnorm")
    if block_cols is None and not capturing and kernels.reduces_in_one_program(n_rows, n_cols):
        return "one program"
    return "blocks" if kernels.reduces_in_blocks(n_rows, n_cols, reduction, block_cols) else None


def node_carries_logitnorm(n_rows: int, n_cols: int, block_cols: int | None = None) -> bool:
    """Whether a LogitNorm of this shape, reduced in the kernel, may come back through the C++
    node: its forward writes the gradient (rows on chip) and N C <= :data:`NATIVE_MAX_ELEMENTS`."""
    return (n_rows * n_cols <= NATIVE_MAX_ELEMENTS
            and _kernels("logitnorm").writes_gradient(n_cols, block_cols))


def _unit_gradient_node(loss, logits, weight, logits_grad, weight_grad, loss_name):
    """``loss`` (0-d) with the C++ backward that gives ``logits`` / ``weight`` the gradients
    ``logits_grad`` / ``weight_grad`` (for an upstream gradient of one; None: none) times the
    upstream gradient."""
    return torch.ops.elogitnorm_fast.unit_gradient_node(loss, logits, weight, logits_grad,
                                                        weight_grad, NAME, loss_name)


def _logitnorm_impl(logits, target, inv_tau, ignore_index, block_cols, traced=True,
                    expected_upstream=None):
    """Losses, statistics, and the gradient for ``expected_upstream`` (None where not written:
    see :func:`elogitnorm_fast.kernels.logitnorm.logitnorm_rows`)."""
    return _kernels("logitnorm").logitnorm_rows(
        logits, target, inv_tau=inv_tau, ignore_index=ignore_index,
        block_cols=_block(block_cols), expected_upstream=expected_upstream, traced=traced,
    )


def _logitnorm_grad_impl(logits, target, stats, upstream, ignore_index, traced=True):
    return _kernels("logitnorm").logitnorm_backward_rows(
        logits, target, stats, upstream, ignore_index=ignore_index, traced=traced,
    )


def _elogitnorm_forward(logits, weight, target, ignore_index, eps, divisor, write_grad,
                        write_coefficients, block_cols, reduce=0, traced=True):
    """The op's four outputs, and the fp32 rows ``W[predicted]`` where the GEMM path gathered
    them (one per sample, N < C; else None): the weight gradient's GEMMs need them again.
    ``reduce`` (eager only): 1 / 2, the losses are the rows' shares of the sum / mean, and the
    gradient and coefficients are written for them (``kernels.elogitnorm.elogitnorm_rows``)."""
    kernels = _kernels("elogitnorm")
    if block_cols <= 0 and kernels.fuses_distances(logits.shape[1], weight.shape[1]):
        # Small C: argmax, distance rows, loss and gradient tiles in one launch.
        return kernels.elogitnorm_rows_fused(
            logits, target, weight, eps=eps, divisor=divisor, ignore_index=ignore_index,
            write_grad=write_grad, write_coefficients=write_coefficients, reduce=reduce,
            traced=traced,
        ), None
    # Without autograd: the C++ node's path (:func:`_elogitnorm_through_node`) calls this with
    # grad mode on, and recording these ops would keep their inputs (W[predicted]) alive until
    # the backward and record a node per op (the other callers run without autograd already).
    with torch.no_grad():
        predicted = logits.argmax(dim=1)  # first index on ties, like torch.max
        w = as_dtype(weight, torch.float32)
        rows, per_sample = predicted_rows(w, predicted)
        # Raw inner products only (R x C, fp32 accumulation); the kernel forms the distances.
        inner = torch.mm(rows, w.t())
        norms = torch.linalg.vector_norm(w, dim=1)  # one reduction; the kernel squares them
    losses, grad, coefficients = kernels.elogitnorm_rows(
        logits, target, predicted, inner, w, norms, per_sample=per_sample, eps=eps,
        divisor=divisor, ignore_index=ignore_index, write_grad=write_grad,
        write_coefficients=write_coefficients, block_cols=_block(block_cols), reduce=reduce,
        traced=traced,
    )
    return (losses, grad, coefficients, predicted), (rows if per_sample else None)


def _elogitnorm_impl(*inputs, traced=True):
    return _elogitnorm_forward(*inputs, traced=traced)[0]


def _scale_rows_impl(first, second, upstream, target, ignore_index, traced=True):
    return _kernels("rows").scale_rows(first, second, upstream, target,
                                       ignore_index=ignore_index, traced=traced)


def _scale_rows_eager(first, second, upstream, target, ignore_index):
    return _scale_rows_impl(first, second, upstream, target, ignore_index, traced=False)


def _logitnorm_setup(ctx, inputs, output):
    logits, target, _, ignore_index, *_ = inputs
    ctx.save_for_backward(logits, target, output[1])
    ctx.ignore_index = ignore_index


def _logitnorm_backward(ctx, grad_losses, *_unused):
    """The op path recomputes the gradient; the eager paths (per-row and reduced-in-kernel)
    complete the forward's gradient in place (once: a second backward through a retained graph
    recomputes into a new tensor, so a gradient handed out is never written again)."""
    eager = getattr(ctx, "eager", False)
    no_grads = (None,) * getattr(ctx, "other_inputs", 4)  # the inputs after the logits
    if grad_losses is None:  # the eager Function does not materialise unused output gradients
        return None, *no_grads
    if eager:
        check_first_derivative(NAME, "LogitNorm")
    logits, target, stats = ctx.saved_tensors
    if not eager:
        return _logitnorm_grad(logits, target, stats, grad_losses.float(), ctx.ignore_index), \
            *no_grads
    out, ctx.grad_buffer = ctx.grad_buffer, None
    grad_logits = _kernels("logitnorm").logitnorm_backward_rows(
        logits, target, stats, grad_losses.float(), ignore_index=ctx.ignore_index, out=out,
        expected_upstream=ctx.expected_upstream, reduced=ctx.reduced, traced=False)
    return grad_logits, *no_grads


def _elogitnorm_setup(ctx, inputs, output, rows=None):
    """Saves what the backward reads; ``rows``: the forward's ``W[predicted]`` (eager path
    only, the op's outputs do not include it), else the backward gathers them again."""
    _, weight, target, ignore_index, *_ = inputs
    _, grad_unit, coefficient_unit, predicted = output
    ctx.save_for_backward(weight, target, grad_unit, coefficient_unit, predicted, rows)
    ctx.ignore_index = ignore_index


def _elogitnorm_backward(ctx, grad_losses, *_unused):
    no_grads = (None,) * getattr(ctx, "other_inputs", 7)  # the inputs after logits and weight
    if grad_losses is None:  # the eager Function does not materialise unused output gradients
        return None, None, *no_grads
    eager = getattr(ctx, "eager", False)
    if eager:
        check_first_derivative(NAME, "ELogitNorm")
    weight, target, grad_unit, coefficient_unit, predicted, rows = ctx.saved_tensors
    # 0-d where the kernel reduced the loss: every row's share gets the loss's gradient (the
    # kernels read it with row stride 0).
    upstream = grad_losses.float()
    if eager and ctx.needs_input_grad[1] and _kernels("class_gradient").pools(
            *coefficient_unit.shape):
        # Few classes and rows: one launch pools the unit coefficients by predicted class, times
        # the upstream gradient, into dW (no rescaled coefficients, no torch ops), and scales
        # the forward's logits gradient by the upstream gradient on the way.
        grad_weight, grad_logits = _kernels("class_gradient").pooled_gradients(
            weight, coefficient_unit, predicted, upstream, target, ignore_index=ctx.ignore_index,
            logits_unit=grad_unit if ctx.needs_input_grad[0] else None, traced=False)
        return grad_logits, as_dtype(grad_weight, weight.dtype), *no_grads
    # Everything the forward wrote is linear in the row's upstream gradient.
    scale_rows = _scale_rows_eager if eager else _scale_rows
    grad_logits, coefficients = scale_rows(grad_unit, coefficient_unit, upstream, target,
                                           ctx.ignore_index)
    grad_weight = None
    if ctx.needs_input_grad[1]:
        grad_weight = _gemm_weight_gradient(weight, rows, predicted, coefficients)
        grad_weight = as_dtype(grad_weight, weight.dtype)
    return grad_logits if ctx.needs_input_grad[0] else None, grad_weight, *no_grads


@torch.no_grad()  # the C++ node's forward calls it with grad mode on (see _elogitnorm_forward)
def _gemm_weight_gradient(weight, rows, predicted, coefficients):
    """dW (fp32) from the coefficients by :func:`elogitnorm_fast.geometry.weight_gradient`;
    ``rows``: the forward's ``W[predicted]`` (one per sample), or None (the op path, or one row
    per class: gathered here, or ``W`` itself)."""
    w = as_dtype(weight, torch.float32)
    if rows is None:
        rows, per_sample = predicted_rows(w, predicted)
    else:
        per_sample = True
    # One row per sample (N < C): the kernels wrote coefficient rows that sum to zero.
    return weight_gradient(w, rows, per_sample, predicted, coefficients,
                           rows_sum_to_zero=per_sample)


class _EagerLogitNorm(torch.autograd.Function):
    """Inputs: the op's, then the expected upstream gradient (None: no gradient needed)."""

    @staticmethod
    def forward(ctx, *inputs):
        *op_inputs, expected_upstream = inputs
        losses, stats, ctx.grad_buffer = _logitnorm_impl(
            *op_inputs, traced=False, expected_upstream=expected_upstream)
        ctx.expected_upstream, ctx.reduced, ctx.eager = expected_upstream, False, True
        ctx.other_inputs = len(inputs) - 1
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)  # no zero gradient for the statistics output
        _logitnorm_setup(ctx, inputs, (losses, stats))
        return losses, stats

    backward = staticmethod(_logitnorm_backward)


class _EagerReducedLogitNorm(torch.autograd.Function):
    """The kernel reduces the loss (no count, division or autograd of them on the host).
    Inputs: logits, target, 1 / tau, ignore_index, reduction, whether to write the gradient in
    the forward, whether one program reduces (else a block of rows per program and a sum),
    the column block (0: chosen from C)."""

    @staticmethod
    def forward(ctx, *inputs):
        logits, target, inv_tau, ignore_index, reduction, write_grad, one_program, block = inputs
        loss, stats, ctx.grad_buffer = _kernels("logitnorm").logitnorm_reduced(
            logits, target, inv_tau=inv_tau, ignore_index=ignore_index, reduction=reduction,
            write_grad=write_grad, one_program=one_program, block_cols=_block(block),
            traced=False)
        ctx.expected_upstream, ctx.reduced, ctx.eager = None, True, True
        ctx.other_inputs = len(inputs) - 1
        _logitnorm_setup(ctx, inputs, (loss, stats))
        return loss

    backward = staticmethod(_logitnorm_backward)


def _elogitnorm_through_node(inputs, reduce):
    """Eager ``sum`` / ``mean`` ELogitNorm through the C++ node (:data:`NATIVE_BACKWARD`): the
    kernels' unit gradients, and the weight gradient from the unit coefficients (the pooled
    launch for few classes and rows, else the GEMMs), formed in the forward."""
    logits, weight, target, ignore_index = inputs[:4]
    need_logits_grad, need_weight_grad = inputs[6:8]
    (shares, grad_unit, coefficient_unit, predicted), rows = _elogitnorm_forward(
        *inputs, reduce, traced=False)
    grad_weight = loss = None
    if need_weight_grad:
        if _kernels("class_gradient").pools(*coefficient_unit.shape):
            # The same launch adds the shares into the loss (no torch sum).
            loss = torch.empty((), dtype=torch.float32, device=shares.device)
            grad_weight, _ = _kernels("class_gradient").pooled_gradients(
                weight, coefficient_unit, predicted, None, target, ignore_index=ignore_index,
                shares=shares, loss_out=loss, traced=False)
        else:
            grad_weight = _gemm_weight_gradient(weight, rows, predicted, coefficient_unit)
    return _unit_gradient_node(shares.sum() if loss is None else loss, logits, weight,
                               grad_unit if need_logits_grad else None, grad_weight, "ELogitNorm")


class _EagerELogitNorm(torch.autograd.Function):
    """Inputs: the op's, then ``reduce`` (0: per-row losses; 1 / 2: the kernel writes the rows'
    shares of the sum / mean and the Function returns their sum, the loss itself)."""

    @staticmethod
    def forward(ctx, *inputs):
        output, rows = _elogitnorm_forward(*inputs, traced=False)
        if inputs[-1]:
            output = (output[0].sum(), *output[1:])
        ctx.other_inputs = len(inputs) - 2
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero gradients for the three auxiliary outputs
        ctx.eager = True
        _elogitnorm_setup(ctx, inputs, output, rows)
        return output

    backward = staticmethod(_elogitnorm_backward)


# Registered only where triton is installed: without it the backend is unavailable, and torch
# logs a warning for each triton_op defined.
if _HAS_TRITON_OP and _HAS_TRITON:
    from torch.library import triton_op

    @triton_op("elogitnorm_fast::triton_logitnorm_rows", mutates_args=())
    def _logitnorm_rows(
        logits: torch.Tensor,
        target: torch.Tensor,
        inv_tau: float,
        ignore_index: int,
        block_cols: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row LogitNorm losses (fp32) and the (5 N + 1,) row statistics of the backward."""
        return _logitnorm_impl(logits, target, inv_tau, ignore_index, block_cols)[:2]

    @triton_op("elogitnorm_fast::triton_logitnorm_grad", mutates_args=())
    def _logitnorm_grad(
        logits: torch.Tensor,
        target: torch.Tensor,
        stats: torch.Tensor,
        upstream: torch.Tensor,
        ignore_index: int,
    ) -> torch.Tensor:
        """LogitNorm logits gradient, rows times ``where(target valid, upstream, 0)``."""
        return _logitnorm_grad_impl(logits, target, stats, upstream, ignore_index)

    @triton_op("elogitnorm_fast::triton_elogitnorm_rows", mutates_args=())
    def _elogitnorm_rows(
        logits: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        ignore_index: int,
        eps: float,
        divisor: int,
        write_grad: bool,
        write_coefficients: bool,
        block_cols: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-row ELogitNorm losses, unit-upstream gradient, coefficients, predicted classes."""
        return _elogitnorm_impl(logits, weight, target, ignore_index, eps, divisor, write_grad,
                                write_coefficients, block_cols)

    @triton_op("elogitnorm_fast::triton_scale_rows", mutates_args=())
    def _scale_rows(
        first: torch.Tensor,
        second: torch.Tensor,
        upstream: torch.Tensor,
        target: torch.Tensor,
        ignore_index: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of ``first`` and ``second`` times ``where(target valid, upstream, 0)``."""
        return _scale_rows_impl(first, second, upstream, target, ignore_index)

    torch.library.register_autograd(
        "elogitnorm_fast::triton_logitnorm_rows", _logitnorm_backward,
        setup_context=_logitnorm_setup,
    )
    torch.library.register_autograd(
        "elogitnorm_fast::triton_elogitnorm_rows", _elogitnorm_backward,
        setup_context=_elogitnorm_setup,
    )


def _capturing(logits: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream. Replayed, a step costs no
    host work, and one program walking every row is slow on the device: on an H100 at N = 128,
    C = 10 its kernel took 19 us per eager step, where a captured fwd+bwd reduced by blocks of
    rows replays in 7.5 us (``benchmarks/results/gpu_host_h100.json``, ``gpu_losses_h100.json``).
    Eager, its one launch and no sum saves host work: the one-program reduction is for eager
    steps only."""
    return logits.is_cuda and torch.cuda.is_current_stream_capturing()


def _use_op() -> bool:
    """The triton_op (traceable by torch.compile) or the eager autograd.Function path."""
    return not EAGER_FAST_PATH or torch.compiler.is_compiling()


def _unit_column_stride(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.shape[1] == 1 or logits.stride(1) == 1 else logits.contiguous()


def _needs_grad(tensor: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and tensor.requires_grad


def elogitnorm_loss(
    logits: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    reduction: str,
    ignore_index: int,
    eps: float,
    divisor: int,
    block_cols: int | None = None,
    loss_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """ELogitNorm (inputs already validated); ``divisor`` is the number, C or C - 1.

    ``block_cols`` (a power of two) forces the kernel's column block and the GEMM-distance path
    (tests use it to exercise the streaming path at small C); None picks both from C and D.
    ``loss_dtype``: the returned loss's dtype (None: the logits').
    """
    out_dtype = loss_dtype or logits.dtype
    if logits.dtype == torch.float64 or weight.dtype == torch.float64:
        return as_dtype(torch_backend.elogitnorm_loss(
            as_dtype(logits, torch.promote_types(logits.dtype, out_dtype)), weight, target,
            reduction=reduction, ignore_index=ignore_index, eps=eps, divisor=divisor), out_dtype)
    need_logits_grad, need_weight_grad = _needs_grad(logits), _needs_grad(weight)
    inputs = (_unit_column_stride(logits), weight, target.contiguous(), ignore_index, float(eps),
              int(divisor), need_logits_grad, need_weight_grad, block_cols or 0)
    if _use_op():
        losses, *_ = _elogitnorm_rows(*inputs)
    else:
        rows = _kernels("rows")
        reduce = 0
        if REDUCE_IN_KERNEL and reduction != "none" and rows.counts_within_budget(
                target.shape[0], _kernels("elogitnorm").rows_per_program(
                    logits.shape[1], weight.shape[1], block_cols), reduction):
            reduce = rows.REDUCE_CODES[reduction]
            if (need_logits_grad or need_weight_grad) and _native_backward(_capturing(logits)):
                return as_dtype(_elogitnorm_through_node(inputs, reduce), out_dtype)
        losses, *_ = _EagerELogitNorm.apply(*inputs, reduce)
        if reduce:
            return as_dtype(losses, out_dtype)
    count = mean_count(reduction, target, ignore_index, torch.float32)
    return as_dtype(reduce_rows(losses, reduction, count), out_dtype)


def logitnorm_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    tau: float,
    reduction: str,
    ignore_index: int,
    block_cols: int | None = None,
    loss_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """LogitNorm (inputs already validated); see :func:`elogitnorm_loss` for ``block_cols`` and
    ``loss_dtype``."""
    out_dtype = loss_dtype or logits.dtype
    if logits.dtype == torch.float64:
        return torch_backend.logitnorm_loss(logits, target, tau=tau, reduction=reduction,
                                            ignore_index=ignore_index)
    logits, target = _unit_column_stride(logits), target.contiguous()
    if not _use_op() and REDUCE_IN_KERNEL and reduction != "none":
        kernels = _kernels("logitnorm")
        capturing = _capturing(logits)
        reduced_in = logitnorm_kernel_reduction(*logits.shape, reduction, block_cols, capturing)
        if reduced_in is not None:
            one_program = reduced_in == "one program"
            write_grad = PREDICT_UPSTREAM and _needs_grad(logits)
            if (write_grad and node_carries_logitnorm(*logits.shape, block_cols)
                    and _native_backward(capturing)):
                loss, _, grad = kernels.logitnorm_reduced(
                    logits, target, inv_tau=1.0 / tau, ignore_index=ignore_index,
                    reduction=reduction, write_grad=True, one_program=one_program,
                    block_cols=block_cols, write_stats=False, traced=False)
                return as_dtype(_unit_gradient_node(loss, logits, None, grad, None, "LogitNorm"),
                                out_dtype)
            return as_dtype(_EagerReducedLogitNorm.apply(
                logits, target, 1.0 / tau, ignore_index, reduction, write_grad, one_program,
                block_cols or 0), out_dtype)
    count = mean_count(reduction, target, ignore_index, torch.float32)
    if _use_op():
        losses, _ = _logitnorm_rows(logits, target, 1.0 / tau, ignore_index, block_cols or 0)
    else:
        # The upstream gradient each valid row gets from a plain backward of the result (the
        # mean's autograd divides 1 by the same count: an IEEE division, like reciprocal).
        expected = None
        if PREDICT_UPSTREAM and _needs_grad(logits):
            expected = count.reciprocal() if count is not None else 1.0
        losses, _ = _EagerLogitNorm.apply(logits, target, 1.0 / tau, ignore_index,
                                          block_cols or 0, expected)
    return as_dtype(reduce_rows(losses, reduction, count), out_dtype)
