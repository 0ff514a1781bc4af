"""Backend registry and the one dispatch point.

Each backend is a module with ``NAME``, ``unavailable_reason(device) -> str | None``,
``elogitnorm_loss(...)`` and ``logitnorm_loss(...)`` (inputs already validated). Modules are
imported lazily so that a missing optional dependency (triton, the compiled extension) only
disables its own backend.

``backend="auto"`` takes the first available backend of the device's preference list; the
choice is visible through :func:`resolve_backend`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

#: Backend name -> module (relative to this package).
_MODULES = {
    "reference": ".reference_backend",
    "torch": ".torch_backend",
    "cpu": ".cpu_backend",
    "cuda": ".cuda_backend",
    "triton": ".triton_backend",
}
#: Fastest first, per device type; ``torch`` runs everywhere.
_PREFERENCE = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}
BACKENDS = tuple(_MODULES)


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(_MODULES[name], __name__), None
    except ImportError as error:  # optional dependency missing
        return None, f"{name} backend could not be imported: {error}"


def unavailable_reason(name: str, device: torch.device | str | None = None) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (None where it can; any device if None)."""
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    module, reason = _load(name)
    if module is None:
        return reason
    return module.unavailable_reason(None if device is None else torch.device(device))


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends that run here (on ``device`` if given, else on some device)."""
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]


def resolve_backend(backend: str, device: torch.device) -> ModuleType:
    """The backend module for ``backend`` ("auto" or a name) on ``device``.

    Raises ``RuntimeError`` naming the backend and the reason when it cannot run there.
    """
    if backend == "auto":
        for name in _PREFERENCE.get(device.type, ("torch",)):
            module, _ = _load(name)
            if module is not None and module.unavailable_reason(device) is None:
                return module
        raise RuntimeError(f"no backend available for device {device}")  # pragma: no cover
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is not available on {device}: {reason}")
    module, _ = _load(backend)
    assert module is not None
    return module
