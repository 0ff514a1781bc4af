"""Shared by the command line and the demo: user errors, argument checks that run before any
work starts, and output files written all or nothing.

Outputs go to temporary files beside their final names (same folder, so the rename is atomic)
and are renamed into place only once every file of the run has been written; a run that fails
or is interrupted before that leaves the previous outputs as they were and removes its
temporary files. The renames themselves run with Ctrl-C deferred, so an interrupt cannot stop
a run half-way through replacing its outputs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import BinaryIO

import torch

from .progress import stderr_is_terminal

#: Device types the command line runs on (others, such as ``meta``, hold no data).
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


class UsageError(ValueError):
    """A mistake in what the user asked for: the command line prints ``error: <message>`` (one
    line) and exits with status 2."""


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """``error``'s text on one line (whitespace runs collapsed), cut to ``limit`` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_device(text: str, label: str = "--device") -> torch.device:
    """The torch device named by ``text`` when this machine has it, else :class:`UsageError`
    naming ``label`` and ``text``."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"{label}: {text!r} is not a device name (e.g. cpu, cuda, cuda:1)"
                         ) from None
    if device.type not in DEVICE_TYPES:
        raise UsageError(f"{label}: device type {device.type!r} of {text!r} is not supported; "
                         f"choose from {', '.join(DEVICE_TYPES)}")
    if device.type == "cpu":
        return device
    module = getattr(torch, device.type, None) if device.type != "mps" else torch.backends.mps
    if module is None or not module.is_available():
        raise UsageError(f"{label}: {text!r} is not available here (torch {torch.__version__} "
                         f"sees no {device.type} device)")
    count = module.device_count() if hasattr(module, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise UsageError(f"{label}: {text!r} does not exist; this machine has {count} "
                         f"{device.type} device(s)")
    return device


def check_output_dir(path: str, label: str = "--out", names: Iterable[str] = ()) -> None:
    """Raise :class:`UsageError` unless ``path`` is a folder, or can be created as one, that
    this process may write to, and none of ``names`` inside it is a folder."""
    if not path:
        raise UsageError(f"{label}: an empty path is not a folder")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{label}: {path!r} exists and is not a folder")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        raise UsageError(f"{label}: cannot create {path!r}: {existing!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{label}: cannot write into {existing!r} (permission denied)")
    for name in names:
        target = os.path.join(path, name)
        if os.path.isdir(target):
            raise UsageError(f"{label}: the output {target!r} exists and is a folder")


def resolve_progress(flag: bool | None) -> bool:
    """Progress bars on when asked (``True``), off when refused, else only when stderr is a
    terminal: in a log file every refresh of a bar would be a line of its own."""
    return flag if flag is not None else stderr_is_terminal()


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Run the block to its end even when Ctrl-C (SIGINT) arrives, then raise the interrupt.

    Only the main thread receives signals in Python; elsewhere the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt


def _missing_folders(folder: str) -> list[str]:
    """The folders ``os.makedirs(folder)`` would create, outermost first."""
    missing = []
    current = os.path.abspath(folder)
    while not os.path.exists(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return missing[::-1]


def _temporary_file(folder: str, name: str) -> tuple[str, BinaryIO]:
    """A new, hidden file beside ``name`` (mode from the umask, like a plain open)."""
    while True:
        path = os.path.join(folder, f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        return path, os.fdopen(descriptor, "wb")


def write_files(folder: str, writers: Mapping[str, Callable[[BinaryIO], object]]) -> list[str]:
    """Write the files of ``writers`` (file name -> function writing the bytes to an open
    binary file) into ``folder``, all or nothing; returns their paths in the given order.

    Each file is written and synced under a temporary name in ``folder``; once all are, they
    are renamed over their final names (Ctrl-C deferred meanwhile). If a writer raises (or the
    run is interrupted) before that, the temporary files are removed, folders this call
    created are removed again, the previous files stay untouched, and the error propagates.
    Names must be plain file names: ``ValueError`` otherwise, before anything is written.
    """
    for name in writers:
        if (not name or name in (".", "..") or "/" in name or "\\" in name
                or os.sep in name or (os.altsep is not None and os.altsep in name)):
            raise ValueError(f"output file name must be a plain file name, got {name!r}")
    created = _missing_folders(folder)
    temporary: dict[str, str] = {}
    finished = False
    try:
        os.makedirs(folder, exist_ok=True)
        for name, write in writers.items():
            path, handle = _temporary_file(folder, name)
            temporary[name] = path
            with handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
        with deferred_interrupt():
            finals = []
            for name, path in temporary.items():
                final = os.path.join(folder, name)
                os.replace(path, final)
                finals.append(final)
            finished = True
        return finals
    finally:
        if not finished:
            for path in temporary.values():
                with contextlib.suppress(OSError):
                    os.remove(path)
            for path in reversed(created):
                with contextlib.suppress(OSError):
                    os.rmdir(path)
