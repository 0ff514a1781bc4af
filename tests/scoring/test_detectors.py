"""Detector API: fit / score on tensors and DataLoaders, errors for unfitted use."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from elogitnorm_fast.scoring import (
    ASHDetector,
    Detector,
    EnergyDetector,
    EntropyDetector,
    GENDetector,
    MaxLogitDetector,
    MSPDetector,
    NotFittedError,
    ReActDetector,
    SCALEDetector,
    energy,
    entropy_score,
    gen,
    max_logit,
    msp,
)
from elogitnorm_fast.scoring.shaping import ReAct, ash_s, scale_features, shaped_energy

from parity import knn_oracle_kth

LOGIT_DETECTORS = [
    (MSPDetector, msp),
    (MaxLogitDetector, max_logit),
    (EnergyDetector, energy),
    (EntropyDetector, entropy_score),
    (GENDetector, gen),
]


@pytest.mark.parametrize("cls,fn", LOGIT_DETECTORS)
def test_logit_detectors_on_tensors_and_loaders(cls, fn):
    logits = torch.randn(50, 7)
    labels = torch.randint(0, 7, (50,))
    det = cls()
    assert det.fit(logits) is det
    torch.testing.assert_close(det.score(logits), fn(logits))
    loader = DataLoader(TensorDataset(logits, labels), batch_size=16)
    torch.testing.assert_close(det.score(loader), fn(logits))
    torch.testing.assert_close(det.score((logits, labels)), fn(logits))
    torch.testing.assert_close(det.score({"logits": logits}), fn(logits))
    torch.testing.assert_close(cls.score_logits(logits), fn(logits))


def test_logit_detector_with_model_keeps_model_where_it_is():
    model = torch.nn.Linear(6, 4)
    x = torch.randn(30, 6)
    det = MSPDetector(model=model).fit(DataLoader(TensorDataset(x), batch_size=8))
    with torch.no_grad():
        expected = msp(model(x))
    torch.testing.assert_close(det.score(DataLoader(TensorDataset(x), batch_size=7)), expected)
    assert next(model.parameters()).device.type == "cpu"
    assert model.training  # mode untouched


def test_react_detector_fit_score_and_unfitted_error():
    head = torch.nn.Linear(12, 5)
    feats = torch.relu(torch.randn(80, 12))
    det = ReActDetector(head.weight, head.bias, percentile=90)
    assert not det.is_fitted
    with pytest.raises(NotFittedError, match="fit"):
        det.score(feats)
    assert det.fit(DataLoader(TensorDataset(feats, torch.zeros(80)), batch_size=32)) is det
    reference = ReAct(90).fit(feats)
    assert det.threshold == pytest.approx(reference.threshold)
    expected = shaped_energy(feats.clamp(max=reference.threshold), head.weight, head.bias)
    torch.testing.assert_close(det.score(feats), expected)
    torch.testing.assert_close(det.score(DataLoader(TensorDataset(feats), batch_size=9)), expected)


def test_react_detector_with_backbone_model():
    backbone = torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.ReLU())
    head = torch.nn.Linear(12, 3)
    x = torch.randn(40, 5)
    det = ReActDetector(head.weight, head.bias, model=backbone).fit(x)
    with torch.no_grad():
        feats = backbone(x)
        # ReAct by hand: clip at the 90th percentile of the ID activations, then energy
        clip = float(np.percentile(feats.numpy().ravel(), 90.0))
        expected = torch.logsumexp(head(feats.clamp(max=clip)), dim=1)
    torch.testing.assert_close(det.score(x), expected, rtol=1e-5, atol=1e-5)


def test_ash_and_scale_detectors():
    head = torch.nn.Linear(20, 4)
    feats = torch.relu(torch.randn(10, 20))
    ash = ASHDetector(head.weight, head.bias, percentile=80, mode="s")
    torch.testing.assert_close(
        ash.fit().score(feats), shaped_energy(ash_s(feats, 80), head.weight, head.bias)
    )
    scale = SCALEDetector(head.weight, head.bias, percentile=70)
    torch.testing.assert_close(
        scale.score(feats), shaped_energy(scale_features(feats, 70), head.weight, head.bias)
    )


def test_fit_requires_data_when_needed_and_empty_loader():
    head = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match="needs ID data"):
        ReActDetector(head.weight).fit()
    with pytest.raises(ValueError, match="no data"):
        ReActDetector(head.weight).fit(DataLoader(TensorDataset(torch.zeros(0, 4)), batch_size=2))
    with pytest.raises(ValueError, match="logits"):
        MSPDetector().score({"features": torch.randn(2, 3)})


def test_subclassing_interface_like_a_knn_detector():
    class NearestMean(Detector):
        requires_fit = True

        def _fit_tensor(self, inputs):
            self.mean = inputs.mean(dim=0)

        def _score_tensor(self, inputs):
            return -torch.linalg.vector_norm(inputs - self.mean, dim=1)

    det = NearestMean()
    with pytest.raises(NotFittedError):
        det.score(torch.randn(3, 2))
    bank = torch.randn(100, 2)
    det.fit(DataLoader(TensorDataset(bank), batch_size=30))
    torch.testing.assert_close(det.mean, bank.mean(dim=0))
    assert det.score(torch.randn(7, 2)).shape == (7,)


def test_knn_detector_on_a_loader_matches_float64_brute_force():
    from elogitnorm_fast.scoring import KNNDetector, NotFittedError

    bank = torch.randn(120, 6)
    queries = torch.randn(25, 6)
    detector = KNNDetector(k=4)
    with pytest.raises(NotFittedError):
        detector.score(queries)
    loader = DataLoader(TensorDataset(bank, torch.zeros(120)), batch_size=32)
    scores = detector.fit(loader).score(DataLoader(TensorDataset(queries), batch_size=7))
    torch.testing.assert_close(scores.double(), -knn_oracle_kth(queries, bank, 4), rtol=1e-5,
                               atol=1e-5)
