"""The fused linear losses' weight gradient, summed over the row chunks in one C x D buffer.

Three kinds of terms arrive per chunk: the linear layer's ``G^T x`` (logits gradient times
features), ELogitNorm's distance term as a full C x D gradient (from a backend that forms it),
or that term as its coefficients ``c_nj = dL/dDelta_nj / Delta_nj`` per (sample, class), which
:meth:`WeightGradient.add_distance_pairs` turns into GEMMs accumulating in place (the
``colsum(c) * W`` part is summed as a C-vector and applied once at the end), so a chunk costs
no C x D temporary.
"""

from __future__ import annotations

import torch

from .geometry import CANCELLATION_RATIO, _split_exact


class WeightGradient:
    """The running weight gradient (accumulation dtype) of ``weight`` (C x D)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.grad: torch.Tensor | None = None
        self.column_sums: torch.Tensor | None = None
        self._squared_norms: torch.Tensor | None = None

    def _buffer(self) -> torch.Tensor:
        if self.grad is None:
            self.grad = torch.zeros_like(self.weight)
        return self.grad

    def add(self, dense: torch.Tensor) -> None:
        """Adds a full C x D gradient (the first one is taken over, not copied)."""
        if self.grad is None:
            self.grad = dense
        else:
            self.grad.add_(dense)

    def add_products(self, left: torch.Tensor, right: torch.Tensor) -> None:
        """Adds ``left^T right`` (``left`` rows x C, ``right`` rows x D)."""
        self._buffer().addmm_(left.t(), right)

    def squared_norms(self) -> torch.Tensor:
        if self._squared_norms is None:
            self._squared_norms = (self.weight * self.weight).sum(dim=1)
        return self._squared_norms

    def close_pairs(self, distances: torch.Tensor, predicted: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sample, class) entries whose distance is small against the rows' norms
        (:data:`~elogitnorm_fast.geometry.CANCELLATION_RATIO`): the GEMM form ``c w_m - c w_j``
        would cancel there, so they are added from the difference."""
        norms = self.squared_norms()
        close = distances * distances < CANCELLATION_RATIO * (
            norms.index_select(0, predicted)[:, None] + norms[None, :])
        return close.nonzero(as_tuple=True)

    def add_distance_pairs(self, coefficients: torch.Tensor, predicted: torch.Tensor,
                           exact: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Adds ``c_nj (w_m - w_j)`` to ``dw_m`` and subtracts it from ``dw_j`` for every sample
        ``n`` (predicted class ``m``) and class ``j`` (``coefficients`` rows x C, overwritten);
        ``exact``: entries added from the difference instead (:meth:`close_pairs`)."""
        w = self.weight
        rows = w.index_select(0, predicted)
        add_exact = None
        if exact is not None and exact[0].numel() > 0:
            coefficients, add_exact = _split_exact(coefficients, rows, w, predicted, exact)
        sums = coefficients.sum(dim=0)
        self.column_sums = sums if self.column_sums is None else self.column_sums.add_(sums)
        grad = self._buffer()
        grad.addmm_(coefficients.t(), rows, alpha=-1.0)
        own = (coefficients.sum(dim=1, keepdim=True) * rows).addmm_(coefficients, w, alpha=-1.0)
        grad.index_add_(0, predicted, own)
        if add_exact is not None:
            add_exact(grad)

    def result(self) -> torch.Tensor:
        """The summed gradient (zeros where nothing was added)."""
        grad = self._buffer()
        if self.column_sums is not None:
            grad.addcmul_(self.column_sums[:, None], self.weight)
        return grad
