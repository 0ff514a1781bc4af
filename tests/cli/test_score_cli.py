"""``elogitnorm-fast score`` on small generated files, including error cases."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from elogitnorm_fast.cli import main

from parity import knn_oracle_kth


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(1)
    bank = rng.random((300, 12), dtype=np.float32)
    id_test = rng.random((40, 12), dtype=np.float32)
    ood = rng.standard_normal((30, 12)).astype(np.float32) * 3
    np.save(tmp_path / "bank.npy", bank)
    np.save(tmp_path / "id.npy", id_test)
    torch.save(torch.from_numpy(ood), tmp_path / "ood.pt")
    head = {"weight": torch.randn(4, 12), "bias": torch.randn(4)}
    torch.save(head, tmp_path / "head.pt")
    return tmp_path, bank, id_test, ood, head


def test_scores_and_report_match_direct_computation(files):
    folder, bank, id_test, ood, head = files
    out = folder / "out"
    code = main(["score", "--id", str(folder / "id.npy"), "--ood", f"noise={folder / 'ood.pt'}",
                 "--bank", str(folder / "bank.npy"), "--head", str(folder / "head.pt"),
                 "--scorers", "msp,energy,knn", "--k", "7", "--out", str(out)])
    assert code == 0
    with open(out / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 40 + 30 and {r["split"] for r in rows} == {"id", "noise"}
    id_logits = torch.from_numpy(id_test) @ head["weight"].T + head["bias"]
    written_msp = torch.tensor([float(r["msp"]) for r in rows if r["split"] == "id"],
                               dtype=torch.float64)
    # MSP is written as the log-odds of the top probability: its sigmoid is max softmax
    torch.testing.assert_close(written_msp.sigmoid(),
                               id_logits.double().softmax(dim=1).max(dim=1).values,
                               rtol=1e-5, atol=1e-6)
    written_energy = torch.tensor([float(r["energy"]) for r in rows if r["split"] == "id"])
    torch.testing.assert_close(written_energy, torch.logsumexp(id_logits, dim=1), rtol=1e-5,
                               atol=1e-5)

    def kth_distance(queries):  # float64 brute force on L2-normalised rows
        return knn_oracle_kth(queries, bank, 7)

    written_knn = torch.tensor([float(r["knn"]) for r in rows if r["split"] == "noise"])
    torch.testing.assert_close(written_knn.double(), -kth_distance(ood), rtol=1e-5, atol=1e-5)
    report = json.loads((out / "report.json").read_text())
    scores = torch.cat([-kth_distance(id_test), -kth_distance(ood)]).numpy()
    expected = roc_auc_score([1] * len(id_test) + [0] * len(ood), scores)
    assert report["noise"]["knn"]["auroc"] == pytest.approx(expected, abs=1e-6)


def test_npy_format_writes_one_file_per_split_and_scorer(files):
    folder, _, _, ood, head = files
    out = folder / "npy"
    main(["score", "--id", str(folder / "id.npy"), "--ood", str(folder / "ood.pt"),
          "--head", str(folder / "head.pt"), "--scorers", "gen,max_logit", "--format", "npy",
          "--out", str(out)])
    assert sorted(p.name for p in out.glob("*.npy")) == [
        "id_gen.npy", "id_max_logit.npy", "ood_gen.npy", "ood_max_logit.npy"]
    ood_logits = torch.from_numpy(ood) @ head["weight"].T + head["bias"]
    torch.testing.assert_close(torch.from_numpy(np.load(out / "ood_max_logit.npy")),
                               ood_logits.max(dim=1).values, rtol=1e-5, atol=1e-5)
    # GEN (Liu et al. 2023, gamma = 0.1, M = all classes here) is written as -log G with
    # G = sum_j p_j^g (1 - p_j)^g (the paper's score is -G)
    p = ood_logits.double().softmax(dim=1)
    # 1 - p_j as the sum of the other probabilities: float64's 1 - p cancels where p ~ 1
    rest = torch.stack([torch.cat([p[:, :j], p[:, j + 1:]], 1).sum(1) for j in range(4)], 1)
    g_sum = (p.pow(0.1) * rest.pow(0.1)).sum(dim=1)
    written = torch.from_numpy(np.load(out / "ood_gen.npy")).double()
    torch.testing.assert_close(torch.exp(-written), g_sum, rtol=1e-4, atol=1e-6)


def test_pt_bank_scores_like_the_npy_bank(files):
    folder, bank, id_test, *_ = files
    torch.save(torch.from_numpy(bank), folder / "bank.pt")
    written = {}
    for suffix in ("npy", "pt"):
        out = folder / f"bank_{suffix}"
        assert main(["score", "--id", str(folder / "id.npy"), "--ood", str(folder / "ood.pt"),
                     "--bank",
                     str(folder / f"bank.{suffix}"), "--scorers", "knn,react", "--head",
                     str(folder / "head.pt"), "--k", "5", "--format", "npy",
                     "--out", str(out)]) == 0
        written[suffix] = {name: np.load(out / f"id_{name}.npy") for name in ("knn", "react")}
    expected = -knn_oracle_kth(id_test, bank, 5)
    for suffix in ("npy", "pt"):
        torch.testing.assert_close(torch.from_numpy(written[suffix]["knn"]).double(), expected,
                                   rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(written["npy"]["react"], written["pt"]["react"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--scorers", "knnx"], "--scorers: unknown scorer(s) 'knnx'"),
        (["--scorers", "knn"], "--bank: scorer(s) knn need --bank"),
        (["--scorers", "msp"], "--head: scorer(s) msp on features need --head"),
        (["--scorers", "msp", "--head", "missing.pt"], "--head: file not found: 'missing.pt'"),
        (["--scorers", "knn", "--bank", "BANK_WRONG"], "has 5 columns but the inputs have 12"),
    ],
)
def test_errors_are_clear(files, extra, message, capsys):
    folder, *_ = files
    np.save(folder / "wrong.npy", np.zeros((10, 5), dtype=np.float32))
    extra = [str(folder / "wrong.npy") if e == "BANK_WRONG" else e for e in extra]
    code = main(["score", "--id", str(folder / "id.npy"), "--ood", str(folder / "ood.pt"),
                 "--out", str(folder / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err, err


def test_shape_mismatch_between_inputs_is_reported(files, capsys):
    folder, *_ = files
    np.save(folder / "other.npy", np.zeros((10, 5), dtype=np.float32))
    code = main(["score", "--id", str(folder / "id.npy"), "--ood", str(folder / "other.npy"),
                 "--inputs", "logits", "--scorers", "msp", "--out", str(folder / "o")])
    assert code == 2 and "same number of columns" in capsys.readouterr().err
