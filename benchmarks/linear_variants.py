"""The linear layer + loss variants the fused-linear benchmarks compare, one definition for
``bench_linear_losses.py``, ``linear_memory.py`` and ``gpu_linear.py``."""

from __future__ import annotations

import torch.nn.functional as F


def loss_function(name: str, backend: str, chunk_rows: int | None = None):
    """``loss(features, weight, bias, target)`` of variant ``name``: ``fused_elogitnorm`` /
    ``fused_logitnorm`` (the fused losses on ``backend``, ``chunk_rows``), ``unfused_elogitnorm``
    / ``unfused_logitnorm`` (``F.linear`` then the loss on ``backend``),
    ``unfused_cross_entropy``, ``liger_fused_linear_cross_entropy`` (``ImportError`` where
    Liger-Kernel is not installed)."""
    import elogitnorm_fast as ef

    if name == "fused_elogitnorm":
        return lambda x, w, b, y: ef.linear_elogitnorm_loss(x, w, b, y, backend=backend,
                                                            chunk_rows=chunk_rows)
    if name == "fused_logitnorm":
        return lambda x, w, b, y: ef.linear_logitnorm_loss(x, w, b, y, backend=backend,
                                                           chunk_rows=chunk_rows)
    if name == "unfused_elogitnorm":
        return lambda x, w, b, y: ef.elogitnorm_loss(F.linear(x, w, b), w, y, backend=backend)
    if name == "unfused_logitnorm":
        return lambda x, w, b, y: ef.logitnorm_loss(F.linear(x, w, b), y, backend=backend)
    if name == "unfused_cross_entropy":
        return lambda x, w, b, y: F.cross_entropy(F.linear(x, w, b), y)
    if name == "liger_fused_linear_cross_entropy":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        criterion = LigerFusedLinearCrossEntropyLoss()
        return lambda x, w, b, y: criterion(w, x, y, b)
    raise ValueError(f"unknown variant {name!r}")
