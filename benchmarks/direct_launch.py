"""Eager Triton launches without the JIT's per-launch work: a benchmark variant, not the default.

Passed as a loss configuration's ``launch`` (``benchmarks/triton_variants.py``), it replaces
``kernel[grid](...)`` for every eager launch of that call.

``kernel[grid](*args, **kwargs)`` costs tens of microseconds of host time per launch on the
H100 machine (13 us for an empty kernel, about 40 us for the LogitNorm forward's: ``gpu_host.py``),
and eager steps at CIFAR sizes are host-bound. Per launch the JIT (triton 3.6 and 3.9) reads
its knobs and the current device and stream, binds and specializes every argument, builds a
cache key, checks the kernel's globals, builds the launch metadata, and its launcher calls the
launch hooks (in triton 3.6 hook chains, called even when empty) and asks the driver about
every tensor argument (a Python ``data_ptr()`` call and ``cuPointerGetAttribute`` each).

:func:`launch` sends the first launch of each specialization that way and keeps the compiled
kernel; later launches with the same key call its launcher directly, with the tensors'
addresses as integers (the launcher takes an integer as the address itself) and no metadata or
hooks. The key holds at least everything triton specializes on: the kernel, the current device,
the keyword arguments (constexprs and ``num_warps``), each integer and boolean argument's exact
value, each tensor's dtype and whether its address is a multiple of 16, floats by type (triton
does not specialize on a float's value). Registered launch hooks (a profiler's), pre-run hooks
or recorded globals send every launch through the JIT, as does a key not seen before.

The launcher's calling convention (grid, stream, function handle, packed metadata, launch
metadata, the two hooks, then every parameter in order, constexprs included) is what both
triton releases' ``JITFunction.run`` uses; it is not a public API, which is why it stays a
benchmark variant until a GPU run has timed it (``gpu_losses.py``'s ``triton, direct launch``)
and the GPU tests have compared its results (``tests/triton/test_triton_gpu.py``).
"""

from __future__ import annotations

import torch
from triton.runtime import driver

try:
    from triton import knobs
except ImportError:  # triton before 3.4: no knobs (its launch differs); every launch via the JIT
    knobs = None

#: Compiled kernels kept; past it the table is cleared (shapes that change every step).
MAX_ENTRIES = 1024

_COMPILED: dict = {}


def _hooks_registered() -> bool:
    """Whether a launch hook is registered (a hook chain with calls, or a plain callable); True
    without ``triton.knobs``, so that such a triton always launches through its JIT."""
    if knobs is None:
        return True
    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def _key_and_values(kernel, device: int, args: tuple, kwargs: dict) -> tuple[tuple, list]:
    """Everything the JIT's specialization of this launch depends on (see the module text), and
    the runtime arguments as the launcher takes them (tensors as their addresses)."""
    # The kernel by identity (a JITFunction's own hash is Python code, 0.6 us); launch()
    # checks that the entry found is this kernel's.
    parts = [id(kernel), device, tuple(kwargs.items())]
    values = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            address = arg.data_ptr()
            values.append(address)
            parts.append((arg.dtype, address % 16 == 0))
        else:
            values.append(arg)
            # int, bool, None exactly (True and 1 differ in type); a float by type only
            parts.append(float if isinstance(arg, float) else (type(arg), arg))
    return tuple(parts), values


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``: runtime arguments positional, every constexpr and
    launch option (``num_warps``) by keyword, as the kernel modules' call sites pass them."""
    device = driver.active.get_current_device()
    key, values = _key_and_values(kernel, device, args, kwargs)
    entry = _COMPILED.get(key)
    if entry is not None and entry[0] is not kernel:  # another kernel at a reused id
        entry = None
    if entry is None or kernel.pre_run_hooks or kernel.used_global_vals or _hooks_registered():
        compiled = kernel[grid](*args, **kwargs)
        names = kernel.arg_names[len(args):]
        if (entry is None and compiled is not None and not hasattr(compiled, "result")
                and all(name in kwargs for name in names)):
            if len(_COMPILED) >= MAX_ENTRIES:
                _COMPILED.clear()
            _COMPILED[key] = (kernel, compiled.run, compiled.function,
                              compiled.packed_metadata, tuple(kwargs[name] for name in names))
        return
    _, run, function, metadata, constexprs = entry
    run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
        driver.active.get_current_stream(device), function, metadata, None, None, None,
        *values, *constexprs)
