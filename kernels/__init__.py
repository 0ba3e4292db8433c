"""Triton kernels and their dispatch, imported as ``sixbit_tune.kernels``."""
