"""Detector API: ``fit`` on ID data, ``score`` returning ID confidences (higher = more ID).

Example::

    detector = ReActDetector(head.weight, head.bias, model=backbone).fit(id_loader)
    id_conf = detector.score(test_loader)          # (N,) tensor on the model's device

See :class:`Detector` for the data a detector accepts and how to write a new one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from elogitnorm_fast.scoring.logit_scores import DEFAULT_GAMMA, DEFAULT_TOP_M, logit_scores
from elogitnorm_fast.scoring.shaping import ASH, SCALE, ReAct, _Shaping

__all__ = [
    "Detector",
    "NotFittedError",
    "LogitDetector",
    "MSPDetector",
    "MaxLogitDetector",
    "EnergyDetector",
    "EntropyDetector",
    "GENDetector",
    "ShapingDetector",
    "ReActDetector",
    "ASHDetector",
    "SCALEDetector",
]


class NotFittedError(RuntimeError):
    """Raised when a detector that needs ID statistics scores before :meth:`Detector.fit`."""


def _model_device(model: Any) -> torch.device | None:
    """The device of the model's first parameter or buffer (None for a plain callable)."""
    if isinstance(model, torch.nn.Module):
        for tensor in model.parameters():
            return tensor.device
        for tensor in model.buffers():
            return tensor.device
    return None


class Detector:
    """Base class of all detectors: ``fit(data) -> self`` and ``score(data) -> (N,) tensor``.

    **Data.** ``data`` is read by one rule, from its outermost container inwards:

    * a tensor or numpy array: one batch of inputs;
    * a dict: one batch, its inputs under :attr:`input_key` (``"logits"`` or ``"features"``);
    * a **tuple**: one batch ``(inputs, labels, ...)``, the inputs first and the rest ignored.
      This is how a single ``(inputs, labels)`` pair is said explicitly;
    * anything else iterable (a **list**, a ``DataLoader``, a generator): a sequence of
      batches, every one of them used. A batch is a tensor / array, a dict as above, or a
      tuple / list with the inputs first (a ``DataLoader`` over a ``TensorDataset`` yields
      ``[inputs, labels]`` lists).

    So ``score([batch1, batch2])`` scores both batches, ``score((inputs, labels))`` scores
    ``inputs``, and ``score(list(loader))`` equals ``score(loader)``. A tuple whose first element
    is not a tensor / array (e.g. a tuple of batches) raises ``TypeError`` instead of guessing.

    **Model.** Without a model the tensors *are* the detector's inputs: logits for the logit
    detectors, penultimate features for the shaping (and KNN) detectors. With ``model=`` (any
    callable, e.g. a backbone returning features or a network returning logits) each batch is
    first moved to the model's device (that of its first parameter; unchanged for a plain
    callable) and passed through ``model`` under ``torch.no_grad()``. The model itself is never
    moved, copied, or switched between train / eval mode: call ``model.eval()`` yourself.
    Results stay on the device they were computed on.

    **Fitting.** ``fit`` returns ``self``. Detectors with ID statistics (``requires_fit = True``)
    raise :class:`NotFittedError` from ``score`` until fitted; detectors without any (MSP,
    energy, ...) are ready at construction and their ``fit`` only returns ``self``.

    **Writing a detector** (e.g. a KNN detector). Subclass and implement:

    * ``_fit_tensor(self, inputs: Tensor) -> None``: store ID statistics from all ID inputs,
      concatenated (N_id x ...). The default implementation does nothing.
    * ``_score_tensor(self, inputs: Tensor) -> Tensor``: ID confidences (n,) for one batch.
    * class attributes ``requires_fit`` (bool) and ``input_key`` ("logits" or "features").

    ``fit`` gathers all batches first (KNN needs the whole bank); override
    ``_fit_batches(self, batches: Iterable[Tensor])`` to stream instead. ``score`` scores batch
    by batch and concatenates. :meth:`is_fitted` reads ``self._fitted``.
    """

    requires_fit: bool = False
    input_key: str = "features"

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.model = model
        self._fitted = not self.requires_fit

    # ---- subclass hooks ------------------------------------------------------------------
    def _fit_tensor(self, inputs: torch.Tensor) -> None:
        return None

    def _score_tensor(self, inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _fit_batches(self, batches: Iterable[torch.Tensor]) -> None:
        parts = list(batches)
        if not parts:
            raise ValueError(f"{type(self).__name__}.fit got no data (empty loader)")
        self._fit_tensor(torch.cat(parts) if len(parts) > 1 else parts[0])

    # ---- data plumbing -------------------------------------------------------------------
    def _extract(self, batch: Any) -> torch.Tensor:
        """The inputs tensor of one batch (tensor / array, dict, or tuple / list inputs-first)."""
        if isinstance(batch, dict):
            if self.input_key not in batch:
                raise ValueError(
                    f"{type(self).__name__} needs key {self.input_key!r} in dict batches, got "
                    f"keys {sorted(batch)}"
                )
            batch = batch[self.input_key]
        elif isinstance(batch, (tuple, list)):
            if not batch:
                raise ValueError(f"got an empty {type(batch).__name__} as a batch")
            batch = batch[0]
            if not isinstance(batch, (torch.Tensor, np.ndarray)):
                raise TypeError(
                    "the first element of a tuple / list batch must be the inputs tensor, got "
                    f"{type(batch).__name__}; pass several batches as a list or a loader"
                )
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(batch)
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"batches must hold tensors, got {type(batch).__name__}")
        return batch

    def _inputs(self, batch: Any) -> torch.Tensor:
        x = self._extract(batch)
        if self.model is None:
            return x.detach()
        device = _model_device(self.model)
        if device is not None and x.device != device:
            x = x.to(device)
        with torch.no_grad():
            out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.detach()

    def _batches(self, data: Any) -> Iterable[torch.Tensor]:
        # One rule for the outermost container (see the class docstring): a tuple is one
        # (inputs, labels, ...) batch; a list is a list of batches, never a pair.
        if isinstance(data, (torch.Tensor, np.ndarray, dict, tuple)):
            yield self._inputs(data)
            return
        if not isinstance(data, Iterable):
            raise TypeError(
                "data must be a tensor, an array, a dict, an (inputs, labels) tuple or an "
                f"iterable of batches, got {type(data).__name__}"
            )
        for batch in data:
            yield self._inputs(batch)

    # ---- public API ----------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return self._fitted

    def fit(self, data: Any = None) -> Detector:
        """Fit ID statistics on ``data``; returns ``self``.

        ``data``: a tensor / array, a dict, an ``(inputs, labels)`` tuple, or a list / loader /
        iterable of batches, all of which are used (the rule is in the class docstring).
        """
        if data is None:
            if self.requires_fit:
                raise ValueError(f"{type(self).__name__}.fit needs ID data")
            return self
        if self.requires_fit:
            self._fit_batches(self._batches(data))
        self._fitted = True
        return self

    def score(self, data: Any) -> torch.Tensor:
        """ID confidences (N,) for ``data``: higher = more in-distribution.

        ``data`` as in :meth:`fit`; the scores of all batches are concatenated in order.
        """
        if not self.is_fitted:
            raise NotFittedError(
                f"{type(self).__name__} is not fitted: call .fit(id_data) before .score()"
            )
        parts = [self._score_tensor(x) for x in self._batches(data)]
        if not parts:
            raise ValueError(f"{type(self).__name__}.score got no data (empty loader)")
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    __call__ = score

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fitted={self.is_fitted})"


# --------------------------------------------------------------------------------------------
# logit detectors
# --------------------------------------------------------------------------------------------


class LogitDetector(Detector):
    """A detector on logits with one score of :func:`logit_scores`; nothing to fit."""

    input_key = "logits"
    score_name = ""

    def __init__(self, model=None, *, backend: str = "auto", **options):
        super().__init__(model)
        self.backend = backend
        self.options = options

    def _score_tensor(self, inputs: torch.Tensor) -> torch.Tensor:
        return logit_scores(inputs, (self.score_name,), backend=self.backend, **self.options)[
            self.score_name
        ]

    @classmethod
    def score_logits(cls, logits: torch.Tensor, **options) -> torch.Tensor:
        """Static scoring of logits, no detector instance needed."""
        return logit_scores(logits, (cls.score_name,), **options)[cls.score_name]


class MSPDetector(LogitDetector):
    """Maximum softmax probability (Hendrycks & Gimpel 2017), returned as its log-odds
    ``log(p / (1 - p))`` (:func:`~elogitnorm_fast.scoring.msp`): the same ranking, without the
    ties of ``p`` rounding to 1 for confident samples."""

    score_name = "msp"


class MaxLogitDetector(LogitDetector):
    """Maximum logit (Hendrycks et al. 2022)."""

    score_name = "max_logit"


class EnergyDetector(LogitDetector):
    """Energy ``T logsumexp(z / T)`` (Liu et al. 2020)."""

    score_name = "energy"

    def __init__(self, model=None, *, temperature: float = 1.0, backend: str = "auto"):
        super().__init__(model, backend=backend, temperature=temperature)


class EntropyDetector(LogitDetector):
    """Softmax entropy ``H`` as ``-log H`` (:func:`~elogitnorm_fast.scoring.entropy_score`):
    ranks like the negated entropy."""

    score_name = "entropy"


class GENDetector(LogitDetector):
    """GEN, generalized entropy over the top-M probabilities (Liu et al. 2023), as ``-log G``
    (:func:`~elogitnorm_fast.scoring.gen`): ranks like the paper's ``-G``."""

    score_name = "gen"

    def __init__(
        self,
        model=None,
        *,
        gamma: float = DEFAULT_GAMMA,
        top_m: int = DEFAULT_TOP_M,
        backend: str = "auto",
    ):
        super().__init__(model, backend=backend, gamma=gamma, top_m=top_m)


# --------------------------------------------------------------------------------------------
# shaping detectors: features -> shaped -> energy under the head (W, b)
# --------------------------------------------------------------------------------------------


class ShapingDetector(Detector):
    """Energy of shaped penultimate features under the head ``(weight, bias)``."""

    input_key = "features"

    def __init__(
        self,
        shaping: _Shaping,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        model=None,
        *,
        temperature: float = 1.0,
    ):
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (K, D), got shape {tuple(weight.shape)}")
        self.shaping = shaping
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.temperature = temperature
        super().__init__(model)

    def _fit_tensor(self, inputs: torch.Tensor) -> None:
        self.shaping.fit(inputs)

    def _score_tensor(self, inputs: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(inputs.device)
        bias = None if self.bias is None else self.bias.to(inputs.device)
        return self.shaping.energy(inputs, weight, bias, self.temperature)


class ReActDetector(ShapingDetector):
    """ReAct (Sun et al. 2021): clip at the ID ``percentile``, then energy. Needs ``fit``."""

    requires_fit = True

    def __init__(
        self, weight, bias=None, model=None, *, percentile: float = 90.0, temperature: float = 1.0
    ):
        super().__init__(ReAct(percentile), weight, bias, model, temperature=temperature)

    @property
    def threshold(self) -> float | None:
        return self.shaping.threshold


class ASHDetector(ShapingDetector):
    """ASH-P / ASH-B / ASH-S (Djurisic et al. 2023), then energy; nothing to fit."""

    def __init__(
        self,
        weight,
        bias=None,
        model=None,
        *,
        percentile: float = 90.0,
        mode: str = "s",
        temperature: float = 1.0,
    ):
        super().__init__(ASH(percentile, mode), weight, bias, model, temperature=temperature)


class SCALEDetector(ShapingDetector):
    """SCALE (Xu et al. 2024), then energy; nothing to fit."""

    def __init__(
        self, weight, bias=None, model=None, *, percentile: float = 85.0, temperature: float = 1.0
    ):
        super().__init__(SCALE(percentile), weight, bias, model, temperature=temperature)
