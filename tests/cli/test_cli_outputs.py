"""What ``score`` does with a user's files: OOD names never replace the ID split or each other
and never leave ``--out``; outputs are all or nothing (a failed or interrupted run leaves the
previous outputs as they were, and no temporary files); ``--divide-by-scale`` scores z / s."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import tempfile
import threading
import time
import unicodedata
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from elogitnorm_fast.cli import main
from elogitnorm_fast.cli_support import deferred_interrupt, write_files

ID_ROWS = 5


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``root``, by relative path."""
    state: dict[str, bytes | None] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            state[os.path.relpath(os.path.join(folder, name), root)] = None
        for name in files:
            path = os.path.join(folder, name)
            state[os.path.relpath(path, root)] = Path(path).read_bytes()
    return state


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _is_error(code: int, err: str) -> bool:
    lines = err.splitlines()
    return code == 2 and len(lines) == 1 and lines[0].startswith("error: ")


# ---------------------------------------------------------------------------- OOD names

SPECIAL_NAMES = ["id", "ID", "Id", "", ".", "..", "../up", "a/b", "a\\b", ".hidden", "x=y",
                 "noise", "Noise", "far", "near-ood", "é", "e\u0301", "中文", "a b", "tab\t",
                 "new\nline"]
NAME_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1,
                    max_size=6)
PLAIN_NAMES = st.one_of(st.from_regex(r"[a-z0-9][a-z0-9_-]{0,5}", fullmatch=True),
                        st.text(st.characters(categories=("L", "N")), min_size=1, max_size=4))
ANY_NAMES = st.one_of(st.sampled_from(SPECIAL_NAMES), NAME_TEXT, PLAIN_NAMES)


def _key(name: str) -> str:
    return unicodedata.normalize("NFC", name).casefold()


def _must_fail(names: list[str]) -> bool:
    keys = [_key(n) for n in names]
    return (len(set(keys)) < len(keys) or "id" in keys
            or any(n in ("", ".", "..") or n.startswith(".") or "/" in n or "\\" in n
                   for n in names))


def _must_pass(names: list[str]) -> bool:
    keys = [_key(n) for n in names]
    plain = all(n and all(unicodedata.category(ch)[0] in "LN" or ch in "-_" for ch in n)
                and n[0] not in "-_" for n in names)
    return plain and len(set(keys)) == len(keys) and "id" not in keys


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(names=st.one_of(st.lists(PLAIN_NAMES, min_size=1, max_size=4),
                      st.lists(ANY_NAMES, min_size=1, max_size=4)))
def test_ood_names_never_replace_a_split_nor_leave_out(names):
    with tempfile.TemporaryDirectory() as root:
        root_path = Path(root)
        rng = np.random.default_rng(0)
        np.save(root_path / "id.npy", rng.standard_normal((ID_ROWS, 3)).astype(np.float32))
        argv = ["score", "--id", str(root_path / "id.npy"), "--inputs", "logits", "--scorers",
                "msp,energy", "--out", str(root_path / "out")]
        for index, name in enumerate(names):
            np.save(root_path / f"ood{index}.npy",
                    rng.standard_normal((6 + index, 3)).astype(np.float32) + 2)
            argv += ["--ood", f"{name}={root_path / f'ood{index}.npy'}"]
        (root_path / "out").mkdir()
        (root_path / "out" / "scores.csv").write_text("previous\n")
        (root_path / "out" / "report.json").write_text("{}\n")
        before = _snapshot(root_path)
        err, out = io.StringIO(), io.StringIO()
        with redirect_stderr(err), redirect_stdout(out):
            code = main(argv)
        after = _snapshot(root_path)
        event("rejected" if code else "accepted")
        if code != 0:
            assert _is_error(code, err.getvalue()), (code, err.getvalue())
            assert "--ood" in err.getvalue()
            assert after == before
            assert not _must_pass(names), (names, err.getvalue())
            return
        assert not _must_fail(names), names
        # nothing outside --out changed; inside, exactly the two outputs (no temporary files)
        outside = {k: v for k, v in after.items() if not k.startswith("out")}
        assert outside == {k: v for k, v in before.items() if not k.startswith("out")}
        assert sorted(k for k in after if k.startswith("out" + os.sep)) == [
            os.path.join("out", "report.json"), os.path.join("out", "scores.csv")]
        report = json.loads((root_path / "out" / "report.json").read_text(encoding="utf-8"))
        assert list(report) == names
        rows = _csv_rows(root_path / "out" / "scores.csv")
        counts = {}
        for row in rows:
            counts[row["split"]] = counts.get(row["split"], 0) + 1
        assert counts == {"id": ID_ROWS, **{n: 6 + i for i, n in enumerate(names)}}


@pytest.mark.parametrize("value", ["../x", "sub/x", "..", "id", "ID"])
def test_named_examples_of_bad_ood_names(tmp_path, capsys, value):
    np.save(tmp_path / "id.npy", np.eye(3, dtype=np.float32))
    np.save(tmp_path / "x.npy", np.ones((2, 3), dtype=np.float32))
    code = main(["score", "--id", str(tmp_path / "id.npy"), "--ood",
                 f"{value}={tmp_path / 'x.npy'}", "--inputs", "logits", "--scorers", "msp",
                 "--format", "npy", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert _is_error(code, captured.err) and repr(value) in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["id.npy", "x.npy"]


# ---------------------------------------------------------------------------- output states

FAILURES = [None, "nan_ood", "corrupt_ood", "truncated_ood", "one_d_id", "missing_ood",
            "k_too_large", "empty_id"]


def _write_inputs(root: Path, failure: str | None) -> list[str]:
    rng = np.random.default_rng(7)
    np.save(root / "bank.npy", rng.random((20, 4), dtype=np.float32))
    np.save(root / "id.npy", rng.random((ID_ROWS, 4), dtype=np.float32))
    ood = rng.random((6, 4), dtype=np.float32) * 4
    if failure == "nan_ood":
        ood[3, 1] = np.nan
    np.save(root / "ood.npy", ood)
    torch.save({"weight": torch.randn(3, 4), "bias": torch.randn(3)}, root / "head.pt")
    if failure == "corrupt_ood":
        (root / "ood.npy").write_bytes(b"\x93NUMPY garbage")
    elif failure == "truncated_ood":
        data = (root / "ood.npy").read_bytes()
        (root / "ood.npy").write_bytes(data[:-9])
    elif failure == "one_d_id":
        np.save(root / "id.npy", rng.random(ID_ROWS, dtype=np.float32))
    elif failure == "missing_ood":
        os.remove(root / "ood.npy")
    elif failure == "empty_id":
        np.save(root / "id.npy", np.zeros((0, 4), dtype=np.float32))
    return ["score", "--id", str(root / "id.npy"), "--ood", f"far={root / 'ood.npy'}",
            "--bank", str(root / "bank.npy"), "--head", str(root / "head.pt"),
            "--scorers", "msp,energy,knn", "--k", "25" if failure == "k_too_large" else "3"]


PREVIOUS_STATES = ["absent", "empty", "previous_csv", "previous_npy", "with_other_files"]


def _prepare_out(out: Path, state: str) -> None:
    if state == "absent":
        return
    out.mkdir()
    if state == "previous_csv":
        (out / "scores.csv").write_text("split,index,msp\nid,0,0.5\n")
        (out / "report.json").write_text("{\"old\": {}}")
    elif state == "previous_npy":
        np.save(out / "id_msp.npy", np.zeros(3, dtype=np.float32))
        np.save(out / "far_msp.npy", np.ones(2, dtype=np.float32))
        (out / "report.json").write_text("{\"old\": {}}")
    elif state == "with_other_files":
        (out / "notes.txt").write_text("mine")
        (out / "report.json").write_text("{\"old\": {}}")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=st.sampled_from(PREVIOUS_STATES),
       failure=st.one_of(st.none(), st.sampled_from(FAILURES[1:])),
       fmt=st.sampled_from(["csv", "npy"]))
def test_outputs_are_all_or_nothing(state, failure, fmt):
    with tempfile.TemporaryDirectory() as root:
        root_path = Path(root)
        argv = _write_inputs(root_path, failure)
        out = root_path / "out"
        _prepare_out(out, state)
        before = _snapshot(root_path)
        err = io.StringIO()
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            code = main([*argv, "--format", fmt, "--out", str(out)])
        after = _snapshot(root_path)
        event(f"failure {failure}")
        if failure is not None:
            assert _is_error(code, err.getvalue()), (failure, code, err.getvalue())
            assert after == before, failure
            return
        assert code == 0, err.getvalue()
        new = {"report.json"} | ({"scores.csv"} if fmt == "csv" else {
            f"{split}_{scorer}.npy" for split in ("id", "far") for scorer in ("msp", "energy",
                                                                                "knn")})
        names = {p.name for p in out.iterdir()}
        kept = {k: v for k, v in before.items()
                if k.startswith("out" + os.sep) and os.path.basename(k) not in new}
        assert names == new | {os.path.basename(k) for k in kept}  # no temporary files
        for key, value in kept.items():
            assert after[key] == value
        report = json.loads((out / "report.json").read_text())
        assert set(report) == {"far"} and set(report["far"]) == {"msp", "energy", "knn"}


def test_write_files_keeps_previous_files_when_a_writer_fails(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"old a")
    (tmp_path / "b.txt").write_bytes(b"old b")

    def fails(handle):
        handle.write(b"half of b")
        raise KeyboardInterrupt

    for error in (KeyboardInterrupt,):
        with pytest.raises(error):
            write_files(str(tmp_path), {"a.txt": lambda h: h.write(b"new a"), "b.txt": fails})
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]
        assert (tmp_path / "a.txt").read_bytes() == b"old a"
        assert (tmp_path / "b.txt").read_bytes() == b"old b"
    written = write_files(str(tmp_path / "new" / "deeper"), {"a.txt": lambda h: h.write(b"A")})
    assert written == [str(tmp_path / "new" / "deeper" / "a.txt")]
    assert (tmp_path / "new" / "deeper" / "a.txt").read_bytes() == b"A"
    # a folder the failed run created is removed again
    with pytest.raises(RuntimeError):
        write_files(str(tmp_path / "fresh" / "sub"), {"a.txt": _raise_runtime})
    assert not (tmp_path / "fresh").exists()
    with pytest.raises(ValueError, match="x/y"):
        write_files(str(tmp_path), {"x/y": lambda h: h.write(b"")})


def _raise_runtime(handle):
    raise RuntimeError("writer failed")


def test_deferred_interrupt_finishes_the_block_then_raises():
    # Python's own handler, as in a terminal, even where this process was started with SIGINT
    # ignored (a background job).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        finished = []
        with pytest.raises(KeyboardInterrupt):
            with deferred_interrupt():
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                time.sleep(0.05)  # the Python handler runs here, and only records the signal
                finished.append(True)
        assert finished == [True]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------------------- z / s

def _scale_float64(logits: torch.Tensor, weight: torch.Tensor, eps: float = 1e-7):
    """ELogitNorm's per-row scale by its definition, one row at a time, in float64."""
    z, w = logits.double(), weight.double()
    scales = []
    for row in z:
        m = int(torch.argmax(row))
        total = 0.0
        for j in range(len(row)):
            delta = 1.0 if j == m else max(float((w[m] - w[j]).norm()), eps)
            total += float(row[m] - row[j]) / delta
        scales.append(max(total / len(row), eps))
    return torch.tensor(scales, dtype=torch.float64)


@pytest.mark.parametrize("inputs", ["features", "logits"])
def test_divide_by_scale_scores_logits_over_s(tmp_path, capsys, inputs):
    gen = torch.Generator().manual_seed(4)
    weight, bias = torch.randn(5, 7, generator=gen), torch.randn(5, generator=gen)
    features = {"id": torch.randn(9, 7, generator=gen), "far": 3 * torch.randn(6, 7, generator=gen)}
    logits = {k: v.double() @ weight.double().T + bias.double() for k, v in features.items()}
    torch.save({"weight": weight, "bias": bias}, tmp_path / "head.pt")
    for name in features:
        data = features[name] if inputs == "features" else logits[name].float()
        np.save(tmp_path / f"{name}.npy", data.numpy())
    code = main(["score", "--id", str(tmp_path / "id.npy"), "--ood",
                 f"far={tmp_path / 'far.npy'}", "--head", str(tmp_path / "head.pt"),
                 "--inputs", inputs, "--scorers", "energy,max_logit", "--divide-by-scale",
                 "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    rows = _csv_rows(tmp_path / "out" / "scores.csv")
    for name, z in logits.items():
        normalised = z / _scale_float64(z, weight)[:, None]
        written = [r for r in rows if r["split"] == name]
        torch.testing.assert_close(torch.tensor([float(r["max_logit"]) for r in written],
                                                dtype=torch.float64),
                                   normalised.max(dim=1).values, rtol=2e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor([float(r["energy"]) for r in written],
                                                dtype=torch.float64),
                                   torch.logsumexp(normalised, dim=1), rtol=2e-5, atol=1e-5)


def test_divide_by_scale_needs_the_head_and_a_logit_scorer(tmp_path, capsys):
    np.save(tmp_path / "id.npy", np.eye(3, dtype=np.float32))
    np.save(tmp_path / "x.npy", np.ones((2, 3), dtype=np.float32))
    torch.save({"weight": torch.randn(3, 5)}, tmp_path / "head.pt")
    base = ["score", "--id", str(tmp_path / "id.npy"), "--ood", str(tmp_path / "x.npy"),
            "--inputs", "logits", "--divide-by-scale", "--out", str(tmp_path / "out")]
    assert main([*base, "--scorers", "msp"]) == 2
    assert "--head" in capsys.readouterr().err
    torch.save({"weight": torch.randn(4, 5)}, tmp_path / "head4.pt")
    assert main([*base, "--scorers", "msp", "--head", str(tmp_path / "head4.pt")]) == 2
    err = capsys.readouterr().err
    assert "--head" in err and "4" in err  # 4 classes in the head, 3 logit columns
    assert not (tmp_path / "out").exists()
