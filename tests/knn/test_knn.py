"""KNN scorer against a float64 brute-force oracle (cdist on normalised rows, full sort)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import elogitnorm_fast as ef
from elogitnorm_fast.knn import KNNScorer
from elogitnorm_fast.knn.selection import RunningTopK, native_kernels

from parity import knn_oracle_sorted

#: every similarity kernel of the native search (each skipped where this CPU cannot run it;
#: the project's x86 machine runs all three), and the torch selection
NATIVE_KERNELS = ["avx512", "avx2", "blas"]


def native_select_available() -> bool:
    return ef.unavailable_reason("cpu", "cpu", op="knn") is None


def skip_unless_kernel_runs(kernel):
    if not native_select_available():
        pytest.skip("_C not built")
    if kernel not in native_kernels():
        pytest.skip(f"this CPU cannot run the {kernel} kernel: {native_kernels()}")


@pytest.fixture(params=[f"cpu-{kernel}" for kernel in NATIVE_KERNELS] + ["torch"])
def variant(request):
    """Scorer options: ``backend`` and, for ``cpu-KERNEL``, the ``cpu_kernel`` it runs."""
    name, _, kernel = request.param.partition("-")
    if kernel:
        skip_unless_kernel_runs(kernel)
        return {"backend": name, "cpu_kernel": kernel}
    return {"backend": name}


def running_top(variant, num_queries, k):
    """The selection of ``variant`` (the native one runs its ``cpu_kernel``)."""
    native = variant["backend"] == "cpu"
    return RunningTopK(num_queries, k, torch.device("cpu"), native=native,
                       kernel=variant.get("cpu_kernel", "auto"))


def make_data(num_bank, num_queries, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(num_bank, dim, generator=g) * 3.0 + 0.5
    queries = torch.randn(num_queries, dim, generator=g) * 3.0 + 0.5
    bank[7] = bank[3]  # duplicate bank rows
    bank[num_bank - 1] = bank[0]
    queries[:5] = bank[:5]  # queries equal to bank rows
    return bank, queries


@pytest.mark.parametrize(
    "k,num_bank,num_queries,dim,query_chunk,bank_chunk",
    [
        (1, 257, 61, 13, 16, 50),
        (5, 1001, 130, 37, 64, 333),
        (50, 3001, 257, 64, 100, 1000),
        (200, 999, 33, 7, 1000, 97),  # bank chunks smaller than k
        (2048, 2500, 19, 24, 8, 777),
        # default chunks: query counts that are no multiple of any query tile (32 / 16, BLAS
        # 256) or bank tile, and k above 2048
        (30, 2600, 600, 40, None, None),
        (2100, 3000, 40, 16, None, None),
    ],
)
@pytest.mark.parametrize("squared", [True, False])
def test_score_matches_float64_bruteforce(
    variant, k, num_bank, num_queries, dim, query_chunk, bank_chunk, squared
):
    bank, queries = make_data(num_bank, num_queries, dim)
    scorer = KNNScorer(
        k=k, squared=squared, **variant, query_chunk=query_chunk, bank_chunk=bank_chunk
    ).fit(bank)
    scores = scorer.score(queries)
    d2 = knn_oracle_sorted(queries, bank).values[:, k - 1]
    expected = -(d2 if squared else d2.sqrt())
    assert scores.shape == (num_queries,) and scores.dtype == torch.float32
    # fp32 GEMM: |error of d^2| ~ 1e-6; sqrt amplifies it near 0 (queries equal to bank rows)
    atol = 2e-6 if squared else 2e-3
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=atol)


@pytest.mark.parametrize(
    "k,num_bank,num_queries,dim",
    [
        # D = 512: bank rows read in place, two 4 MiB bank tiles, a partial last register tile
        (9, 2100, 70, 512),
        # D = 1024: bank tiles packed per thread (rows 4 KiB apart), two of them
        (5, 1100, 40, 1024),
        # more query tiles per thread than one 8 MiB group of packed queries holds
        (3, 20, 4200, 1024),
    ],
)
def test_large_tiles_match_bruteforce(variant, k, num_bank, num_queries, dim):
    bank, queries = make_data(num_bank, num_queries, dim, seed=13)
    scores = KNNScorer(k=k, squared=True, **variant).fit(bank).score(queries)
    expected = -knn_oracle_sorted(queries, bank).values[:, k - 1]
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=2e-6)


def test_kneighbors_match_bruteforce_order(variant):
    bank, queries = make_data(1500, 70, 32, seed=1)
    scorer = KNNScorer(k=40, squared=True, **variant, query_chunk=32, bank_chunk=256)
    distances, indices = scorer.fit(bank).kneighbors(queries)
    oracle = knn_oracle_sorted(queries, bank)
    torch.testing.assert_close(distances.double(), oracle.values[:, :40], rtol=1e-5, atol=2e-6)
    # exact duplicates (bank rows 3 and 7) may swap by fp32 rounding; compare as sets per rank
    # window elsewhere: random data has no other near-ties
    dup = {3, 7, 0, 1499}
    for row in range(queries.shape[0]):
        got = [i for i in indices[row].tolist() if i not in dup]
        want = [i for i in oracle.indices[row, :40].tolist() if i not in dup]
        assert got == want


def _merge_block(top, block, start):
    """Feed a block of given similarities to either selection. The native op computes its
    blocks as Q B^T: with Q the identity and B = block^T that is the block itself, exactly."""
    if top.native:
        queries = torch.eye(block.shape[0])
        top.search(queries, block.t().contiguous(), None, start)
    else:
        top.update(0, block.shape[0], block.contiguous(), start)


def test_selection_breaks_ties_by_smaller_index(variant):
    # integer-valued scores with many exact ties, several blocks, k crossing tie groups
    g = torch.Generator().manual_seed(2)
    scores = torch.randint(0, 6, (9, 300), generator=g).float()
    k = 37
    top = running_top(variant, 9, k)
    for start in range(0, 300, 41):
        _merge_block(top, scores[:, start:start + 41], start)
    values, indices = top.sorted()
    for row in range(9):
        pairs = sorted(((-v, i) for i, v in enumerate(scores[row].tolist())))[:k]
        assert indices[row].tolist() == [i for _, i in pairs]
        assert values[row].tolist() == [-v for v, _ in pairs]
    torch.testing.assert_close(top.kth_values(), values[:, -1])


@pytest.mark.parametrize("k,block", [(1, 7), (5, 500), (300, 7), (300, 333), (300, 2000)])
def test_selection_under_many_merges(variant, k, block):
    # Ascending rows make every column a candidate (the pending slots fill and merge over and
    # over), descending rows almost none; a tie run straddles the k-th place; blocks narrower
    # than k skip the one-step first block; widths are not multiples of the 16-column runs.
    g = torch.Generator().manual_seed(3)
    cols = 2000
    ascending = torch.arange(cols).div(3, rounding_mode="floor").float()
    scores = torch.stack([
        ascending,
        ascending.flip(0),
        torch.randint(0, 40, (cols,), generator=g).float(),
        torch.randn(cols, generator=g),
        torch.full((cols,), 2.5),
    ])
    top = running_top(variant, scores.shape[0], k)
    for start in range(0, cols, block):
        _merge_block(top, scores[:, start:start + block], start)
    values, indices = top.sorted()
    for row in range(scores.shape[0]):
        pairs = sorted((-v, i) for i, v in enumerate(scores[row].tolist()))[:k]
        assert indices[row].tolist() == [i for _, i in pairs]
        assert values[row].tolist() == [-v for v, _ in pairs]
    torch.testing.assert_close(top.kth_values(), values[:, -1])


def test_native_and_torch_backends_agree():
    if not native_select_available():
        pytest.skip("_C not built")
    bank, queries = make_data(2000, 100, 48, seed=3)
    a = KNNScorer(k=25, backend="cpu", bank_chunk=300).fit(bank).score(queries)
    b = KNNScorer(k=25, backend="torch", bank_chunk=300).fit(bank).score(queries)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_unnormalized_distances(variant):
    # ranks by q.b - |b|^2 / 2: the bias path of every kernel
    bank, queries = make_data(800, 40, 16, seed=4)
    scorer = KNNScorer(k=9, normalize=False, squared=True, bank_chunk=128, **variant)
    scorer.fit(bank)
    expected = -knn_oracle_sorted(queries, bank, normalize=False).values[:, 8]
    torch.testing.assert_close(scorer.score(queries).double(), expected, rtol=1e-5, atol=1e-3)


def test_zero_rows_stay_exact(variant):
    bank, queries = make_data(300, 20, 8, seed=5)
    bank[11] = 0.0
    queries[6] = 0.0
    scorer = KNNScorer(k=3, squared=True, bank_chunk=64, **variant).fit(bank)
    expected = -knn_oracle_sorted(queries, bank).values[:, 2]
    torch.testing.assert_close(scorer.score(queries).double(), expected, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("in_memory", [True, False])
def test_npy_memmap_equals_in_memory_bank(tmp_path, in_memory):
    bank, queries = make_data(1234, 50, 20, seed=6)
    path = tmp_path / "bank.npy"
    np.save(path, bank.numpy())
    reference = KNNScorer(k=17, bank_chunk=200).fit(bank).score(queries)
    from_disk = KNNScorer(k=17, bank_chunk=200, in_memory=in_memory).fit(str(path))
    assert torch.equal(from_disk.score(queries), reference)
    from_numpy = KNNScorer(k=17, bank_chunk=200).fit(bank.numpy()).score(queries.numpy())
    assert torch.equal(from_numpy, reference)


def test_float64_inputs_and_fit_returns_self():
    bank, queries = make_data(500, 10, 12, seed=7)
    scorer = KNNScorer(k=4)
    assert scorer.fit(bank.double()) is scorer
    expected = -knn_oracle_sorted(queries, bank).values[:, 3].sqrt()
    torch.testing.assert_close(scorer.score(queries.double()).double(), expected, atol=2e-3,
                               rtol=1e-5)


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_low_precision_bank_within_documented_error(dtype, atol):
    bank, queries = make_data(700, 30, 64, seed=8)
    scores = KNNScorer(k=10, squared=True, bank_dtype=dtype).fit(bank).score(queries)
    expected = -knn_oracle_sorted(queries, bank).values[:, 9]
    err = (scores.double() - expected).abs().max().item()
    assert err < atol


def test_bad_inputs_raise_before_work(tmp_path):
    bank, queries = make_data(100, 5, 6)
    with pytest.raises(ValueError, match="k must be <= the number of bank rows"):
        KNNScorer(k=101).fit(bank)
    with pytest.raises(ValueError, match="k must be an integer"):
        KNNScorer(k=0)
    with pytest.raises(ValueError, match="non-empty"):
        KNNScorer(k=1).fit(torch.empty(0, 6))
    bad = bank.clone()
    bad[42, 1] = float("nan")
    with pytest.raises(ValueError, match="row 42"):
        KNNScorer(k=1).fit(bad)
    np.save(tmp_path / "bad.npy", bad.numpy())
    with pytest.raises(ValueError, match="row 42"):
        KNNScorer(k=1).fit(str(tmp_path / "bad.npy"))
    with pytest.raises(ValueError, match="k must be <= the number of bank rows"):
        KNNScorer(k=500).fit(str(tmp_path / "bad.npy"))  # before the NaN scan
    scorer = KNNScorer(k=3).fit(bank)
    with pytest.raises(ValueError, match="dim 6"):
        scorer.score(torch.randn(4, 7))
    inf_queries = queries.clone()
    inf_queries[2, 0] = float("inf")
    with pytest.raises(ValueError, match="features must be finite: row 2"):
        scorer.score(inf_queries)
    with pytest.raises(ValueError, match="2-D"):
        scorer.score(torch.randn(6))
    with pytest.raises(ValueError, match=".npy"):
        KNNScorer(k=1).fit(str(tmp_path / "bank.txt"))
    with pytest.raises(RuntimeError, match="fit"):
        KNNScorer(k=1).score(queries)


def test_empty_query_batch():
    bank, _ = make_data(50, 5, 4)
    assert KNNScorer(k=2).fit(bank).score(torch.empty(0, 4)).shape == (0,)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [1, 50, 1000])
def test_gpu_path_matches_bruteforce(k):
    bank, queries = make_data(5003, 301, 96, seed=9)
    scorer = KNNScorer(k=k, squared=True, device="cuda", bank_chunk=1024, query_chunk=128)
    scores = scorer.fit(bank).score(queries.cuda())
    assert scores.device.type == "cuda"
    expected = -knn_oracle_sorted(queries, bank).values[:, k - 1]
    torch.testing.assert_close(scores.cpu().double(), expected, rtol=1e-5, atol=5e-6)


@pytest.mark.gpu
def test_gpu_tf32_flag_restored_and_fp16_bank():
    bank, queries = make_data(3000, 100, 64, seed=10)
    before = torch.backends.cuda.matmul.allow_tf32
    scorer = KNNScorer(k=20, squared=True, device="cuda", bank_dtype=torch.float16,
                       allow_tf32=not before)
    scores = scorer.fit(bank).score(queries)
    assert torch.backends.cuda.matmul.allow_tf32 == before
    expected = -knn_oracle_sorted(queries, bank).values[:, 19]
    assert (scores.double() - expected).abs().max().item() < 5e-3


def test_query_batches_bounded_by_the_selection_budget(variant):
    # A budget of a few queries' state forces many batches; results must not change.
    bank, queries = make_data(900, 53, 16, seed=11)
    whole = KNNScorer(k=7, squared=True, **variant, bank_chunk=200).fit(bank)
    whole_scores = whole.score(queries)
    whole_neighbours = whole.kneighbors(queries)
    scorer = KNNScorer(k=7, squared=True, **variant, bank_chunk=200,
                       selection_state_bytes=5 * (7 + 256) * 12).fit(bank)
    if variant["backend"] == "cpu":
        assert len(scorer._query_batches(queries, 7)) == 11  # ceil(53 / 5)
    # BLAS may round a 5-row product differently from a 53-row one: equal up to fp32 rounding
    torch.testing.assert_close(scorer.score(queries), whole_scores, rtol=1e-6, atol=1e-6)
    distances, indices = scorer.kneighbors(queries)
    torch.testing.assert_close(distances, whole_neighbours[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(indices, whole_neighbours[1])
    expected = -knn_oracle_sorted(queries, bank).values[:, 6]
    torch.testing.assert_close(whole_scores.double(), expected, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("kernel", NATIVE_KERNELS)
def test_native_search_does_not_depend_on_the_thread_count(kernel):
    skip_unless_kernel_runs(kernel)
    # 1 and 2 threads split the query tiles of the 300 queries differently
    bank, queries = make_data(3000, 300, 32, seed=12)
    scorer = KNNScorer(k=60, backend="cpu", cpu_kernel=kernel).fit(bank)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = scorer.score(queries), scorer.kneighbors(queries)[1]
        torch.set_num_threads(2)
        two = scorer.score(queries), scorer.kneighbors(queries)[1]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_unknown_native_kernel_is_named():
    with pytest.raises(ValueError, match=r"cpu_kernel must be one of .*got 'sse9'"):
        KNNScorer(k=3, cpu_kernel="sse9")
    if not native_select_available():
        pytest.skip("_C not built")
    # the op itself names the kernels this CPU runs
    bank, queries = make_data(100, 6, 8)
    top = RunningTopK(6, 3, torch.device("cpu"), native=True, kernel="sse9")
    with pytest.raises(RuntimeError, match="kernel must be one of auto, blas.*got 'sse9'"):
        top.search(queries, bank, None, 0)
    assert native_kernels()[-1] == "blas"


def test_native_is_the_former_name_of_cpu():
    bank, queries = make_data(300, 20, 8, seed=5)
    with pytest.warns(FutureWarning, match='use "cpu"'):
        scorer = KNNScorer(k=3, squared=True, backend="native")
    assert scorer.backend == "cpu"
    if not native_select_available():
        with pytest.raises(RuntimeError, match="backend 'cpu' is not available on cpu"):
            scorer.fit(bank)
        return
    expected = -knn_oracle_sorted(queries, bank).values[:, 2]
    torch.testing.assert_close(scorer.fit(bank).score(queries).double(), expected,
                               rtol=1e-5, atol=2e-6)


def test_backend_names_come_from_the_registry():
    # every backend name is known, but only torch and cpu search a bank
    for name in ("reference", "cuda", "triton"):
        with pytest.raises(ValueError, match=rf"backend must be .*for knn, got '{name}'"):
            KNNScorer(k=1, backend=name)
    with pytest.raises(ValueError, match="backend must be .*got 'faiss'"):
        KNNScorer(k=1, backend="faiss")
    with pytest.raises(ValueError, match="selection_state_bytes must be an integer >= 1"):
        KNNScorer(k=1, selection_state_bytes=0)
    bank, _ = make_data(50, 5, 4)
    # auto searches with the C++ op exactly where it is built
    assert KNNScorer(k=2).fit(bank)._use_native() == native_select_available()
    assert not KNNScorer(k=2, backend="torch").fit(bank)._use_native()
