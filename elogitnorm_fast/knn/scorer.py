"""Exact k-nearest-neighbour OOD scorer (Sun et al., ICML 2022, https://arxiv.org/abs/2204.06507).

score(x) = -|| x/||x|| - b_(k)/||b_(k)|| ||_2, where b_(k) is the k-th nearest bank feature; with
``squared=True`` the squared distance (what faiss ``IndexFlatL2`` returns) is negated instead.
Higher = more in-distribution.

How it is computed: for unit vectors ``||q - b||^2 = |q|^2 + 1 - 2 q.b``, so the k nearest are
the k largest inner products. Similarities ``S = Q B^T`` are produced block by block (a query
chunk times a bank chunk, one GEMM into a reused buffer) and a running exact top-k absorbs each
block (``selection.py``), so the full queries x bank matrix never exists. Banks with rows that
are not unit vectors (``normalize=False``, zero rows) rank by ``q.b - |b|^2/2`` instead (one
``addmm``), which orders candidates exactly like the squared distance.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch

from ..backends import check_backend_name, resolve_backend
from ..progress import progress_bar
from ..validation import check_count, is_count
from .bank import Bank, BankInput, as_array_like, check_finite, prepare_rows
from .selection import CPU_KERNELS, RunningTopK, slot_width

#: Default memory for the native selection's running top-k; more queries than fit are searched
#: in batches (e.g. ~73,000 queries at k = 50, ~11,000 at k = 1000).
SELECTION_STATE_BYTES = 256 * 2**20
_BANK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TopPairs = tuple[torch.Tensor, torch.Tensor]  # (values, indices), best first per query row


class KNNScorer:
    """Exact KNN OOD scorer on L2-normalised features.

    Args:
        k: which neighbour's distance is the score (1 <= k <= bank size); 50 for CIFAR, 1000 for
            ImageNet in the paper.
        normalize: L2-normalise bank and query rows first (the method's definition).
        squared: return minus the *squared* distance (faiss ``IndexFlatL2`` convention).
        device: where the bank lives and the search runs; default: the bank tensor's device
            (CPU for numpy arrays and ``.npy`` paths).
        bank_dtype: storage of the bank. ``float32`` (default) is exact up to fp32 GEMM rounding
            (|error of d^2| ~ 1e-6). ``float16`` / ``bfloat16`` halve memory; on a GPU the GEMM
            then runs in that dtype (fp32 accumulation, output rounded to it): bank rows carry a
            relative error of 2^-11 (fp16) / 2^-8 (bf16) and similarities an absolute error of
            about 1e-3 (fp16) / 1e-2 (bf16), so near-ties among neighbours may reorder. On a CPU
            each chunk is widened to fp32 before the GEMM.
        allow_tf32: let fp32 GEMMs on a GPU use TF32 tensor cores (faster, inner products then
            carry ~1e-3 relative error). Off by default; the global torch flag is restored after
            each call.
        query_chunk, bank_chunk: block sizes; memory is ``query_chunk x bank_chunk`` floats plus
            the running top-k (``queries x k`` pairs; with the ``cpu`` backend at most
            ``selection_state_bytes``), never ``queries x bank``. The ``cpu`` backend takes
            ``bank_chunk`` rows per call and tiles them itself (a few MiB of packed tiles per
            thread), so ``query_chunk`` only applies to the torch backend. Defaults per device.
        backend: ``"cpu"`` (C++ similarity tiles + selection, CPU, needs
            ``elogitnorm_fast._C``), ``"torch"`` (``torch.topk`` per block, any device) or
            ``"auto"`` (``cpu`` for a bank on the CPU when it is built, else ``torch``); the
            names of :mod:`elogitnorm_fast.backends` (op family ``"knn"``). ``"native"``, the
            former name of ``"cpu"``, still works with a ``FutureWarning``.
        cpu_kernel: the similarity kernel of the ``cpu`` backend: ``"auto"`` (the fastest this
            CPU runs), ``"avx512"`` / ``"avx2"`` (register tiles, where the CPU has them) or
            ``"blas"`` (BLAS tiles then a scan). They differ only in the rounding of the
            similarities, never in how ties are broken.
        selection_state_bytes: memory bound of the ``cpu`` backend's running top-k
            (``k + max(k, 256)`` pairs of 12 bytes per query); more queries than fit are
            searched in batches, each streaming the bank once. Results do not depend on it
            beyond fp32 GEMM rounding.
        in_memory: keep the prepared bank in memory (default). ``False`` with a ``.npy`` path
            keeps it on disk and streams it in chunks for every ``score`` call.
        progress: progress bars (needs tqdm; ``None``: only for large work on a terminal).

    Usage: ``scores = KNNScorer(k=50).fit(train_features).score(test_features)``.
    """

    def __init__(
        self,
        k: int = 50,
        normalize: bool = True,
        squared: bool = False,
        *,
        device: torch.device | str | None = None,
        bank_dtype: torch.dtype = torch.float32,
        allow_tf32: bool = False,
        query_chunk: int | None = None,
        bank_chunk: int | None = None,
        backend: str = "auto",
        cpu_kernel: str = "auto",
        selection_state_bytes: int = SELECTION_STATE_BYTES,
        in_memory: bool = True,
        progress: bool | None = None,
    ) -> None:
        check_count("k", k)
        if backend == "native":
            warnings.warn('KNNScorer(backend="native") is now backend="cpu"; use "cpu"',
                          FutureWarning, stacklevel=2)
            backend = "cpu"
        check_backend_name(backend, op="knn")
        if not isinstance(cpu_kernel, str) or cpu_kernel not in CPU_KERNELS:
            raise ValueError(f"cpu_kernel must be one of {CPU_KERNELS}, got {cpu_kernel!r}")
        check_count("selection_state_bytes", selection_state_bytes)
        if bank_dtype not in _BANK_DTYPES:
            raise ValueError(f"bank_dtype must be one of {_BANK_DTYPES}, got {bank_dtype}")
        for name, value in (("query_chunk", query_chunk), ("bank_chunk", bank_chunk)):
            check_count(name, value, optional=True)
        self.k = int(k)
        self.normalize = normalize
        self.squared = squared
        self.device = None if device is None else torch.device(device)
        self.bank_dtype = bank_dtype
        self.allow_tf32 = allow_tf32
        self.query_chunk = None if query_chunk is None else int(query_chunk)
        self.bank_chunk = None if bank_chunk is None else int(bank_chunk)
        self.backend = backend
        self.cpu_kernel = cpu_kernel
        self.selection_state_bytes = int(selection_state_bytes)
        self.in_memory = in_memory
        self.progress = progress
        self.bank: Bank | None = None
        self._native = False

    # ------------------------------------------------------------------ fitting
    @torch.no_grad()
    def fit(self, bank_features: BankInput) -> KNNScorer:
        """Store the (normalised) bank. ``bank_features``: (N, D) tensor, numpy array or path
        of a ``.npy`` file (read in chunks, never held whole); a tensor that requires grad is
        read detached. Returns ``self``."""
        if isinstance(bank_features, torch.Tensor):
            bank_features = bank_features.detach()
        device = self.device
        if device is None:
            device = (
                bank_features.device if isinstance(bank_features, torch.Tensor)
                else torch.device("cpu")
            )
        self._native = resolve_backend(self.backend, device, op="knn").NAME == "cpu"
        source = as_array_like(bank_features)
        self._check_bank_rows(int(source.shape[0]))
        self.bank = Bank.build(
            source, device, self.normalize, self.bank_dtype, self.in_memory,
            progress=self.progress,
        )
        return self

    def _check_bank_rows(self, num_rows: int) -> None:
        if self.k > num_rows:
            raise ValueError(f"k must be <= the number of bank rows ({num_rows}), got k={self.k}")

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score(self, features: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Minus the (squared, if ``squared``) distance of each row of ``features`` (M, D) to its
        k-th nearest bank row; float32, shape (M,), on the device ``features`` came from.
        Features that require grad are read detached; the result carries no graph."""
        queries, origin = self._prepare_queries(features)
        kth = [
            self._search(batch, self.k, exact_ties=False).kth_values()
            for batch in self._query_batches(queries, self.k)
        ]
        squared_distance = self._squared_distance(queries, torch.cat(kth))
        return self._finish(squared_distance, origin).neg()

    @torch.no_grad()
    def kneighbors(
        self, features: torch.Tensor | np.ndarray, k: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(distances, indices)`` of the ``k`` (default ``self.k``) nearest bank rows, nearest
        first (equal distances: smaller bank index first); distances squared if ``squared``.
        ``k`` is a Python or numpy integer (not a bool or a float)."""
        k = check_k(self.k if k is None else k, self._bank().num_rows)
        queries, origin = self._prepare_queries(features)
        values, indices = self._sorted_by_batch(queries, k, lambda b: self._search(b, k).sorted())
        squared_distance = self._squared_distance(queries, values)
        return self._finish(squared_distance, origin), indices.to(origin)

    # ------------------------------------------------------------------ internals
    def _bank(self) -> Bank:
        if self.bank is None:
            raise RuntimeError("KNNScorer: call fit(bank_features) before score()")
        return self.bank

    def _prepare_queries(self, features) -> tuple[torch.Tensor, torch.device]:
        bank = self._bank()
        if isinstance(features, np.ndarray):
            features = torch.from_numpy(features)
        if not isinstance(features, torch.Tensor):
            raise TypeError(
                f"features must be a torch.Tensor or numpy array, got {type(features).__name__}"
            )
        if features.dim() != 2:
            raise ValueError(f"features must be 2-D (rows, dim), got shape {tuple(features.shape)}")
        if features.shape[1] != bank.dim:
            raise ValueError(
                f"features must have dim {bank.dim} like the bank, got shape "
                f"{tuple(features.shape)}"
            )
        if not features.is_floating_point():
            raise ValueError(f"features must be floating point, got dtype {features.dtype}")
        origin = features.device
        queries = features.detach().to(device=bank.device, dtype=torch.float32)
        check_finite(queries, "features")
        return prepare_rows(queries, self.normalize).contiguous(), origin

    def _squared_distance(self, queries: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
        # d^2 = |q|^2 + |b|^2 - 2 q.b; with s = q.b (unit bank) or s = q.b - |b|^2 / 2.
        query_sq = queries.pow(2).sum(dim=1, keepdim=True)
        if self._bank().unit_rows:
            query_sq = query_sq + 1.0
        if similarity.dim() == 1:
            query_sq = query_sq.squeeze(1)
        return (query_sq - 2.0 * similarity).clamp_min(0.0)

    def _finish(self, squared_distance: torch.Tensor, origin: torch.device) -> torch.Tensor:
        out = squared_distance if self.squared else squared_distance.sqrt()
        return out.to(origin)

    def _use_native(self) -> bool:
        """Whether the bank is searched by the ``cpu`` backend (chosen by :meth:`fit`)."""
        self._bank()
        return self._native

    def _query_batches(self, queries: torch.Tensor, k: int) -> list[torch.Tensor]:
        """Queries in batches whose running top-k state fits ``selection_state_bytes`` (the
        native selection keeps ``slot_width(k)`` pairs of 12 bytes per query); each batch
        streams the bank once. At least one batch, possibly empty."""
        if not self._use_native():
            return [queries]
        per_query = slot_width(k) * 12
        rows = max(1, self.selection_state_bytes // per_query)
        return list(queries.split(rows)) or [queries]

    def _sorted_by_batch(
        self, queries: torch.Tensor, k: int, top_of: Callable[[torch.Tensor], TopPairs]
    ) -> TopPairs:
        """``top_of(batch)`` (best-first ``(values, indices)``) for every query batch, joined."""
        found = [top_of(batch) for batch in self._query_batches(queries, k)]
        return torch.cat([v for v, _ in found]), torch.cat([i for _, i in found])

    def _chunk_sizes(self, num_queries: int) -> tuple[int, int]:
        bank = self._bank()
        on_cpu = bank.device.type == "cpu"
        query_chunk = self.query_chunk or (4096 if on_cpu else 16384)
        if self.bank_chunk:
            bank_chunk = self.bank_chunk
        elif self._use_native():  # about 32 MiB of bank rows per call of the fused op
            bank_chunk = max(1024, 2**25 // (4 * bank.dim))
        else:
            bank_chunk = 2048 if on_cpu else 32768
        return max(1, min(query_chunk, num_queries)), bank_chunk

    def _search(self, queries: torch.Tensor, k: int, exact_ties: bool = True) -> RunningTopK:
        """Running top-k of ``queries`` against the whole bank (``exact_ties``: equal
        similarities at the k-th place resolved by smaller index, needed for indices only)."""
        bank = self._bank()
        num_queries = queries.shape[0]
        top = RunningTopK(num_queries, k, bank.device, self._use_native(), exact_ties,
                          kernel=self.cpu_kernel)
        if num_queries == 0:
            return top
        query_chunk, bank_chunk = self._chunk_sizes(num_queries)
        compute_dtype = self.bank_dtype if bank.device.type == "cuda" else torch.float32
        queries = queries.to(compute_dtype)
        buffer = None
        if not top.native:
            buffer = torch.empty((query_chunk, bank_chunk), dtype=compute_dtype,
                                 device=bank.device)
        work = num_queries * bank.num_rows * bank.dim
        chunks = bank.chunks(bank_chunk)
        total = -(-bank.num_rows // bank_chunk)
        with _tf32(bank.device, self.allow_tf32):
            for chunk in progress_bar(chunks, show=self.progress, large=work >= 2**40,
                                      total=total, desc="KNN search"):
                if top.native:  # GEMM tiles and selection fused in C++
                    bias = None
                    if chunk.half_sq_norms is not None:
                        bias = chunk.half_sq_norms.neg().float().contiguous()
                    top.search(queries, chunk.rows.float(), bias, chunk.offset)
                    continue
                rows_t = chunk.rows.to(compute_dtype).t()
                bias = None
                if chunk.half_sq_norms is not None:
                    bias = chunk.half_sq_norms.neg().to(compute_dtype).unsqueeze(0)
                for q_start in range(0, num_queries, query_chunk):
                    block_queries = queries[q_start:q_start + query_chunk]
                    out = buffer[: block_queries.shape[0], : rows_t.shape[1]]
                    if bias is None:
                        torch.mm(block_queries, rows_t, out=out)
                    else:
                        torch.addmm(bias, block_queries, rows_t, out=out)
                    top.update(q_start, q_start + block_queries.shape[0], out, chunk.offset)
        return top


def check_k(k: object, num_rows: int) -> int:
    """``k`` as an int when it is a Python / numpy integer in ``[1, num_rows]``, else
    ``ValueError`` naming the value."""
    if not is_count(k) or k > num_rows:
        raise ValueError(f"k must be an integer in [1, {num_rows}], got {k!r}")
    return int(k)


@contextlib.contextmanager
def _tf32(device: torch.device, allow: bool) -> Iterator[None]:
    if device.type != "cuda":
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cuda.matmul.allow_tf32 = previous

