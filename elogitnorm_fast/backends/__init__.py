"""Backend registry and the one dispatch point.

Each backend is a module with ``NAME``, ``unavailable_reason(device) -> str | None``,
``elogitnorm_loss(...)`` and ``logitnorm_loss(...)`` (inputs already validated). A backend
module whose optional dependency (the compiled extension) is missing fails to import and only
disables itself; triton itself is imported by the triton backend only when a kernel runs.

``backend="auto"`` takes the first available backend of the device's preference list; the
choice is visible through :func:`resolve_backend`. Successful resolutions are cached per
(backend, device type), so that after the first call dispatch is one dict lookup, which
``torch.compile(fullgraph=True)`` traces without a graph break.
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


_LOADED: dict[str, tuple[ModuleType | None, str | None]] = {}
_RESOLVED: dict[tuple[str, str], ModuleType] = {}


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    if name not in _LOADED:
        try:
            _LOADED[name] = importlib.import_module(_MODULES[name], __name__), None
        except ImportError as error:  # optional dependency missing
            _LOADED[name] = None, f"{name} backend could not be imported: {error}"
    return _LOADED[name]


def check_backend_name(backend: object, *, auto: bool = True) -> None:
    """Raises unless ``backend`` names a backend (or is ``"auto"``, where ``auto``): a
    ``ValueError`` for another string, a ``TypeError`` for anything else. Whether it runs on a
    device is :func:`unavailable_reason`'s question."""
    if isinstance(backend, str) and (backend in _MODULES or (auto and backend == "auto")):
        return
    names = f"'auto' or one of {BACKENDS}" if auto else f"one of {BACKENDS}"
    message = f"backend must be {names}, got {backend!r}"
    raise ValueError(message) if isinstance(backend, str) else TypeError(message)


def unavailable_reason(name: str, device: torch.device | str | None = None) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (None where it can; any device if None)."""
    check_backend_name(name, auto=False)
    module, reason = _load(name)
    if module is None:
        return reason
    return module.unavailable_reason(None if device is None else torch.device(device))


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends that run here (on ``device`` if given, else on some device)."""
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]


def resolve_backend(backend: str, device: torch.device) -> ModuleType:
    """The backend module for ``backend`` ("auto" or a name) on ``device``.

    Raises ``RuntimeError`` naming the backend and the reason when it cannot run there, and
    the errors of :func:`check_backend_name` for a name that is no backend's.
    """
    if not isinstance(backend, str):  # unhashable values would fail the lookup obscurely
        check_backend_name(backend)
    key = (backend, device.type)
    if key in _RESOLVED:
        return _RESOLVED[key]
    if backend == "auto":
        for name in _PREFERENCE.get(device.type, ("torch",)):
            module, _ = _load(name)
            if module is not None and module.unavailable_reason(device) is None:
                break
        else:  # pragma: no cover - torch runs everywhere
            raise RuntimeError(f"no backend available for device {device}")
    else:
        check_backend_name(backend)
        reason = unavailable_reason(backend, device)
        if reason is not None:
            raise RuntimeError(f"backend {backend!r} is not available on {device}: {reason}")
        module, _ = _load(backend)
    _RESOLVED[key] = module
    return module


def _load_all() -> None:
    """Import every backend module now (cheap: none imports triton at module level), so that
    dispatch inside ``torch.compile`` never has to trace an import."""
    for name in _MODULES:
        _load(name)


_load_all()
