"""The direct launch's bookkeeping (``benchmarks/direct_launch.py``, a benchmark variant), on
the CPU: which launches go through the JIT and which call the compiled kernel's launcher, with
what; and that its key separates every launch that triton's own specialization (this triton's
binder) separates. Whether the launcher runs the kernel right is checked on a GPU
(``tests/triton/test_triton_gpu.py``)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")

BENCHMARKS = str(Path(__file__).resolve().parents[2] / "benchmarks")


def _direct_launch():
    """benchmarks/direct_launch.py (the benchmarks import their helpers by plain name)."""
    sys.path.insert(0, BENCHMARKS)
    try:
        return importlib.import_module("direct_launch")
    finally:
        sys.path.remove(BENCHMARKS)


class _Compiled:
    def __init__(self, calls):
        self.function, self.packed_metadata, self.calls = 1234, ("metadata",), calls

    def run(self, *args):
        self.calls.append(("direct", args))


class _Kernel:
    """Stands in for a ``triton.jit`` kernel: ``kernel[grid](...)`` records a JIT launch."""

    arg_names = ["x_ptr", "n", "scale", "flag", "BLOCK", "EVEN"]

    def __init__(self):
        self.calls, self.pre_run_hooks, self.used_global_vals = [], [], {}

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(("jit", grid, args, kwargs))
            return _Compiled(self.calls)
        return run


class _Active:
    @staticmethod
    def get_current_device():
        return 0

    @staticmethod
    def get_current_stream(device):
        return 77


class _Driver:
    active = _Active()


@pytest.fixture
def direct(monkeypatch):
    direct_launch = _direct_launch()
    monkeypatch.setattr(direct_launch, "driver", _Driver())
    monkeypatch.setattr(direct_launch, "_COMPILED", {})
    return direct_launch


def test_first_launch_through_the_jit_then_direct_with_addresses(direct):
    kernel = _Kernel()
    x = torch.zeros(64)
    direct.launch(kernel, (3,), x, 128, 0.5, True, BLOCK=16, EVEN=False, num_warps=4)
    assert kernel.calls == [("jit", (3,), (x, 128, 0.5, True),
                             {"BLOCK": 16, "EVEN": False, "num_warps": 4})]
    y = torch.zeros(64)  # another tensor, same dtype and alignment; another float
    direct.launch(kernel, (3,), y, 128, 2.0, True, BLOCK=16, EVEN=False, num_warps=4)
    assert kernel.calls[1] == ("direct", (3, 1, 1, 77, 1234, ("metadata",), None, None, None,
                                          y.data_ptr(), 128, 2.0, True, 16, False))
    # Another kernel (same signature, same arguments) never takes this one's entry, even at
    # a reused id.
    other = _Kernel()
    key, _ = direct._key_and_values(other, 0, (y, 128, 2.0, True),
                                    {"BLOCK": 16, "EVEN": False, "num_warps": 4})
    direct._COMPILED[key] = direct._COMPILED.popitem()[1]  # as if at the same id
    direct.launch(other, (3,), y, 128, 2.0, True, BLOCK=16, EVEN=False, num_warps=4)
    direct.launch(other, (3,), y, 128, 2.0, True, BLOCK=16, EVEN=False, num_warps=4)
    assert [call[0] for call in other.calls] == ["jit", "direct"]


@pytest.mark.parametrize("change", ["int", "one", "bool", "dtype", "misaligned", "constexpr",
                                    "warps"])
def test_a_launch_triton_would_specialize_differently_goes_through_the_jit(direct, change):
    kernel = _Kernel()
    args, kwargs = [torch.zeros(64), 128, 0.5, True], {"BLOCK": 16, "EVEN": False,
                                                       "num_warps": 4}
    direct.launch(kernel, (3,), *args, **kwargs)
    if change == "int":
        args[1] = 129
    elif change == "one":  # triton makes an integer 1 a constant
        args[1] = 1
    elif change == "bool":  # True == 1, but a boolean is typed u1
        args[3] = 1
    elif change == "dtype":
        args[0] = torch.zeros(64, dtype=torch.float16)
    elif change == "misaligned":
        args[0] = torch.zeros(65)[1:]
    elif change == "constexpr":
        kwargs["EVEN"] = True
    else:
        kwargs["num_warps"] = 8
    direct.launch(kernel, (3,), *args, **kwargs)
    assert [call[0] for call in kernel.calls] == ["jit", "jit"]
    direct.launch(kernel, (3,), *args, **kwargs)  # now that one is known too
    assert kernel.calls[2][0] == "direct"


def test_hooks_globals_and_an_older_triton_send_launches_through_the_jit(direct, monkeypatch):
    from triton import knobs

    kernel = _Kernel()
    x = torch.zeros(64)
    launch = (kernel, (3,), x, 128, 0.5, True)
    direct.launch(*launch, BLOCK=16, EVEN=False, num_warps=4)
    with monkeypatch.context() as patch:
        patch.setattr(knobs.runtime, "launch_enter_hook", lambda metadata: None)
        direct.launch(*launch, BLOCK=16, EVEN=False, num_warps=4)
    kernel.used_global_vals = {("G", 0): (1, {})}
    direct.launch(*launch, BLOCK=16, EVEN=False, num_warps=4)
    kernel.used_global_vals = {}
    direct.launch(*launch, BLOCK=16, EVEN=False, num_warps=4)
    monkeypatch.setattr(direct, "knobs", None)  # a triton without knobs: always the JIT
    direct.launch(*launch, BLOCK=16, EVEN=False, num_warps=4)
    assert [call[0] for call in kernel.calls] == ["jit", "jit", "jit", "direct", "jit"]


def test_the_key_separates_what_triton_specializes():
    """Launches of the LogitNorm forward kernel with varied arguments: wherever two have the
    same direct-launch key, this triton's binder gives them the same specialization."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from elogitnorm_fast.kernels.logitnorm import _logitnorm_kernel as kernel

    direct_launch = _direct_launch()
    if not hasattr(kernel, "signature"):
        pytest.skip("TRITON_INTERPRET=1 is set: triton.jit gives the interpreter's kernels")

    binder = create_function_from_signature(kernel.signature, kernel.params,
                                            make_backend(GPUTarget("cuda", 90, 32)))
    storage = torch.zeros(4096)
    tensors = [storage[:64], storage[1:65], storage[4:68], torch.zeros(8, dtype=torch.bfloat16)]
    ints = [0, 1, 2, 16, 17, 1 << 31, (1 << 31) + 16, -16]
    floats = [0.5, 1.0, 25.0]
    constexprs = {"WRITE_GRAD": True, "EXPECTED_PTR": False, "REDUCE": 2, "ONE_PROGRAM": True,
                  "SINGLE": True, "ROWS": 16, "BLOCK": 16, "COUNT_BLOCK": 1024,
                  "WRITE_STATS": True}
    seen = {}
    for tensor in tensors:
        for stride in ints:
            for value in floats:
                args = (tensor, stride, storage, storage, storage, 128, 10, value, -100,
                        tensor, storage, value)
                key, _ = direct_launch._key_and_values(kernel, 0, args,
                                                        {**constexprs, "num_warps": 4})
                specialization = repr(binder(*args, **constexprs, num_warps=4)[1])
                assert seen.setdefault(key, specialization) == specialization, args
    # Three kinds of tensor (fp32 at a multiple of 16 bytes: the first and third; fp32 off it;
    # bf16) times the integers; floats never split a key.
    assert len(seen) == 3 * len(ints)


def test_the_launcher_takes_the_direct_path_only_when_given():
    """A configuration's ``launch`` (``direct_launch.launch`` in the benchmark variant) takes a
    kernel's eager launch; without one, the JIT's ``kernel[grid]``."""
    import functools

    import triton

    from elogitnorm_fast.kernels import rows

    direct_launch = _direct_launch()

    @triton.jit
    def _kernel(x_ptr):
        pass

    assert not isinstance(rows.launcher(_kernel, (1,), False), functools.partial)
    launch = rows.launcher(_kernel, (1,), False, direct_launch.launch)
    assert isinstance(launch, functools.partial) and launch.func is direct_launch.launch
    assert launch.args == (_kernel, (1,))
