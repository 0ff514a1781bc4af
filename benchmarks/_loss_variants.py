"""Variants of the ``triton`` backend that ``gpu_losses.py`` times beside it, each answering one
design question with a measurement on the same card, in the same run:

* ``triton streamed``: rows streamed over 4096-column blocks where the launcher keeps 8192 to
  32768 columns in one block (``MAX_SINGLE_BLOCK``);
* ``triton host reduction``: the mean taken on the host from per-row losses instead of in the
  kernel (``REDUCE_IN_KERNEL``; ELogitNorm up to the ImageNet-1k size);
* ``triton, reduced in blocks``: a small LogitNorm batch's mean reduced by a block of rows per
  program (each counting the valid rows) and a sum, as under CUDA-graph capture, instead of by
  one program (``logitnorm.reduces_in_one_program``), still through the C++ node;
* ``triton, a program per tile``: the LogitNorm backward's check on one program per tile, as
  before it grouped the column tiles of the same rows (``rows.CHECK_PROGRAMS``);
* ``triton, fused rows of 4``: ELogitNorm's fused small-C kernel on 4 rows per program, where
  the default (``elogitnorm.FUSED_ROWS``) has one;
* ``triton, dW unsplit``: the small-C weight gradient on one program per block of 16 classes,
  where the default splits D between several programs of each block, each scanning the rows
  again (``class_gradient.TARGET_PROGRAMS``; at C = 100, D = 512: 7 programs against 112);
* ``triton, fused tiles of 4096``: the fused kernel's difference tile of 4096 elements on 4
  warps (16 feature steps at C = 100, D = 512), where the default (``elogitnorm.FUSED_TILE``)
  has 16384 on 16 warps (4 steps);
* ``triton, summed per step``: the fused kernel's distance loop summing across threads at
  every step, where the default (``elogitnorm.DEFERRED_SUMS``) accumulates elementwise and
  sums once after the loop;
* ``triton, GEMM distances``: ELogitNorm at small C through the GEMM path (argmax, one GEMM of
  inner products and the norms on the host, then the per-row kernel) instead of the fused
  kernel (``elogitnorm.FUSED_MAX_CLASSES``);
* ``triton, counted in blocks``: a LogitNorm mean too large for the kernel's own count of the
  valid rows (``rows.COUNTED_TARGETS``: 4096 x 32768, where each of 4096 programs would read
  all 4096 targets, 128 MiB from L2) reduced in the kernel all the same, instead of counted on
  the host before the launch (3 more torch ops there, and the host's sum and division after);
* ``triton, Python backward``: an eager sum / mean through the Python autograd Functions (a
  Triton launch in the backward) instead of the C++ node that multiplies the forward's unit
  gradients (``NATIVE_BACKWARD``; up to the ImageNet-1k size);
* ``triton, direct launch``: eager launches straight to the compiled kernels' launchers
  (``kernels.direct_launch.ENABLED``, off by default) instead of through the JIT's dispatch, at
  the host-bound target sizes (CIFAR, ImageNet-1k, LogitNorm 4096 x 32768; ``gpu_host.py``
  times its host side at more).

A variant that changes a module setting carries it as ``fn.context``, which the benchmark's
runner enters around the forward and the backward both (the backward reads some of them).
"""

from __future__ import annotations

import importlib

import elogitnorm_fast as ef

STREAMED_FROM, STREAMED_BLOCK = 8192, 4096
DIRECT_LAUNCH_SIZES = {(128, 10), (128, 100), (256, 1000), (4096, 32768)}


class _Setting:
    """``module.name = value`` while entered, the old value back on exit. The runner enters it
    on every timed call, so it is two attribute writes (``mock.patch.object`` took 2.5 us a call
    on the CPU, and would count in an eager variant's time against the default)."""

    def __init__(self, module, name: str, value):
        self.module, self.name, self.value = module, name, value

    def __enter__(self):
        self.saved = getattr(self.module, self.name)
        setattr(self.module, self.name, self.value)

    def __exit__(self, *exc_info):
        setattr(self.module, self.name, self.saved)


def _with_setting(loss, module: str, name: str, value):
    """``loss`` (a function, or ``"logitnorm"`` / ``"elogitnorm"`` on the triton backend) as a new
    function carrying ``context``: ``module.name = value`` while entered."""
    target = importlib.import_module(module)
    loss = {"logitnorm": _logitnorm, "elogitnorm": _elogitnorm}.get(loss, loss)

    def run(z, w, y):
        return loss(z, w, y)

    run.context = lambda: _Setting(target, name, value)
    return run


def _logitnorm(z, w, y):
    return ef.logitnorm_loss(z, y, backend="triton")


def _elogitnorm(z, w, y):
    return ef.elogitnorm_loss(z, w, y, backend="triton")


def streamed_triton(loss: str, c: int):
    from elogitnorm_fast.backends import triton_backend
    from elogitnorm_fast.reference import DEFAULT_EPS, DEFAULT_TAU

    if loss == "elogitnorm":
        return lambda z, w, y: triton_backend.elogitnorm_loss(
            z, w, y, reduction="mean", ignore_index=-100, eps=DEFAULT_EPS, divisor=c,
            block_cols=STREAMED_BLOCK)
    return lambda z, w, y: triton_backend.logitnorm_loss(
        z, y, tau=DEFAULT_TAU, reduction="mean", ignore_index=-100, block_cols=STREAMED_BLOCK)


def host_reduced_triton(loss: str = "logitnorm"):
    return _with_setting(loss, "elogitnorm_fast.backends.triton_backend", "REDUCE_IN_KERNEL",
                         False)


def blockwise_reduced_triton():
    """Only the reduction changes: the step still returns through the C++ node. (Until
    42073b4 this variant posed as a CUDA-graph capture, which also turned the node off, so its
    H100 rows compared blocks + Python backward with one program + node.)"""
    return _with_setting(_logitnorm, "elogitnorm_fast.kernels.logitnorm",
                         "reduces_in_one_program", lambda n_rows, n_cols: False)


def per_tile_check_triton():
    return _with_setting(_logitnorm,
                         "elogitnorm_fast.kernels.rows", "CHECK_PROGRAMS", 1 << 40)


def four_rows_fused_triton():
    return _with_setting(_elogitnorm,
                         "elogitnorm_fast.kernels.elogitnorm", "FUSED_ROWS", 4)


def unsplit_pooled_triton():
    return _with_setting(_elogitnorm,
                         "elogitnorm_fast.kernels.class_gradient", "TARGET_PROGRAMS", 0)


def small_tile_fused_triton():
    return _with_setting(_elogitnorm, "elogitnorm_fast.kernels.elogitnorm", "FUSED_TILE", 4096)


def per_step_sums_triton():
    return _with_setting(_elogitnorm, "elogitnorm_fast.kernels.elogitnorm", "DEFERRED_SUMS", False)


def pools_weight_gradient(n: int, c: int) -> bool:
    from elogitnorm_fast.kernels import class_gradient

    return class_gradient.pools(n, c)


def gemm_distances_triton():
    return _with_setting(_elogitnorm, "elogitnorm_fast.kernels.elogitnorm", "FUSED_MAX_CLASSES", 0)


def kernel_counted_triton():
    return _with_setting(_logitnorm, "elogitnorm_fast.kernels.rows", "COUNTED_TARGETS", 1 << 40)


def direct_launch_triton(loss: str):
    return _with_setting(loss, "elogitnorm_fast.kernels.direct_launch", "ENABLED", True)


def python_backward_triton(loss: str):
    return _with_setting(loss, "elogitnorm_fast.backends.triton_backend", "NATIVE_BACKWARD",
                         False)


def fuses_distances(c: int, d: int) -> bool:
    from elogitnorm_fast.kernels import elogitnorm

    return elogitnorm.fuses_distances(c, d)


def groups_check_tiles(n: int, c: int) -> bool:
    """Whether the LogitNorm backward's check puts several column tiles in one program here."""
    from elogitnorm_fast.kernels import rows

    return rows.grouped_tile_grid(n, c)[3] > 1


def triton_variants(loss: str, n: int, c: int, d: int) -> dict:
    """name -> callable(logits, weight, target) of the variants that differ from ``triton`` at
    this size."""
    variants = {}
    if STREAMED_FROM <= c <= 32768:
        variants["triton streamed"] = streamed_triton(loss, c)
    if loss == "elogitnorm" and fuses_distances(c, d):
        variants["triton, fused rows of 4"] = four_rows_fused_triton()
        variants["triton, fused tiles of 4096"] = small_tile_fused_triton()
        variants["triton, summed per step"] = per_step_sums_triton()
        variants["triton, GEMM distances"] = gemm_distances_triton()
        if pools_weight_gradient(n, c):
            variants["triton, dW unsplit"] = unsplit_pooled_triton()
    if loss == "logitnorm" and groups_check_tiles(n, c):
        variants["triton, a program per tile"] = per_tile_check_triton()
    if loss == "logitnorm":
        from elogitnorm_fast.kernels import logitnorm

        if logitnorm.reduces_in_one_program(n, c):
            variants["triton, reduced in blocks"] = blockwise_reduced_triton()
        if logitnorm.reduces_in_one_program(n, c) or logitnorm.reduces_in_blocks(n, c, "mean"):
            variants["triton host reduction"] = host_reduced_triton()
        else:
            variants["triton, counted in blocks"] = kernel_counted_triton()
    elif n * c <= 256 * 1000:
        variants["triton host reduction"] = host_reduced_triton(loss)
    if n * c <= 256 * 1000 and _takes_node(loss, n, c):
        variants["triton, Python backward"] = python_backward_triton(loss)
    if (n, c) in DIRECT_LAUNCH_SIZES:
        variants["triton, direct launch"] = direct_launch_triton(loss)
    return variants


def _takes_node(loss: str, n: int, c: int) -> bool:
    """Whether an eager mean of this size returns through the C++ node (LogitNorm: reduced in
    the kernel and small enough, as the backend decides it)."""
    from elogitnorm_fast.backends import triton_backend

    if loss == "elogitnorm":
        return True
    return (triton_backend.logitnorm_kernel_reduction(n, c, "mean") is not None
            and triton_backend.node_carries_logitnorm(n, c))
