"""The fused linear losses' weight gradient, summed over the row chunks in one C x D buffer.

Three kinds of terms arrive per chunk: the linear layer's ``G^T x`` (logits gradient times
features), ELogitNorm's distance term as a full C x D gradient (from a backend that forms it),
or that term as its coefficients ``c_nj = dL/dDelta_nj / Delta_nj`` per (sample, class), which
:meth:`WeightGradient.add_distance_pairs` turns into GEMMs accumulating in place (the
``colsum(c) * W`` part is summed as a C-vector and applied once at the end), so a chunk costs
no C x D temporary. Deferred to :meth:`WeightGradient.add_chunk`, the coefficients share the
chunk's GEMMs with ``G`` (stacked), so the weight is read and its gradient written once each.
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
        self._pending: tuple | None = None

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
        # d^2 - r |w_j|^2 < r |w_m|^2, with one rows x C temporary.
        excess = distances.square().sub_(norms[None, :], alpha=CANCELLATION_RATIO)
        close = excess < CANCELLATION_RATIO * norms.index_select(0, predicted)[:, None]
        del excess
        return close.nonzero(as_tuple=True)

    def add_distance_pairs(self, coefficients: torch.Tensor, predicted: torch.Tensor,
                           exact: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Adds ``c_nj (w_m - w_j)`` to ``dw_m`` and subtracts it from ``dw_j`` for every sample
        ``n`` (predicted class ``m``) and class ``j`` (``coefficients`` rows x C, overwritten);
        ``exact``: entries added from the difference instead (:meth:`close_pairs`)."""
        self._add_pairs((coefficients, predicted, exact))

    def defer_distance_pairs(self, coefficients: torch.Tensor, predicted: torch.Tensor,
                             exact: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """As :meth:`add_distance_pairs`, added by the chunk's :meth:`add_chunk` (``coefficients``
        are then ours to overwrite), where they share its GEMMs."""
        self._pending = (coefficients, predicted, exact)

    def add_chunk(self, grad_logits: torch.Tensor, features: torch.Tensor,
                  features_grad: bool) -> torch.Tensor | None:
        """Adds the chunk's ``grad_logits^T features`` and its deferred distance pairs; returns
        ``grad_logits W``, the chunk's features gradient, where ``features_grad``.

        With deferred pairs the logits gradient and the coefficients are stacked, so that the
        weight is read once for ``G W`` and ``c W`` and its gradient written once for
        ``G^T x - c^T W[predicted]``: two passes over C x D per chunk instead of four, which
        is what a chunk costs when C is large.
        """
        if self._pending is None:
            self.add_products(grad_logits, features)
            return grad_logits @ self.weight if features_grad else None
        return self._add_pairs(self._take_pending(), grad_logits, features, features_grad)

    def _take_pending(self) -> tuple:
        pending, self._pending = self._pending, None
        return pending

    def _add_pairs(self, pairs, grad_logits=None, features=None, features_grad=False):
        """The distance pairs ``(coefficients, predicted, exact)`` (the one reference to the
        coefficients, freed once stacked), with the chunk's ``grad_logits^T features`` in the
        same GEMM where given; returns ``grad_logits W`` where ``features_grad``."""
        coefficients, predicted, exact = pairs
        del pairs
        w = self.weight
        rows = w.index_select(0, predicted)
        add_exact = None
        if exact is not None and exact[0].numel() > 0:
            coefficients, add_exact = _split_exact(coefficients, rows, w, predicted, exact)
        sums = coefficients.sum(dim=0)
        self.column_sums = sums if self.column_sums is None else self.column_sums.add_(sums)
        own = coefficients.sum(dim=1, keepdim=True) * rows
        pairs, chunk = coefficients.shape[0], 0
        stacked, right = coefficients, rows.neg()
        if grad_logits is not None:
            chunk = grad_logits.shape[0]
            stacked, right = torch.cat([grad_logits, coefficients]), torch.cat([features, right])
        del coefficients
        products = (stacked if features_grad else stacked[chunk:]) @ w
        grad = self._buffer()
        grad.addmm_(stacked.t(), right)
        del stacked
        grad.index_add_(0, predicted, own.sub_(products[-pairs:]))
        if add_exact is not None:
            add_exact(grad)
        return products[:chunk] if features_grad else None

    def result(self) -> torch.Tensor:
        """The summed gradient (zeros where nothing was added)."""
        grad = self._buffer()
        if self.column_sums is not None:
            grad.addcmul_(self.column_sums[:, None], self.weight)
        return grad
