"""Feature banks for the KNN scorer: validation, L2 normalisation, chunked streaming.

A bank comes from a ``torch.Tensor``, a ``numpy`` array, or the path of a ``.npy`` file, which is
read in chunks of rows (:class:`NpyFile`), so a bank larger than host memory can be moved to a
GPU or scored straight from disk (``in_memory=False``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..progress import progress_bar

BankInput = torch.Tensor | np.ndarray | str | os.PathLike

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


class NpyFile:
    """Rows of a 2-D ``.npy`` file, read on demand with ordinary reads.

    Not a memory map: a mapped file that shrinks later kills the process with SIGBUS on the
    next access, while a read of a shrunk file only comes back short, which becomes an error.
    Each read reopens the file and compares its identity (device, inode), size and
    modification time with those seen when this object was made; any difference (rewritten,
    replaced, truncated, appended) raises ``ValueError`` naming the file, so rows fitted from
    one version are never mixed with another. Reading costs one copy of the rows, as copying
    a chunk out of a memory map did. Slicing rows (``file[a:b]``) gives a view of those rows.
    """

    def __init__(self, path: str | os.PathLike, name: str = "bank_features") -> None:
        self.path = os.fspath(path)
        self.name = name
        try:
            with open(self.path, "rb") as handle:
                self._identity = _identity(os.fstat(handle.fileno()))
                shape, fortran, dtype, self._data_offset = _read_header(handle)
        except OSError as error:
            raise ValueError(f"{name}: cannot read {self.path!r}: {_one_line(error)}") from None
        except ValueError as error:
            raise ValueError(f"{name}: {self.path!r} is not a readable .npy file "
                             f"({_one_line(error)})") from None
        if len(shape) != 2:
            raise ValueError(f"{name}: {self.path!r} must hold a 2-D array (rows, dim), got "
                             f"shape {tuple(shape)}")
        if dtype.hasobject or dtype.kind not in "fiu" or dtype.itemsize > 8:
            raise ValueError(f"{name}: {self.path!r} must hold numbers (float or int), got "
                             f"dtype {dtype}")
        needed = self._data_offset + shape[0] * shape[1] * dtype.itemsize
        if self._identity[2] < needed:
            raise ValueError(f"{name}: {self.path!r} is truncated: its header announces shape "
                             f"{tuple(shape)} of {dtype} ({needed} bytes with the header) but "
                             f"the file holds {self._identity[2]} bytes")
        self.dtype = dtype
        self.fortran_order = bool(fortran)
        self.total_rows = int(shape[0])
        self.dim = int(shape[1])
        self.start, self.stop = 0, self.total_rows

    @property
    def shape(self) -> tuple[int, int]:
        """(rows of this view, dim)."""
        return (self.stop - self.start, self.dim)

    @property
    def ndim(self) -> int:
        return 2

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, rows: slice) -> NpyFile:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError(f"{self.name}: an NpyFile takes a contiguous slice of rows, got "
                            f"{rows!r}")
        start, stop, _ = rows.indices(len(self))
        view = object.__new__(NpyFile)
        view.__dict__.update(self.__dict__)
        view.start, view.stop = self.start + start, self.start + max(start, stop)
        return view

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of this view as a fresh C-ordered array in native byte order."""
        stop = len(self) if stop is None else min(stop, len(self))
        first, count = self.start + start, max(0, stop - start)
        out = np.empty((self.dim, count) if self.fortran_order else (count, self.dim),
                       dtype=self.dtype)
        try:
            with open(self.path, "rb", buffering=0) as handle:
                if _identity(os.fstat(handle.fileno())) != self._identity:
                    raise ValueError(f"{self.name}: {self.path!r} changed since it was opened "
                                     "(its size, modification time or inode differ): fit again")
                item = self.dtype.itemsize
                if self.fortran_order:  # column j is contiguous on disk
                    for column in range(self.dim):
                        offset = (column * self.total_rows + first) * item
                        self._read_into(handle, offset, out[column])
                    out = out.T
                else:
                    self._read_into(handle, first * self.dim * item, out)
        except OSError as error:
            raise ValueError(f"{self.name}: cannot read {self.path!r}: {_one_line(error)}"
                             ) from None
        native = self.dtype.newbyteorder("=")
        return np.ascontiguousarray(out, dtype=native)

    def _read_into(self, handle, offset: int, target: np.ndarray) -> None:
        buffer = target.reshape(-1).view(np.uint8)
        handle.seek(self._data_offset + offset)
        done = 0
        while done < buffer.size:
            count = handle.readinto(buffer[done:])
            if not count:
                raise ValueError(f"{self.name}: {self.path!r} ended early (changed since it "
                                 "was opened?)")
            done += count


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _read_header(handle) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of the ``.npy`` file open in ``handle``."""
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    return tuple(shape), fortran, np.dtype(dtype), handle.tell()


def as_array_like(
    bank: BankInput | NpyFile, name: str = "bank_features"
) -> torch.Tensor | np.ndarray | NpyFile:
    """A 2-D tensor, array or :class:`NpyFile` (for a path) for ``bank``; checks rank, size
    and dtype only. Errors about a file name the file."""
    if isinstance(bank, str | os.PathLike):
        path = os.fspath(bank)
        if not path.endswith(".npy"):
            raise ValueError(f"{name}: expected a path to a .npy file, got {path!r}")
        if not os.path.exists(path):
            raise ValueError(f"{name}: file {path!r} does not exist")
        bank = NpyFile(path, name)
    if isinstance(bank, NpyFile):
        if bank.dtype.kind != "f":
            raise ValueError(f"{name}: {bank.path!r} must hold floating-point values, got "
                             f"dtype {bank.dtype}")
    elif isinstance(bank, np.ndarray):
        if not np.issubdtype(bank.dtype, np.floating):
            raise ValueError(f"{name} must hold floating-point values, got dtype {bank.dtype}")
    elif isinstance(bank, torch.Tensor):
        if bank.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {bank.dtype}")
    else:
        raise TypeError(
            f"{name} must be a torch.Tensor, a numpy array or a path to a .npy file, "
            f"got {type(bank).__name__}"
        )
    if bank.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, dim), got shape {tuple(bank.shape)}")
    if bank.shape[0] == 0 or bank.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(bank.shape)}")
    return bank


def read_rows(
    source: torch.Tensor | np.ndarray | NpyFile, start: int, end: int, device: torch.device
) -> torch.Tensor:
    """Rows ``start:end`` of ``source`` as a float32 tensor on ``device``."""
    if isinstance(source, NpyFile):
        return torch.from_numpy(source.read(start, end)).to(device=device, dtype=torch.float32)
    rows = source[start:end]
    if isinstance(rows, np.ndarray):
        # a copy: memmaps are read-only, and the chunk must not alias the caller's array
        rows = torch.from_numpy(np.array(rows, copy=True, order="C"))
    return rows.to(device=device, dtype=torch.float32, non_blocking=True)


def check_finite(rows: torch.Tensor, name: str, row_offset: int = 0) -> None:
    """Raise ``ValueError`` naming the first row of ``rows`` holding NaN or inf."""
    bad = ~torch.isfinite(rows).all(dim=1)
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0, 0]) + row_offset
        raise ValueError(
            f"{name} must be finite: row {first} holds NaN or inf ({int(bad.sum())} bad rows "
            f"in rows {row_offset}..{row_offset + rows.shape[0] - 1})"
        )


def prepare_rows(rows: torch.Tensor, normalize: bool) -> torch.Tensor:
    """L2-normalise rows (``x / max(||x||, 1e-12)``, zero rows stay zero) when asked."""
    return F.normalize(rows, dim=1) if normalize else rows


@dataclass
class BankChunk:
    """One chunk of the prepared bank: rows ``offset:offset + len(rows)`` and their half squared
    norms ``|b|^2 / 2`` (``None`` when every row is a unit vector)."""

    offset: int
    rows: torch.Tensor
    half_sq_norms: torch.Tensor | None


class Bank:
    """A prepared (normalised, validated) bank, resident on a device or streamed from a memmap.

    Usage: ``bank = Bank.build(x, device, normalize=True, dtype=torch.float32, in_memory=True)``,
    then ``for chunk in bank.chunks(8192): ...``.
    """

    def __init__(
        self,
        resident: torch.Tensor | None,
        source: torch.Tensor | np.ndarray | NpyFile | None,
        num_rows: int,
        dim: int,
        device: torch.device,
        normalize: bool,
        half_sq_norms: torch.Tensor | None,
    ) -> None:
        self.resident = resident
        self.source = source
        self.num_rows = num_rows
        self.dim = dim
        self.device = device
        self.normalize = normalize
        self.half_sq_norms = half_sq_norms

    @property
    def unit_rows(self) -> bool:
        """True when every bank row has norm 1 (so ``|b|^2`` is taken as exactly 1)."""
        return self.half_sq_norms is None

    @classmethod
    def build(
        cls,
        bank: BankInput | NpyFile,
        device: torch.device,
        normalize: bool,
        dtype: torch.dtype,
        in_memory: bool,
        chunk_rows: int = 65536,
        progress: bool | None = None,
    ) -> Bank:
        """Validate ``bank`` chunk by chunk, normalise it and (``in_memory``) copy it to
        ``device`` in ``dtype``. Raises ``ValueError`` on NaN / inf before scoring starts."""
        source = as_array_like(bank)
        num_rows, dim = int(source.shape[0]), int(source.shape[1])
        resident = (
            torch.empty((num_rows, dim), dtype=dtype, device=device) if in_memory else None
        )
        half_sq = torch.empty(num_rows, dtype=torch.float32, device=device)
        all_unit = torch.ones((), dtype=torch.bool, device=device)
        starts = range(0, num_rows, chunk_rows)
        for start in progress_bar(starts, show=progress, large=len(starts) > 8, desc="KNN bank",
                                  unit="chunk"):
            end = min(start + chunk_rows, num_rows)
            rows = read_rows(source, start, end, device)
            check_finite(rows, "bank_features", start)
            rows = prepare_rows(rows, normalize)
            if resident is not None:
                resident[start:end] = rows.to(dtype)
                rows = resident[start:end].float()
            norms = rows.pow(2).sum(dim=1)
            half_sq[start:end] = norms * 0.5
            if normalize:
                all_unit &= ((norms - 1.0).abs() < 1e-5).all()
        unit = normalize and bool(all_unit)
        return cls(resident, None if in_memory else source, num_rows, dim, device, normalize,
                   None if unit else half_sq)

    def chunks(
        self, chunk_rows: int, start: int = 0, end: int | None = None
    ) -> Iterator[BankChunk]:
        """The bank rows ``start:end`` in chunks of ``chunk_rows`` (read from disk if streamed)."""
        end = self.num_rows if end is None else end
        for offset in range(start, end, chunk_rows):
            stop = min(offset + chunk_rows, end)
            if self.resident is not None:
                rows = self.resident[offset:stop]
            else:
                rows = prepare_rows(read_rows(self.source, offset, stop, self.device),
                                    self.normalize)
            norms = None if self.half_sq_norms is None else self.half_sq_norms[offset:stop]
            yield BankChunk(offset, rows, norms)
