"""KNN scoring with the bank sharded across ``torch.distributed`` ranks.

Each rank holds a contiguous slice of the bank (global rows ``offset:offset + n_local``), finds
the local top-k of every query (global indices), and all ranks all-gather the ``world x k``
candidates per query and merge them with the same order as the single-process scorer
(larger similarity first, equal similarities by smaller global index). Every rank returns the
full result. Works with gloo (CPU) and NCCL (GPU; the bank then lives on the rank's GPU).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from .bank import BankInput, as_array_like
from .scorer import KNNScorer, check_k
from .selection import EMPTY_INDEX, sort_candidates


class DistributedKNNScorer(KNNScorer):
    """:class:`KNNScorer` whose bank is split across the ranks of ``group``.

    ``fit(bank)`` takes this rank's shard (``shard=True``, default; shards are ordered by rank)
    or the full bank, of which this rank keeps its contiguous part (``shard=False``). ``score``
    and ``kneighbors`` are collective: call them on every rank with the same queries.
    Scores equal the single-process scorer on the concatenated bank.

    Usage: ``DistributedKNNScorer(k=50).fit(my_shard).score(queries)`` on each rank.
    """

    def __init__(self, k: int = 50, normalize: bool = True, squared: bool = False, *,
                 group: dist.ProcessGroup | None = None, **kwargs) -> None:
        super().__init__(k, normalize, squared, **kwargs)
        self.group = group
        self.offset = 0
        self.total_rows = 0

    def fit(self, bank_features: BankInput, shard: bool = True) -> DistributedKNNScorer:
        """Store this rank's part of the bank; collective (gathers the shard sizes). A tensor
        that requires grad is read detached."""
        if isinstance(bank_features, torch.Tensor):
            bank_features = bank_features.detach()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistributedKNNScorer needs torch.distributed to be initialised")
        rank = dist.get_rank(self.group)
        world = dist.get_world_size(self.group)
        source = as_array_like(bank_features)
        if not shard:
            total = int(source.shape[0])
            start, end = total * rank // world, total * (rank + 1) // world
            source = source[start:end]
        sizes = self._all_gather_sizes(int(source.shape[0]))
        self.offset = sum(sizes[:rank])
        self.total_rows = sum(sizes)
        if self.k > self.total_rows:
            raise ValueError(
                f"k must be <= the number of bank rows over all ranks ({self.total_rows}), "
                f"got k={self.k}"
            )
        if source.shape[0] == 0:
            raise ValueError(f"bank_features: the shard of rank {rank} is empty")
        return super().fit(source)

    def _check_bank_rows(self, num_rows: int) -> None:
        pass  # checked against the global size in fit

    def _all_gather_sizes(self, local: int) -> list[int]:
        device = self._collective_device()
        mine = torch.tensor([local], dtype=torch.int64, device=device)
        parts = [torch.zeros_like(mine) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, mine, group=self.group)
        return [int(p.item()) for p in parts]

    def _collective_device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _global_top(self, features, k: int, exact_ties: bool):
        queries, origin = self._prepare_queries(features)
        # every rank sees the same queries, k and settings, hence the same batches
        values, indices = self._sorted_by_batch(
            queries, k, lambda batch: self._global_top_batch(batch, k, exact_ties)
        )
        return queries, origin, values, indices

    def _global_top_batch(self, queries: torch.Tensor, k: int, exact_ties: bool):
        local_k = min(k, self._bank().num_rows)
        values, indices = self._search(queries, local_k, exact_ties).sorted()
        indices = indices + self.offset
        if local_k < k:  # pad so every rank contributes k candidates
            pad = k - local_k
            rows = values.shape[0]
            values = torch.cat((values, values.new_full((rows, pad), float("-inf"))), 1)
            indices = torch.cat((indices, indices.new_full((rows, pad), EMPTY_INDEX)), 1)
        device = self._collective_device()
        values, indices = values.to(device).contiguous(), indices.to(device).contiguous()
        world = dist.get_world_size(self.group)
        all_values = [torch.empty_like(values) for _ in range(world)]
        all_indices = [torch.empty_like(indices) for _ in range(world)]
        dist.all_gather(all_values, values, group=self.group)
        dist.all_gather(all_indices, indices, group=self.group)
        merged_values, merged_indices = sort_candidates(
            torch.cat(all_values, 1), torch.cat(all_indices, 1), k
        )
        return merged_values.to(queries.device), merged_indices

    @torch.no_grad()
    def score(self, features: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Collective: minus the distance to the k-th nearest row of the whole sharded bank."""
        queries, origin, values, _ = self._global_top(features, self.k, exact_ties=False)
        return self._finish(self._squared_distance(queries, values[:, -1]), origin).neg()

    @torch.no_grad()
    def kneighbors(
        self, features: torch.Tensor | np.ndarray, k: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Collective: ``(distances, global indices)`` of the k nearest rows, nearest first;
        ``k`` a Python or numpy integer."""
        k = check_k(self.k if k is None else k, self.total_rows)
        queries, origin, values, indices = self._global_top(features, k, exact_ties=True)
        return self._finish(self._squared_distance(queries, values), origin), indices.to(origin)
