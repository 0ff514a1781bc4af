"""``bench`` renders reports only where it is told: never the README, never full-size tables
from a quick run; it runs from a source checkout and says so in one line elsewhere."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from elogitnorm_fast.cli import main, run_bench
from elogitnorm_fast.cli_support import UsageError

import run_all
from report import write_report

ROOT = Path(__file__).resolve().parents[2]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_quick_runs_write_beside_their_own_json_and_full_runs_into_docs(tmp_path):
    quick_json, quick_report = run_all.destinations(quick=True, out=None)
    assert quick_json == ROOT / "benchmarks" / "results" / "quick"
    assert quick_report.parent == quick_json
    full_json, full_report = run_all.destinations(quick=False, out=None)
    assert full_json == ROOT / "benchmarks" / "results"
    assert full_report == ROOT / "docs" / "performance.md"
    for quick in (True, False):
        folder, report = run_all.destinations(quick=quick, out=str(tmp_path))
        assert folder == tmp_path and report == tmp_path / "performance.md"


def test_rendering_touches_only_the_named_report(tmp_path):
    payload = {"machine_info": {"cpu": {"brand_raw": "test CPU"}, "size_mode": "quick"},
               "benchmarks": [{"name": "test_a", "group": "g", "extra_info": {"impl": "cpu"},
                               "stats": {"median": 0.002}},
                              {"name": "test_b", "group": "g", "extra_info": {"impl": "ref"},
                               "stats": {"median": 0.004}}]}
    (tmp_path / "losses_cpu.json").write_text(json.dumps(payload))
    watched = [ROOT / "README.md", ROOT / "docs" / "performance.md"]
    before = {path: _digest(path) for path in watched if path.exists()}
    written = write_report(tmp_path, tmp_path / "report" / "performance.md")
    assert written == [tmp_path / "report" / "performance.md"]
    text = written[0].read_text()
    assert "| g | cpu | 2 | 1.00x |" in text and "| g | ref | 4 | 2.00x |" in text
    assert {path: _digest(path) for path in before} == before


def test_bench_forwards_its_options_to_the_checkout_script(capfd):
    assert main(["bench", "--quick", "--help"]) == 0
    out = capfd.readouterr().out
    assert out.startswith("usage: elogitnorm-fast bench") and "--quick" in out and "--out" in out


def test_bench_without_a_checkout_names_the_missing_script(tmp_path):
    with pytest.raises(UsageError, match="source checkout") as caught:
        run_bench(["--quick"], checkout=tmp_path)
    assert str(tmp_path / "benchmarks" / "run_all.py") in str(caught.value)
