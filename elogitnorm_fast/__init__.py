"""elogitnorm_fast: fast LogitNorm / ELogitNorm losses, OOD scorers and metrics for PyTorch.

Example::

    import elogitnorm_fast as ef
    loss = ef.elogitnorm_loss(model(x), model.fc.weight, y)
"""

from .backends import available_backends, resolve_backend, unavailable_reason
from .linear_losses import (
    LinearELogitNormLoss,
    LinearLogitNormLoss,
    linear_elogitnorm_loss,
    linear_logitnorm_loss,
)
from .losses import ELogitNormLoss, LogitNormLoss, elogitnorm_loss, logitnorm_loss

__version__ = "0.1.0"

__all__ = [
    "ELogitNormLoss",
    "LinearELogitNormLoss",
    "LinearLogitNormLoss",
    "LogitNormLoss",
    "available_backends",
    "elogitnorm_loss",
    "linear_elogitnorm_loss",
    "linear_logitnorm_loss",
    "logitnorm_loss",
    "resolve_backend",
    "unavailable_reason",
]
