"""Feature banks for the KNN scorer: validation, L2 normalisation, chunked streaming.

A bank comes from a ``torch.Tensor``, a ``numpy`` array, or the path of a ``.npy`` file, which is
memory-mapped and read in chunks, so a bank larger than host memory can be moved to a GPU or
scored straight from disk (``in_memory=False``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

BankInput = torch.Tensor | np.ndarray | str | os.PathLike

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_array_like(bank: BankInput, name: str = "bank_features") -> torch.Tensor | np.ndarray:
    """A 2-D tensor or (memory-mapped) array for ``bank``; checks rank, size and dtype only."""
    if isinstance(bank, str | os.PathLike):
        path = os.fspath(bank)
        if not path.endswith(".npy"):
            raise ValueError(f"{name}: expected a path to a .npy file, got {path!r}")
        if not os.path.exists(path):
            raise ValueError(f"{name}: file {path!r} does not exist")
        bank = np.load(path, mmap_mode="r")
    if isinstance(bank, np.ndarray):
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


def read_rows(source: torch.Tensor | np.ndarray, start: int, end: int, device: torch.device):
    """Rows ``start:end`` of ``source`` as a float32 tensor on ``device``."""
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
        source: torch.Tensor | np.ndarray | None,
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
        bank: BankInput,
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
        show = progress if progress is not None else len(starts) > 8
        for start in tqdm(starts, desc="KNN bank", unit="chunk", disable=not show):
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
