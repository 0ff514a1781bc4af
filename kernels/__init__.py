"""Triton kernels, installed as ``elogitnorm_fast.kernels``.

Nothing here imports triton at module import time: each kernel module is imported lazily by the
backend that needs it, so the package works where triton is absent.
"""
