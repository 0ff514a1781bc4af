"""Every Triton kernel compiles for sm_90 (and the loss kernels for sm_80) without a GPU.

The interpreter tests check what the kernels compute; these check that the real compiler accepts
them, in the configurations the launchers use (``triton_aot.py``), so a kernel cannot break on a
GPU machine unseen. They run in this process: the interpreter is not involved in compilation.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from triton_aot import KernelConfig, compile_config, loss_configs, other_configs, ptxas_usage

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                       reason="triton is not installed"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="kernels defined under the interpreter are not compiled"),
]


def _has_nvidia_backend() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module", autouse=True)
def _nvidia_backend():
    if not _has_nvidia_backend():
        pytest.skip("this triton build has no NVIDIA backend")


@pytest.mark.parametrize("config", loss_configs() + other_configs(), ids=lambda c: c.label)
def test_kernel_compiles_for_sm90(config: KernelConfig):
    compiled = compile_config(config, 90)
    assert compiled.asm["cubin"], config.label
    assert ".entry" in compiled.asm["ptx"]


@pytest.mark.parametrize(
    "config",
    [c for c in loss_configs()
     if dict(c.constexprs)["BLOCK"] == 1024 or c.kernel == "_elogitnorm_fused_kernel"],
    ids=lambda c: c.label,
)
def test_loss_kernels_compile_for_sm80(config: KernelConfig):
    compiled = compile_config(config, 80)
    assert compiled.asm["cubin"], config.label


def test_ptxas_reports_registers():
    config = other_configs()[0]
    usage = ptxas_usage(compile_config(config, 90).asm["ptx"], 90)
    assert 0 < usage["registers"] <= 255
    assert usage["spill_store_bytes"] >= 0 and usage["spill_load_bytes"] >= 0
