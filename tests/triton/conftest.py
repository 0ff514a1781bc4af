"""The Triton tests: an interpreter suite, and the tests that need no interpreter.

Triton picks its interpreter when the kernels are defined, from ``TRITON_INTERPRET`` in the
environment, so the files of :data:`INTERPRETER_FILES` (kernels run on CPU tensors) are collected
only in a pytest process started with it: ``./run test`` starts one for this folder::

    TRITON_INTERPRET=1 python -m pytest tests/triton

Elsewhere (the main run, ``pytest tests -m gpu`` on a GPU machine) they are not collected, and the
rest of this folder runs: the AOT compile and traced-writes checks (which need the real compiler,
so they skip under the interpreter), the GPU tests and the launch arithmetic.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
INTERPRETER_FILES = {
    "test_parity.py",
    "test_extremes.py",
    "test_reductions.py",
    "test_logitnorm_backward.py",
    "test_node_path.py",
    "test_pooled_gradient.py",
    "test_host_work.py",
    "test_logit_scores_triton.py",
    "test_autocast_interpreted.py",
    "test_in_place_interpreted.py",
    "test_linear_losses_interpreted.py",
}

# The interpreted halves of behaviours tested elsewhere reuse those files' helpers.
for folder in ("losses", "scoring"):
    path = str(Path(__file__).resolve().parents[1] / folder)
    if path not in sys.path:
        sys.path.append(path)


def pytest_ignore_collect(collection_path, config):
    """Interpreter files outside an interpreter process: not collected (None: pytest decides)."""
    if collection_path.name in INTERPRETER_FILES and not INTERPRETING:
        return True
    return None


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # masked-out lanes compute log(0)
        yield
