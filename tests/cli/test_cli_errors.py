"""User errors of the command line: one line ``error: ...`` naming the argument and the value,
exit code 2, found before any work starts; Ctrl-C exits 130 quietly; help text is plain."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from elogitnorm_fast import info
from elogitnorm_fast.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def inputs(tmp_path):
    rng = np.random.default_rng(3)
    np.save(tmp_path / "bank.npy", rng.random((30, 6), dtype=np.float32))
    np.save(tmp_path / "id.npy", rng.random((8, 6), dtype=np.float32))
    np.save(tmp_path / "ood.npy", rng.random((7, 6), dtype=np.float32) * 3)
    np.save(tmp_path / "bank1d.npy", rng.random(30, dtype=np.float32))
    torch.save({"weight": torch.randn(4, 6)}, tmp_path / "head.pt")
    (tmp_path / "garbage.npy").write_bytes(b"this is not an npy file at all" * 10)
    (tmp_path / "garbage.pt").write_bytes(b"PK\x03\x04 not a zip archive")
    whole = (tmp_path / "id.npy").read_bytes()
    (tmp_path / "truncated.npy").write_bytes(whole[: len(whole) - 40])
    nan = rng.random((8, 6), dtype=np.float32)
    nan[5, 2] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    (tmp_path / "a_file").write_text("not a folder")
    return tmp_path


def _score_argv(folder: Path, *extra: str) -> list[str]:
    base = {"--id": str(folder / "id.npy"), "--ood": str(folder / "ood.npy"),
            "--head": str(folder / "head.pt"), "--bank": str(folder / "bank.npy"),
            "--scorers": "msp,knn", "--out": str(folder / "out")}
    for option, value in zip(extra[::2], extra[1::2], strict=True):
        base[option] = value
    argv = ["score"]
    for option, value in base.items():
        argv += [option, value]
    return argv


def _assert_one_line_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2, (code, err)
    assert out == "", out  # nothing was computed or printed
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


SCORE_CASES = [
    # (option, value (FILE:name = a file of the fixture), scorers override, expected needles)
    ("--bank", "FILE:bank1d.npy", None, ["--bank", "bank1d.npy"]),
    ("--id", "FILE:garbage.npy", None, ["--id", "garbage.npy"]),
    ("--ood", "FILE:truncated.npy", None, ["--ood", "truncated.npy"]),
    ("--ood", "FILE:garbage.pt", None, ["--ood", "garbage.pt"]),
    ("--id", "FILE:missing.npy", None, ["--id", "missing.npy"]),
    ("--id", "FILE:nan.npy", None, ["--id", "nan.npy", "row 5"]),
    ("--out", "FILE:a_file", None, ["--out", "a_file"]),
    ("--out", "FILE:a_file/sub", None, ["--out", "a_file"]),
    ("--k", "0", None, ["--k", "0"]),
    ("--k", "31", None, ["--k", "31", "30"]),
    ("--k", "2.5", None, ["--k", "2.5"]),
    ("--device", "bogus", None, ["--device", "bogus"]),
    ("--ood", "id=FILE:ood.npy", None, ["--ood", "'id'"]),
    ("--head", "FILE:garbage.pt", None, ["--head", "garbage.pt"]),
    ("--scorers", "msp,nope", None, ["--scorers", "nope"]),
]


@pytest.mark.parametrize("option, value, scorers, needles", SCORE_CASES,
                         ids=[f"{c[0]}={c[1]}" for c in SCORE_CASES])
def test_score_user_errors_are_one_line_before_any_work(inputs, capsys, option, value, scorers,
                                                        needles):
    value = re.sub(r"FILE:(\S+)", lambda m: str(inputs / m.group(1)), value)
    extra = [option, value] + ([] if scorers is None else ["--scorers", scorers])
    code = main(_score_argv(inputs, *extra))
    captured = capsys.readouterr()
    _assert_one_line_error(code, captured.out, captured.err, *needles)
    assert not (inputs / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_score_device_without_cuda_is_a_user_error(inputs, capsys):
    code = main(_score_argv(inputs, "--device", "cuda"))
    captured = capsys.readouterr()
    _assert_one_line_error(code, captured.out, captured.err, "--device", "cuda")


@pytest.mark.parametrize("extra, needles", [
    (["--seeds", "0"], ["--seeds", "0"]),
    (["--epochs", "0"], ["--epochs", "0"]),
    (["--seeds", "two"], ["--seeds", "two"]),
    (["--backend", "bogus"], ["--backend", "bogus"]),
    (["--device", "nope"], ["--device", "nope"]),
    (["--out", "FILE"], ["--out", "a_file"]),
    (["--out", "FILE/sub"], ["--out", "a_file"]),
])
def test_demo_arguments_are_checked_before_training(inputs, capsys, extra, needles):
    extra = [str(inputs / "a_file") + e[4:] if e.startswith("FILE") else e for e in extra]
    argv = ["demo", "--epochs", "1", "--seeds", "1", "--out", str(inputs / "demo"), *extra]
    code = main(argv)
    captured = capsys.readouterr()
    _assert_one_line_error(code, captured.out, captured.err, *needles)
    assert not (inputs / "demo").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_demo_device_without_cuda_is_a_user_error(tmp_path, capsys):
    code = main(["demo", "--epochs", "1", "--seeds", "1", "--device", "cuda", "--out",
                 str(tmp_path / "demo")])
    captured = capsys.readouterr()
    _assert_one_line_error(code, captured.out, captured.err, "--device", "cuda")


def test_run_demo_rejects_a_config_without_seeds(tmp_path):
    from elogitnorm_fast.demo import DemoConfig, run_demo

    with pytest.raises(ValueError, match=r"seeds"):
        run_demo(DemoConfig(epochs=1, seeds=(), out=str(tmp_path / "demo"), progress=False))
    assert not (tmp_path / "demo").exists()


# RST / Sphinx markup that must not reach a terminal
MARKUP = re.compile(r"``|:(func|mod|class|data|meth|attr):`")


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["score", "--help"],
                                  ["info", "--help"]])
def test_help_text_is_plain(capsys, argv):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert text and not MARKUP.search(text), MARKUP.search(text)
    if argv[0] in ("demo", "score"):
        assert "--progress" in text and "--no-progress" in text


def test_info_says_the_triton_interpreter_is_a_debugging_mode():
    reason = "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
    details = {"elogitnorm_fast": "0", "python": "3", "torch": "2", "torch_cuda": None,
               "triton": "3", "cpu_threads": 2, "knn_cpu_kernels": [], "devices": ["cpu"],
               "backends": {"torch": None, "triton": reason}, "triton_interpret": False}
    text = info.render(details)
    # whoever reads TRITON_INTERPRET also reads that it is a slow interpreter for debugging
    assert re.search(r"TRITON_INTERPRET=1.*(slow|debug)", text, re.IGNORECASE | re.DOTALL)
    assert "not a way to" in text
    interpreted = dict(details, backends={"torch": None, "triton": None}, triton_interpret=True)
    triton_line = next(line for line in info.render(interpreted).splitlines()
                       if line.strip().startswith("triton "))
    assert "interpreter" in triton_line and "debug" in triton_line


def test_score_progress_bars_follow_the_flag(inputs, capsys):
    argv = _score_argv(inputs, "--scorers", "knn", "--k", "3", "--out", str(inputs / "o1"))
    assert main(argv) == 0
    assert capsys.readouterr().err == ""  # stderr is not a terminal here: no bars by default
    argv = _score_argv(inputs, "--scorers", "knn", "--k", "3", "--out", str(inputs / "o2"))
    assert main([*argv, "--progress"]) == 0
    assert "KNN" in capsys.readouterr().err


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "elogitnorm_fast", *args]


def test_subprocess_user_error_exit_code_and_no_traceback(inputs):
    done = subprocess.run(_cli(*_score_argv(inputs, "--k", "0")), cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--k" in lines[0], done.stderr


def test_ctrl_c_exits_130_quietly_and_keeps_previous_outputs(inputs):
    out = inputs / "out"
    out.mkdir()
    (out / "scores.csv").write_text("previous scores\n")
    (out / "report.json").write_text("{\"previous\": 1}\n")
    fifo = inputs / "slow.npy"
    os.mkfifo(fifo)  # reading it blocks until a writer opens it: a command that waits
    argv = _score_argv(inputs, "--id", str(fifo), "--scorers", "msp")
    # SIGINT at its default in the child, as in a terminal, even where this test runs with it
    # ignored (a background job), which the child would inherit.
    child = subprocess.Popen(_cli(*argv), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    writer = None
    try:
        deadline = time.monotonic() + 120
        while writer is None:  # opening the write end succeeds once the child reads the fifo
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as error:
                assert error.errno == errno.ENXIO
                time.sleep(0.05)
        child.send_signal(signal.SIGINT)
        stdout, stderr = child.communicate(timeout=60)
    finally:
        if writer is not None:
            os.close(writer)
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130, stderr
    assert stderr == "" and stdout == ""
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "scores.csv"]
    assert (out / "scores.csv").read_text() == "previous scores\n"
    assert (out / "report.json").read_text() == "{\"previous\": 1}\n"


def test_demo_output_that_is_a_folder_is_found_before_training(tmp_path, capsys):
    (tmp_path / "demo" / "demo.png").mkdir(parents=True)
    code = main(["demo", "--epochs", "1", "--seeds", "1", "--out", str(tmp_path / "demo")])
    captured = capsys.readouterr()
    _assert_one_line_error(code, captured.out, captured.err, "--out", "demo.png")
