"""Triton kernels and their dispatch, imported as ``sixbit_tune.kernels``.

Importing this package never needs Triton: the kernel modules are imported lazily by :mod:`.dispatch`, and
without Triton every operation uses the reference numerics of :mod:`sixbit_tune.formats`.
"""

from ._triton_support import HAS_TRITON
from .dispatch import (
    PATHS,
    KernelPreference,
    get_kernel_preference,
    kernel_path,
    quantize_activation,
    quantize_weight,
    quantized_linear,
    set_kernel_preference,
)

__all__ = [
    "HAS_TRITON",
    "PATHS",
    "KernelPreference",
    "get_kernel_preference",
    "kernel_path",
    "quantize_activation",
    "quantize_weight",
    "quantized_linear",
    "set_kernel_preference",
]
