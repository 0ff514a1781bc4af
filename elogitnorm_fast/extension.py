"""Loading the compiled extension ``elogitnorm_fast._C`` (C++ / CUDA ops), once, for every user.

Importing ``_C`` registers its ops under ``torch.ops.elogitnorm_fast``; the loss backends, the
logit-scores op and the KNN selection each ask :func:`has_ops` for the ops they need.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=1)
def load_error() -> str | None:
    """Why ``elogitnorm_fast._C`` could not be loaded (None: it is loaded and its ops are
    registered). Tried once per process."""
    try:
        from . import _C  # noqa: F401  (loading the library registers the ops)
    except (ImportError, OSError) as error:  # not built, or built against another torch
        return f"the compiled extension elogitnorm_fast._C is not built ({error})"
    return None


def has_ops(*names: str) -> bool:
    """Whether the extension loaded and registered every op in ``names``."""
    if load_error() is not None:
        return False
    namespace = torch.ops.elogitnorm_fast
    return all(hasattr(namespace, name) for name in names)


def triton_interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1`` asks for the Triton interpreter (kernels on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
