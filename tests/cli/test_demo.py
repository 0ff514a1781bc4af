"""A fast smoke run of the demo (tiny epochs, one seed): table, ranges, files, figure."""

from __future__ import annotations

import csv
import json
import math

from elogitnorm_fast.cli import main
from elogitnorm_fast.demo import DemoConfig, run_demo
from elogitnorm_fast.demo.data import ID_CLASSES, load_splits
from elogitnorm_fast.demo.evaluate import SCORERS
from elogitnorm_fast.demo.train import LOSSES


def test_splits_are_fixed_and_disjoint():
    first, second = load_splits(), load_splits()
    assert first.train_x.equal(second.train_x) and first.near_ood.equal(second.near_ood)
    assert set(first.train_y.tolist()) == set(ID_CLASSES)
    assert first.train_x.shape[1] == first.near_ood.shape[1] == 64
    for name, far in first.far_ood.items():
        assert far.shape[1] == 64 and float(far.min()) >= 0 and float(far.max()) <= 1, name


def test_demo_smoke_run(tmp_path, capsys):
    out = tmp_path / "demo"
    result = run_demo(DemoConfig(epochs=2, seeds=(0,), out=str(out), progress=False))
    printed = capsys.readouterr().out
    summary = result["summary"]
    assert set(summary) == set(LOSSES)
    for loss, metrics in summary.items():
        expected = {f"{s}/{p}/{m}" for s in SCORERS for p in ("near", "far")
                    for m in ("auroc", "fpr95")} | {"accuracy", "ece", "ece_scaled"}
        assert set(metrics) == expected, loss
        for name, (mean, std) in metrics.items():
            assert math.isfinite(mean) and 0.0 <= mean <= 1.0, (loss, name, mean)
            assert std == 0.0  # one seed
    # The table: one row per scorer x loss.
    table_rows = [line for line in printed.splitlines()
                  if line.startswith("| ") and any(f" {s} " in line for s in SCORERS)]
    assert len(table_rows) == len(SCORERS) * len(LOSSES)
    assert "mean AUROC" in printed
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(LOSSES) * (len(SCORERS) * 4 + 3)
    payload = json.loads((out / "results.json").read_text())
    assert payload["config"]["epochs"] == 2
    png = (out / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_cli_demo_entry(tmp_path, capsys):
    out = tmp_path / "cli"
    out.mkdir()
    (out / "mine.txt").write_text("kept")
    code = main(["demo", "--epochs", "1", "--seeds", "1", "--out", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    assert "elogitnorm" in captured.out
    # stderr is not a terminal under capture: no progress bars unless --progress
    assert captured.err == ""
    # the three outputs replace nothing else, and no temporary file is left
    assert sorted(p.name for p in out.iterdir()) == [
        "demo.png", "mine.txt", "results.csv", "results.json"]
