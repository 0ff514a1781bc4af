"""One backend vocabulary and one resolver for the losses, the logit scores and the KNN search.

Backends (:data:`BACKENDS`): ``reference``, ``torch``, ``cpu``, ``cuda``, ``triton``; every
``backend=`` argument also takes ``"auto"``. Each op family (:data:`OPS`: ``"losses"``,
``"linear_losses"`` (the fused linear + loss), ``"logit_scores"``, ``"knn"``) is implemented by
some of them (:data:`IMPLEMENTS`); the table in
``docs/backends.md`` lists them per device with what each needs.

A loss backend is an object with ``NAME``, ``unavailable_reason(device)``,
``elogitnorm_loss(...)`` and ``logitnorm_loss(...)`` (inputs already validated): the modules
``reference_backend``, ``torch_backend``, ``triton_backend`` and the two backends of the compiled
extension, :data:`compiled.CPU` and :data:`compiled.CUDA`, whose ``unavailable_reason`` also
takes the op family (the extension registers each family's ops separately). The modules import
without their optional dependencies (the compiled extension, triton) and then report why.

``backend="auto"`` takes the first available backend of the op family's preference list for the
device; :func:`resolve_backend` returns the choice. Successful resolutions are cached per
(backend, device type, op family), so that after the first call dispatch is one dict lookup,
which ``torch.compile(fullgraph=True)`` traces without a graph break.
"""

from __future__ import annotations

from typing import Any

import torch

from . import compiled, reference_backend, torch_backend, triton_backend

#: Every backend name, in the order listings use.
BACKENDS = ("reference", "torch", "cpu", "cuda", "triton")
#: The op families a ``backend=`` argument selects an implementation of.
OPS = ("losses", "linear_losses", "logit_scores", "knn")
#: The backends that implement each op family.
IMPLEMENTS = {
    "losses": BACKENDS,
    "linear_losses": ("torch", "cpu", "cuda", "triton"),
    "logit_scores": ("torch", "cpu", "triton"),
    "knn": ("torch", "cpu"),
}
#: What ``"auto"`` tries, fastest first, per op family and device type; ``torch`` runs on every
#: device, and device types not listed get it alone.
_PREFERENCE = {
    "losses": {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")},
    "linear_losses": {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")},
    "logit_scores": {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")},
    "knn": {"cpu": ("cpu", "torch")},
}
_OBJECTS: dict[str, Any] = {
    "reference": reference_backend,
    "torch": torch_backend,
    "cpu": compiled.CPU,
    "cuda": compiled.CUDA,
    "triton": triton_backend,
}
_RESOLVED: dict[tuple[str, str, str], Any] = {}


def _check_op(op: object) -> None:
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")


def check_backend_name(backend: object, *, auto: bool = True, op: str | None = None) -> None:
    """Raises unless ``backend`` names a backend (of op family ``op``, if given) or is
    ``"auto"`` (where ``auto``): a ``ValueError`` for another string, a ``TypeError`` for
    anything else. Whether it runs on a device is :func:`unavailable_reason`'s question."""
    names = BACKENDS if op is None else IMPLEMENTS[op]
    if isinstance(backend, str) and (backend in names or (auto and backend == "auto")):
        return
    allowed = f"'auto' or one of {names}" if auto else f"one of {names}"
    family = "" if op is None else f" for {op}"
    message = f"backend must be {allowed}{family}, got {backend!r}"
    raise ValueError(message) if isinstance(backend, str) else TypeError(message)


def _reason(name: str, device: torch.device | None, op: str) -> str | None:
    if name not in IMPLEMENTS[op]:
        return f"the {name} backend does not implement {op} (backends of {op}: {IMPLEMENTS[op]})"
    backend = _OBJECTS[name]
    if isinstance(backend, compiled.CompiledBackend):
        return backend.unavailable_reason(device, op)
    return backend.unavailable_reason(device)


def unavailable_reason(
    name: str, device: torch.device | str | None = None, op: str = "losses"
) -> str | None:
    """Why backend ``name`` cannot run op family ``op`` on ``device`` (None where it can; on
    any device if ``device`` is None). The same text for every op family a backend
    implements."""
    check_backend_name(name, auto=False)
    _check_op(op)
    return _reason(name, None if device is None else torch.device(device), op)


def available_backends(device: torch.device | str | None = None, op: str = "losses") -> list[str]:
    """Names of the backends that run op family ``op`` here (on ``device`` if given, else on
    some device)."""
    return [name for name in BACKENDS if unavailable_reason(name, device, op) is None]


def resolve_backend(backend: str, device: torch.device | str, op: str = "losses") -> Any:
    """The backend (``.NAME`` is its name) that runs op family ``op`` on ``device`` for
    ``backend``: ``"auto"`` (the first available of the device's preference list) or a name.

    Raises the errors of :func:`check_backend_name` for a name that is no backend of ``op``,
    and ``RuntimeError`` naming the backend and the reason when it cannot run there.
    """
    if not isinstance(backend, str):  # unhashable values would fail the lookup obscurely
        check_backend_name(backend, op=op)
    if not isinstance(device, torch.device):
        device = torch.device(device)
    key = (backend, device.type, op)
    if key in _RESOLVED:
        return _RESOLVED[key]
    _check_op(op)
    if backend == "auto":
        for name in _PREFERENCE[op].get(device.type, ("torch",)):
            if _reason(name, device, op) is None:
                break
        else:  # pragma: no cover - torch runs everywhere
            raise RuntimeError(f"no backend available for {op} on device {device}")
    else:
        check_backend_name(backend, op=op)
        reason = _reason(backend, device, op)
        if reason is not None:
            raise RuntimeError(f"backend {backend!r} is not available on {device}: {reason}")
        name = backend
    _RESOLVED[key] = _OBJECTS[name]
    return _RESOLVED[key]
