"""Variants of the ``triton`` backend that ``gpu_losses.py`` times beside it, each answering one
design question with a measurement on the same card, in the same run. Each is a loss function
``(logits, weight, target) -> loss`` that calls the kernel module with another configuration
(``kernels.logitnorm.LogitNormConfig``, ``kernels.elogitnorm.ELogitNormConfig``); nothing in
the package is changed while it runs:

* ``triton streamed``: rows streamed over 4096-column blocks where the default keeps 8192 to
  32768 columns in one block (``rows.MAX_SINGLE_BLOCK``);
* ``triton host reduction``: the mean taken by torch ops from per-row losses instead of in the
  kernel (``reduce``; ELogitNorm up to the ImageNet-1k size);
* ``triton, reduced in blocks``: a small LogitNorm batch's mean reduced by a block of rows per
  program (each counting the valid rows) and a sum, as under CUDA-graph capture, instead of by
  one program, still through the C++ node;
* ``triton, a program per tile``: the LogitNorm backward's check on one program per tile, where
  the default groups the column tiles of the same rows (``check_programs``);
* ``triton, fused rows of 4``: ELogitNorm's fused small-C kernel on 4 rows per program, where
  the default has one (``elogitnorm.fused_blocks``);
* ``triton, dW unsplit``: the small-C weight gradient on one program per block of 16 classes,
  where the default splits D between several programs of each block, each scanning the rows
  again (``class_gradient.PooledConfig.target_programs``);
* ``triton, fused tiles of 4096``: the fused kernel's difference tile of 4096 elements on 4
  warps, where the default has 16384 on 16 warps (``fused_blocks``' ``tile``);
* ``triton, summed per step``: the fused kernel's distance loop summing across threads at every
  step, where the default accumulates elementwise and sums once after the loop
  (``FusedBlocks.deferred_sums``);
* ``triton, GEMM distances``: ELogitNorm at small C through the GEMM path (argmax, one GEMM of
  inner products and the norms on the host, then the per-row kernel) instead of the fused
  kernel (``fused`` None);
* ``triton, counted in blocks``: a LogitNorm mean too large for the kernel's own count of the
  valid rows (``rows.COUNTED_TARGETS``: 4096 x 32768, where each of 4096 programs would read
  all 4096 targets) reduced in the kernel all the same, instead of counted on the host;
* ``triton, Python backward``: an eager sum / mean through the Python autograd Functions (a
  Triton launch in the backward) instead of the C++ node that multiplies the forward's unit
  gradients (``node``; up to the ImageNet-1k size);
* ``triton, direct launch``: eager launches straight to the compiled kernels' launchers
  (``direct_launch.launch`` as the configuration's ``launch``) instead of through the JIT's
  dispatch, at the host-bound target sizes (CIFAR, ImageNet-1k, LogitNorm 4096 x 32768;
  ``gpu_host.py`` times its host side at more).

The configuration is chosen at every call, as the default path chooses its own, so both pay the
same host work for it.
"""

from __future__ import annotations

import dataclasses

import torch

from elogitnorm_fast.reference import DEFAULT_EPS, DEFAULT_TAU

STREAMED_FROM, STREAMED_BLOCK = 8192, 4096
DIRECT_LAUNCH_SIZES = {(128, 10), (128, 100), (256, 1000), (4096, 32768)}


def _capturing(z: torch.Tensor) -> bool:
    return z.is_cuda and torch.cuda.is_current_stream_capturing()


def logitnorm_variant(change, block_cols: int | None = None):
    """A mean LogitNorm through the kernel module with ``change(config, c, d) -> config``
    applied to the configuration chosen for the call (kept as the function's ``change``)."""
    from elogitnorm_fast.kernels import logitnorm

    def run(z, w, y):
        config = change(logitnorm.config_for(*z.shape, "mean", block_cols=block_cols,
                                             capturing=_capturing(z)), z.shape[1], 0)
        loss = logitnorm.logitnorm_loss(z, y, tau=DEFAULT_TAU, reduction="mean",
                                        ignore_index=-100, config=config)
        return loss.to(z.dtype)

    run.change = change
    return run


def elogitnorm_variant(change, block_cols: int | None = None):
    """A mean ELogitNorm through the kernel module with ``change`` applied to its config."""
    from elogitnorm_fast.kernels import elogitnorm

    def run(z, w, y):
        config = change(elogitnorm.config_for(z.shape[0], z.shape[1], w.shape[1], "mean",
                                              block_cols=block_cols, capturing=_capturing(z)),
                        z.shape[1], w.shape[1])
        loss = elogitnorm.elogitnorm_loss(z, w, y, reduction="mean", ignore_index=-100,
                                          eps=DEFAULT_EPS, divisor=z.shape[1], config=config)
        return loss.to(z.dtype)

    run.change = change
    return run


def _variant(loss: str, change, block_cols: int | None = None):
    return (elogitnorm_variant if loss == "elogitnorm" else logitnorm_variant)(change,
                                                                               block_cols)


def _replace(**changes):
    return lambda config, c, d: dataclasses.replace(config, **changes)


def _unchanged(config, c, d):
    return config


def streamed_triton(loss: str, c: int):
    return _variant(loss, _unchanged, block_cols=STREAMED_BLOCK)


def host_reduced_triton(loss: str = "logitnorm"):
    if loss == "elogitnorm":
        return elogitnorm_variant(_replace(reduce=False, node=False))
    return logitnorm_variant(_replace(reduce=None, node=False))


def blockwise_reduced_triton():
    """Only the reduction changes: the step still returns through the C++ node."""
    def change(config, c, d):
        if config.reduce != "one program":
            return config
        return dataclasses.replace(config, reduce="blocks")

    return logitnorm_variant(change)


def per_tile_check_triton():
    return logitnorm_variant(_replace(check_programs=1 << 40))


def _fused_blocks(**options):
    """A change that gives the fused kernel (where it runs) other blocks."""
    from elogitnorm_fast.kernels import elogitnorm

    def change(config, c, d):
        if config.fused is None:
            return config
        return dataclasses.replace(config, fused=elogitnorm.fused_blocks(c, d, **options))

    return change


def four_rows_fused_triton():
    return elogitnorm_variant(_fused_blocks(rows=4))


def unsplit_pooled_triton():
    def change(config, c, d):
        if config.pooled is None:
            return config
        return dataclasses.replace(
            config, pooled=dataclasses.replace(config.pooled, target_programs=0))

    return elogitnorm_variant(change)


def small_tile_fused_triton():
    return elogitnorm_variant(_fused_blocks(tile=4096))


def per_step_sums_triton():
    return elogitnorm_variant(_fused_blocks(deferred_sums=False))


def pools_weight_gradient(n: int, c: int) -> bool:
    from elogitnorm_fast.kernels import class_gradient

    return class_gradient.pooled_config(n, c) is not None


def gemm_distances_triton():
    return elogitnorm_variant(_replace(fused=None))


def kernel_counted_triton():
    def change(config, c, d):
        return dataclasses.replace(config, reduce="blocks") if config.reduce is None else config

    return logitnorm_variant(change)


def launch_triton(loss: str, launch):
    """The default configuration with ``launch`` for its eager launches."""
    return _variant(loss, _replace(launch=launch))


def direct_launch_triton(loss: str):
    from direct_launch import launch

    return launch_triton(loss, launch)


def python_backward_triton(loss: str, launch=None):
    return _variant(loss, _replace(node=False, launch=launch))


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
    from elogitnorm_fast.kernels import logitnorm

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
        reduce = logitnorm.config_for(n, c, "mean").reduce
        if reduce == "one program":
            variants["triton, reduced in blocks"] = blockwise_reduced_triton()
        if reduce is not None:
            variants["triton host reduction"] = host_reduced_triton()
        else:
            variants["triton, counted in blocks"] = kernel_counted_triton()
    elif n * c <= 256 * 1000:
        variants["triton host reduction"] = host_reduced_triton(loss)
    if n * c <= 256 * 1000 and takes_node(loss, n, c, d):
        variants["triton, Python backward"] = python_backward_triton(loss)
    if (n, c) in DIRECT_LAUNCH_SIZES:
        variants["triton, direct launch"] = direct_launch_triton(loss)
    return variants


def takes_node(loss: str, n: int, c: int, d: int = 1) -> bool:
    """Whether an eager mean of this size returns through the C++ node, as the kernel module
    chooses it."""
    from elogitnorm_fast.kernels import elogitnorm, logitnorm

    if loss == "elogitnorm":
        return elogitnorm.config_for(n, c, d, "mean").node
    return logitnorm.config_for(n, c, "mean").node

