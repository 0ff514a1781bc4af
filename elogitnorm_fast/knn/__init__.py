"""Exact KNN OOD scoring (Sun et al. 2022): blocked GEMM + streaming top-k, CPU / GPU / ranks.

Usage: ``from elogitnorm_fast.knn import KNNScorer; KNNScorer(k=50).fit(bank).score(x)``.
"""

from .distributed import DistributedKNNScorer
from .scorer import KNNScorer

__all__ = ["KNNScorer", "DistributedKNNScorer"]
