"""The main job: a small, reproducible version of the ELogitNorm paper's OOD experiment.

Data ships inside scikit-learn (no download): digits as in-distribution and near-OOD, patches of
the bundled sample photographs and synthetic noise as far-OOD.
"""

from .run import DemoConfig, run_demo

__all__ = ["DemoConfig", "run_demo"]
