"""KNN as a :class:`~elogitnorm_fast.scoring.detectors.Detector` (tensors, loaders, a model)."""

from __future__ import annotations

import torch

from elogitnorm_fast.knn import KNNScorer
from elogitnorm_fast.scoring.detectors import Detector


class KNNDetector(Detector):
    """Minus the distance to the k-th nearest ID feature (Sun et al., ICML 2022).

    ``fit`` gathers the ID features (from a tensor, a loader, or a backbone given as ``model``)
    into the bank; for banks on disk use :class:`~elogitnorm_fast.knn.KNNScorer` with a ``.npy``
    path directly. Options other than ``k`` go to :class:`KNNScorer`.

    Example::

        detector = KNNDetector(backbone, k=50).fit(train_loader)
        id_confidence = detector.score(test_loader)
    """

    requires_fit = True
    input_key = "features"

    def __init__(self, model=None, *, k: int = 50, **scorer_options) -> None:
        self.scorer = KNNScorer(k=k, **scorer_options)
        super().__init__(model)

    def _fit_tensor(self, inputs: torch.Tensor) -> None:
        self.scorer.fit(inputs)

    def _score_tensor(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.scorer.score(inputs)
