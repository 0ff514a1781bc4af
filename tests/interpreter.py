"""Run the Triton-interpreter half of a test module in a child pytest process.

Triton picks its interpreter when the kernels are defined, from ``TRITON_INTERPRET`` in the
environment; another module of the same pytest process may already have imported triton without
it. So a module with interpreter tests splits in two halves: the parent half (the normal run)
calls :func:`run_child`, which runs the same file again with ``TRITON_INTERPRET=1`` and the
:data:`FLAG` variable set, and the child half holds the tests guarded by :func:`inside`. Run a
child half directly with::

    TRITON_INTERPRET=1 ELOGITNORM_FAST_TRITON_INNER=1 python -m pytest tests/<module>.py

Example::

    if not interpreter.inside():
        def test_triton_half():
            interpreter.run_child(__file__)
    else:
        def test_kernel(): ...
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

#: Set in the child's environment; the same variable ``test_triton_backend.py`` uses, so one
#: command runs the interpreter halves of several modules.
FLAG = "ELOGITNORM_FAST_TRITON_INNER"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def inside() -> bool:
    """Whether this process is a child started by :func:`run_child` (or by hand, as above)."""
    return os.environ.get(FLAG) == "1"


def run_child(test_file: str, *args: str, timeout: float = 900) -> str:
    """Runs ``test_file`` in a child pytest with the interpreter on and asserts that it passed;
    returns the child's summary line. ``args``: more pytest arguments (``-k`` expressions)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", **{FLAG: "1"})
    command = [sys.executable, "-m", "pytest", test_file, "-q", "-x", "-p", "no:cacheprovider",
               "-W", "ignore::RuntimeWarning", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=root)
    report = done.stdout[-6000:] + done.stderr[-3000:]
    assert done.returncode == 0, report
    assert " passed" in done.stdout and " failed" not in done.stdout, report
    return done.stdout.strip().splitlines()[-1]
