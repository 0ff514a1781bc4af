"""Running exact top-k of similarity blocks: the selection half of the KNN scorer.

Each query keeps its ``k`` best ``(similarity, bank index)`` pairs while similarity blocks
``S = Q B^T`` stream past, bank chunk by bank chunk, in increasing bank-index order. A pair is
better when its similarity is larger, or equal with a smaller bank index; the k-th best
similarity of a row is the smallest kept value.

Two implementations (the ``cpu`` and ``torch`` backends of the KNN scorer):

* native (``cpu``): the C++ op ``knn_search_update`` (CPU, ``csrc/cpu/knn_search.cpp``,
  ``knn_tiles.h`` and ``knn_slots.h``) computes ``S`` itself, tile by tile, and selects each
  tile while it is in cache (:meth:`RunningTopK.search`): per row, ``k`` kept pairs plus room
  for ``max(k, 256)`` pending candidates that beat the k-th kept value; a full row is merged
  with one ``nth_element``. On x86 CPUs with AVX-512 or AVX2 a register-tiled kernel compares
  each similarity with its row's threshold before storing anything; elsewhere BLAS tiles are
  scanned (the ``kernel`` argument, :data:`CPU_KERNELS`). Memory: ``num_queries x (k +
  max(k, 256))`` pairs (12 bytes each) instead of ``num_queries x k``, plus up to ~12 MiB of
  packed tiles per thread.
* ``torch``: ``torch.topk`` of each block ``S`` computed by the caller merged with the running
  top-k (:meth:`RunningTopK.update`; any device, the GPU path).
  ``torch.topk`` picks arbitrarily among equal values at the k-th place; with ``exact_ties`` a
  fix-up pass keeps the smallest indices there (needed for neighbour indices, not for the k-th
  value, which is the same either way, so scoring skips it).
"""

from __future__ import annotations

import torch

from ..extension import has_ops

#: Index stored in empty slots; it ranks below every real bank index on ties at ``-inf``.
EMPTY_INDEX = torch.iinfo(torch.int64).max

#: Room for pending candidates per row in the native selection, beyond ``k`` (at least).
NATIVE_MIN_SLACK = 256

#: Similarity kernels of the native search: ``"auto"`` (the first of :func:`native_kernels`,
#: the fastest this CPU runs) and the kernels a CPU may have. They differ only in the rounding
#: of the similarities (summation order), never in how ties are broken.
CPU_KERNELS = ("auto", "avx512", "avx2", "blas")


def native_kernels() -> list[str]:
    """Similarity kernels the native search can run on this CPU, the one ``"auto"`` picks
    first (empty without the compiled extension)."""
    if not has_ops("knn_search_kernels"):
        return []
    return list(torch.ops.elogitnorm_fast.knn_search_kernels())


def slot_width(k: int) -> int:
    """Pairs kept per query by the native selection: ``k`` kept plus the pending slots."""
    return k + max(k, NATIVE_MIN_SLACK)


class RunningTopK:
    """The ``k`` best similarities and their bank indices for ``num_queries`` rows.

    Usage: ``top = RunningTopK(n, k, device, native=False); top.update(0, n, S, offset)`` for
    each block (native: ``top.search(Q, B, bias, offset)`` for each bank chunk, with the
    similarity kernel ``kernel``, one of :data:`CPU_KERNELS`), then ``top.kth_values()`` or
    ``top.sorted()``. Read results only through those two: ``values`` / ``indices`` are working
    state (the native slots hold pending and stale pairs).
    """

    def __init__(
        self, num_queries: int, k: int, device: torch.device, native: bool,
        exact_ties: bool = True, kernel: str = "auto",
    ) -> None:
        self.k = k
        self.native = native
        self.exact_ties = exact_ties
        self.kernel = kernel
        width = slot_width(k) if native else k
        self.values = torch.full((num_queries, width), float("-inf"), device=device)
        self.indices = torch.full(
            (num_queries, width), EMPTY_INDEX, dtype=torch.int64, device=device
        )
        if native:
            # per row: candidates waiting after the k kept pairs, and the k-th kept value
            self.pending = torch.zeros(num_queries, dtype=torch.int64, device=device)
            self.thresholds = torch.full((num_queries,), float("-inf"), device=device)

    def update(self, row_start: int, row_end: int, scores: torch.Tensor, index_offset: int) -> None:
        """Torch path: merge the block ``scores`` (rows ``row_start:row_end``, bank columns from
        ``index_offset``) into the running top-k."""
        if self.native:
            raise RuntimeError("RunningTopK(native=True) computes its blocks: use search()")
        values = self.values[row_start:row_end]
        indices = self.indices[row_start:row_end]
        block_k = min(self.k, scores.shape[1])
        if self.exact_ties:
            block_values, block_indices = _block_topk_smallest_index(scores, block_k)
            block_indices += index_offset
            kept_values, kept_indices = sort_candidates(
                torch.cat((values, block_values.float()), dim=1),
                torch.cat((indices, block_indices), dim=1),
                self.k,
            )
            values.copy_(kept_values)
            indices.copy_(kept_indices)
            return
        block_values, block_indices = torch.topk(scores, block_k, dim=1, sorted=False)
        block_indices += index_offset
        merged_values = torch.cat((values, block_values.float()), dim=1)
        merged_indices = torch.cat((indices, block_indices), dim=1)
        kept_values, position = torch.topk(merged_values, self.k, dim=1, sorted=False)
        values.copy_(kept_values)
        indices.copy_(torch.gather(merged_indices, 1, position))

    def search(
        self, queries: torch.Tensor, bank_rows: torch.Tensor, bias: torch.Tensor | None,
        index_offset: int,
    ) -> None:
        """Native only: merge the similarities ``queries @ bank_rows.T (+ bias)`` (fp32, CPU; the
        bank rows numbered from ``index_offset``) into every query's running top-k, computing
        and selecting them tile by tile."""
        torch.ops.elogitnorm_fast.knn_search_update(
            queries, bank_rows, bias, self.values, self.indices, self.pending, self.thresholds,
            self.k, index_offset, self.kernel,
        )

    def _candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's kept and pending pairs; unused slots read ``(-inf, EMPTY_INDEX)``."""
        if not self.native:
            return self.values, self.indices
        slots = torch.arange(self.values.shape[1], device=self.values.device)
        unused = slots[None, :] >= (self.k + self.pending)[:, None]
        return (self.values.masked_fill(unused, float("-inf")),
                self.indices.masked_fill(unused, EMPTY_INDEX))

    def kth_values(self) -> torch.Tensor:
        """The k-th largest similarity of each row (``-inf`` where fewer than k were seen)."""
        values, _ = self._candidates()
        if values.shape[1] == self.k:
            return values.amin(dim=1)
        return torch.topk(values, self.k, dim=1, sorted=False).values.amin(dim=1)

    def sorted(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, indices)`` best first; equal similarities ordered by smaller bank index."""
        return sort_candidates(*self._candidates(), self.k)


def sort_candidates(
    values: torch.Tensor, indices: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of candidate pairs per row, best first, ties broken by smaller index."""
    by_index = torch.argsort(indices, dim=1, stable=True)
    values = torch.gather(values, 1, by_index)
    indices = torch.gather(indices, 1, by_index)
    values, by_value = torch.sort(values, dim=1, descending=True, stable=True)
    indices = torch.gather(indices, 1, by_value)
    return values[:, :k], indices[:, :k]


def _block_topk_smallest_index(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk`` of each row, but among values equal to the k-th the smallest indices."""
    kth = torch.topk(scores, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    greater = scores > kth
    equal = scores == kth
    missing = k - greater.sum(dim=1, keepdim=True)
    keep = greater | (equal & (equal.cumsum(dim=1) <= missing))
    # exactly k finite entries per row survive the mask, so topk returns precisely them
    return torch.topk(scores.masked_fill(~keep, float("-inf")), k, dim=1, sorted=False)
