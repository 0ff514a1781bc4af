"""Post-hoc OOD scorers (higher = more in-distribution, everywhere), shaping and detectors.

* Logit scores, one pass over the logits: :func:`msp`, :func:`max_logit`, :func:`energy`,
  :func:`gen`, :func:`entropy_score`, :func:`logit_scores` (module ``logit_scores``).
* Feature shaping before the head: :func:`react`, :func:`ash_p`, :func:`ash_b`, :func:`ash_s`,
  :func:`scale_features`, :func:`shaped_energy` and the fitted :class:`ReAct`, :class:`ASH`,
  :class:`SCALE` (module ``shaping``).
* ELogitNorm's test-time scale: :func:`elogitnorm_scale` (module ``scale``).
* Detectors with ``fit`` / ``score`` (module ``detectors``).
"""

from elogitnorm_fast.scoring.detectors import (
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
)
from elogitnorm_fast.scoring.logit_scores import (
    SCORE_NAMES,
    energy,
    entropy_score,
    gen,
    logit_scores,
    max_logit,
    msp,
    resolve_backend,
)
from elogitnorm_fast.scoring.scale import elogitnorm_scale
from elogitnorm_fast.scoring.shaping import (
    ASH,
    SCALE,
    ReAct,
    ash_b,
    ash_p,
    ash_s,
    react,
    scale_features,
    shaped_energy,
)

__all__ = [
    "SCORE_NAMES",
    "msp",
    "max_logit",
    "energy",
    "gen",
    "entropy_score",
    "logit_scores",
    "resolve_backend",
    "react",
    "ash_p",
    "ash_b",
    "ash_s",
    "scale_features",
    "shaped_energy",
    "ReAct",
    "ASH",
    "SCALE",
    "elogitnorm_scale",
    "Detector",
    "NotFittedError",
    "MSPDetector",
    "MaxLogitDetector",
    "EnergyDetector",
    "EntropyDetector",
    "GENDetector",
    "ReActDetector",
    "ASHDetector",
    "SCALEDetector",
]

# KNN lives in elogitnorm_fast.knn; re-exported here with its Detector form.
from elogitnorm_fast.knn import DistributedKNNScorer, KNNScorer  # noqa: E402
from elogitnorm_fast.scoring.knn_detector import KNNDetector  # noqa: E402

__all__ += ["KNNScorer", "DistributedKNNScorer", "KNNDetector"]
