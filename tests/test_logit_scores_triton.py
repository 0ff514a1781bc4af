"""The Triton logit-score kernel on the CPU under TRITON_INTERPRET=1.

TRITON_INTERPRET must be set before triton is first imported, and other test modules of the
same pytest process may import triton first. So the interpreter tests here run only in a child
pytest process started with the variable set (``test_interpreter_suite_in_subprocess``); in the
parent process they are skipped with that reason, and in the child the driver is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
ALL = ("msp", "max_logit", "energy", "entropy", "gen")

interpreter_only = pytest.mark.skipif(
    not INTERPRETING,
    reason="runs in the child process started by test_interpreter_suite_in_subprocess",
)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(INTERPRETING, reason="this is the child process")
def test_interpreter_suite_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def _formula(z, name, temperature=1.0, gamma=0.1, top_m=100):
    from test_logit_scores import formula

    return formula(z, name, temperature, gamma, top_m)


@interpreter_only
@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (17, 10), (70, 100), (5, 1000), (4, 2500)])
def test_triton_matches_formula(shape):
    from elogitnorm_fast.scoring import logit_scores

    logits = torch.randn(*shape) * 4
    out = logit_scores(logits, ALL, backend="triton")
    for name in ALL:
        tol = 5e-4 if name == "gen" else 2e-5
        torch.testing.assert_close(out[name].double(), _formula(logits, name), rtol=tol, atol=tol)


@interpreter_only
def test_triton_matches_torch_path_and_temperature():
    from elogitnorm_fast.scoring import logit_scores

    logits = torch.randn(40, 1500) * 3
    a = logit_scores(logits, ALL, backend="triton")
    b = logit_scores(logits, ALL, backend="torch")
    for name in ALL:
        torch.testing.assert_close(a[name], b[name], rtol=2e-5, atol=2e-5)
    hot = logit_scores(logits, ("energy",), temperature=2.5, backend="triton")["energy"]
    torch.testing.assert_close(hot.double(), _formula(logits, "energy", 2.5), rtol=2e-5, atol=2e-5)


@interpreter_only
def test_triton_masked_rows_strides_and_fp16():
    from elogitnorm_fast.scoring import logit_scores

    logits = torch.randn(9, 1100)
    logits[:, 5:] = -float("inf")
    out = logit_scores(logits, ALL, backend="triton")
    for name in ALL:
        torch.testing.assert_close(
            out[name].double(), _formula(logits[:, :5], name), rtol=1e-5, atol=1e-5
        )
    base = torch.randn(30, 60)
    view = base[::3, ::2]
    out = logit_scores(view, ALL, backend="triton")
    torch.testing.assert_close(out["energy"].double(), _formula(view, "energy"))
    half = (torch.randn(12, 50) * 3).half()
    out = logit_scores(half, ("msp", "energy"), backend="triton")
    torch.testing.assert_close(
        out["energy"].double(), _formula(half, "energy"), rtol=2e-5, atol=2e-5
    )
