"""A ``.npy`` bank given by path: a file changed after ``fit`` (truncated, rewritten, replaced)
or a corrupt / truncated file gives a one-line ``ValueError`` naming the file, never a crash
(a memory map of a truncated file kills Python with SIGBUS), and an unchanged file scores as
the in-memory bank does."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elogitnorm_fast.knn import KNNScorer
from elogitnorm_fast.knn.bank import as_array_like

from parity import knn_oracle_kth

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
import numpy as np
from elogitnorm_fast.knn import KNNScorer
path = sys.argv[1]
rng = np.random.default_rng(0)
np.save(path, rng.random((20000, 32), dtype=np.float32))
scorer = KNNScorer(k=5, in_memory=False, bank_chunk=1000, backend="torch").fit(path)
np.save(path, rng.random((10, 32), dtype=np.float32))  # truncates the same file in place
try:
    scorer.score(rng.random((3, 32), dtype=np.float32))
except ValueError as error:
    print("ValueError:", error)
    sys.exit(0)
sys.exit(1)
"""


def test_streamed_bank_truncated_after_fit_is_an_error_not_sigbus(tmp_path):
    path = tmp_path / "bank.npy"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert str(path) in done.stdout and len(done.stdout.splitlines()) == 1, done.stdout


CHANGES = ["none", "truncate", "append", "rewrite_same_size", "replace", "delete",
           "corrupt_header"]


def _change(path: Path, change: str, rng: np.random.Generator) -> None:
    rows, dim = np.load(path, mmap_mode="r").shape
    if change == "truncate":
        data = path.read_bytes()
        cut = int(rng.integers(0, len(data)))
        with open(path, "r+b") as handle:
            handle.truncate(cut)
    elif change == "append":
        with open(path, "ab") as handle:
            handle.write(b"\0" * 64)
    elif change == "rewrite_same_size":
        with open(path, "r+b") as handle:  # same inode, same size, new values
            handle.seek(-dim * 4, os.SEEK_END)
            handle.write(rng.random(dim, dtype=np.float32).tobytes())
        stat = os.stat(path)  # a later modification time even on a coarse clock
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    elif change == "replace":
        other = path.with_name("other.npy")
        np.save(other, rng.random((rows, dim), dtype=np.float32))
        os.replace(other, path)
    elif change == "delete":
        os.remove(path)
    elif change == "corrupt_header":
        with open(path, "r+b") as handle:
            handle.write(b"garbage!")


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(5, 300), dim=st.integers(1, 9), chunk=st.integers(1, 64),
       change=st.sampled_from(CHANGES), order=st.sampled_from(["C", "F"]),
       dtype=st.sampled_from([np.float32, np.float64, ">f4", np.float16]),
       seed=st.integers(0, 2**16))
def test_streamed_bank_reads_the_file_or_names_it(rows, dim, chunk, change, order, dtype, seed):
    rng = np.random.default_rng(seed)
    bank = np.asarray(rng.random((rows, dim)) + 0.1, dtype=dtype, order=order)
    queries = rng.random((4, dim)).astype(np.float32)
    k = min(3, rows)
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "bank.npy"
        np.save(path, bank)
        scorer = KNNScorer(k=k, in_memory=False, bank_chunk=chunk, backend="torch").fit(path)
        _change(path, change, rng)
        if change == "none":
            expected = -knn_oracle_kth(queries, bank.astype(np.float64), k)
            torch.testing.assert_close(scorer.score(queries).double(), expected, rtol=1e-5,
                                       atol=1e-5)
            return
        with pytest.raises(ValueError) as caught:
            scorer.score(queries)
        message = str(caught.value)
        assert str(path) in message and "\n" not in message, message


@pytest.mark.parametrize("content, needle", [
    (b"", "bank.npy"),
    (b"\x93NUMPY\x01\x00garbage", "bank.npy"),
    (b"plain text, not numpy", "bank.npy"),
])
def test_corrupt_bank_file_is_named(tmp_path, content, needle):
    path = tmp_path / "bank.npy"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=needle):
        KNNScorer(k=1, in_memory=False).fit(path)


def test_truncated_bank_file_is_named_at_fit(tmp_path):
    path = tmp_path / "bank.npy"
    np.save(path, np.ones((50, 8), dtype=np.float32))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    for in_memory in (True, False):
        with pytest.raises(ValueError, match=r"bank\.npy.*truncated"):
            KNNScorer(k=1, in_memory=in_memory).fit(str(path))


def test_one_dimensional_bank_file_is_named(tmp_path):
    path = tmp_path / "bank.npy"
    np.save(path, np.ones(5, dtype=np.float32))
    with pytest.raises(ValueError, match=r"bank\.npy.*2-D"):
        as_array_like(str(path))
