"""Where the ``triton`` backend is unavailable: CPU tensors without the interpreter, and a
machine without triton (the package still imports, the other backends still work)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import elogitnorm_fast as ef

from parity import make_case


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="the interpreter accepts CPU tensors")
def test_cpu_tensors_rejected_without_the_interpreter():
    reason = ef.unavailable_reason("triton", "cpu")
    assert reason is not None and ("TRITON_INTERPRET" in reason or "triton" in reason)
    logits, weight, target = make_case(4, 3, 2, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="triton"):
        ef.elogitnorm_loss(logits, weight, target, backend="triton")


def test_package_works_when_triton_is_missing():
    """With triton unimportable the package imports, triton is unavailable, torch works."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, elogitnorm_fast as ef\n"
        "assert 'triton' not in ef.available_backends(), ef.available_backends()\n"
        "print(ef.unavailable_reason('triton'))\n"
        "z = torch.randn(4, 3, requires_grad=True); w = torch.randn(3, 2)\n"
        "ef.elogitnorm_loss(z, w, torch.tensor([0, 1, 2, 0])).backward()\n"
        "assert 'triton' not in sys.modules or sys.modules['triton'] is None\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "triton" in done.stdout
