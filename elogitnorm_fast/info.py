"""``elogitnorm-fast info``: versions, backends (and why the others are not available), devices."""

from __future__ import annotations

import platform

import torch

from .backends import BACKENDS, IMPLEMENTS, unavailable_reason

INTERPRETER_NOTE = (
    "note: TRITON_INTERPRET=1 runs the Triton kernels in a slow Python interpreter, a mode for "
    "debugging kernels; it is not a way to train on the CPU (the cpu and torch backends are)"
)


def collect() -> dict:
    """Everything ``info`` prints, as a dict (also recorded in benchmark JSON)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} ({torch.cuda.get_device_name(i)})"
                    for i in range(torch.cuda.device_count())]
    from . import __version__
    from .extension import triton_interpreting
    from .knn.selection import native_kernels

    return {
        "elogitnorm_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cpu_threads": torch.get_num_threads(),
        # similarity kernels of the native KNN search on this CPU, the one used first
        "knn_cpu_kernels": native_kernels(),
        "devices": devices,
        # the loss backends (the reasons are the same for the other op families)
        "backends": {name: unavailable_reason(name) for name in BACKENDS},
        # per op family, the backends that implement it and why each one cannot run (or None)
        "op_backends": {op: {name: unavailable_reason(name, op=op) for name in names}
                        for op, names in IMPLEMENTS.items()},
        "triton_interpret": triton_interpreting(),
    }


def render(details: dict) -> str:
    lines = [f"{key}: {details[key]}" for key in
             ("elogitnorm_fast", "python", "torch", "torch_cuda", "triton", "cpu_threads")]
    kernels = details["knn_cpu_kernels"]
    lines.append("knn_cpu_kernels: " + (", ".join(kernels) if kernels else "none (no _C)"))
    lines.append("devices: " + ", ".join(details["devices"]))
    lines.append("backends:")
    interpreting = details.get("triton_interpret", False)
    for name, reason in details["backends"].items():
        state = "available" if reason is None else "unavailable: " + reason
        if name == "triton" and reason is None and interpreting:
            state += " (TRITON_INTERPRET=1: the slow Triton interpreter, for debugging only)"
        lines.append(f"  {name:<10} {state}")
    for op, reasons in details.get("op_backends", {}).items():
        running = [name for name, reason in reasons.items() if reason is None]
        lines.append(f"{op} backends: " + (", ".join(running) or "none"))
    if any("TRITON_INTERPRET" in (reason or "") for reason in details["backends"].values()):
        lines.append(INTERPRETER_NOTE)
    return "\n".join(lines)
