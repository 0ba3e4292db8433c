"""Where a quantized linear runs: :mod:`sixbit_tune.kernels` dispatch with a per-policy kernel preference.

``"auto"``: Triton kernels on CUDA, the reference numerics elsewhere; ``"triton"``: kernels or an error;
``"reference"``: the plain-PyTorch specification everywhere (:class:`sixbit_tune.kernels.KernelPreference`).

The runtime calls the kernels with ``check_finite=False``: their finiteness check costs one host sync per layer
call. Non-finite values are caught once per step instead (see :mod:`sixbit_tune.runtime.controller`).
"""

from __future__ import annotations

from typing import Any

import torch

from sixbit_tune import kernels

KERNEL_PREFERENCES = tuple(p.value for p in kernels.KernelPreference)


class Backend:
    """Quantize weights once and run quantized linears for one kernel preference."""

    def __init__(self, preference: str = "auto"):
        if str(preference) not in KERNEL_PREFERENCES:
            raise ValueError(f"kernel_preference must be one of {KERNEL_PREFERENCES}, got {preference!r}")
        self.preference = kernels.KernelPreference(str(preference))

    def quantize_weight(self, weight: torch.Tensor, fmt: str, encoder: str = "standard",
                        hessian: torch.Tensor | None = None) -> Any:
        """The stored encoding of ``weight`` ``[N, K]`` in ``fmt`` (``kernels.quantize_weight``); ``encoder`` and
        ``hessian`` choose the NVFP4 weight encoder and are ignored for the other formats."""
        if fmt != "nvfp4":
            encoder, hessian = "standard", None
        return kernels.quantize_weight(weight, fmt, preference=self.preference, encoder=encoder, hessian=hessian)

    def linear(self, x: torch.Tensor, qweight: Any, bias: torch.Tensor | None, fmt: str, out_dtype) -> torch.Tensor:
        """``Q(x) @ Q(W).T + bias`` in ``out_dtype`` (``kernels.quantized_linear``)."""
        return kernels.quantized_linear(
            x, qweight, bias, fmt, out_dtype, preference=self.preference, check_finite=False
        )

    def path(self, fmt: str, device: torch.device) -> str:
        """The execution path ``fmt`` takes on ``device`` (``kernels.kernel_path``)."""
        return kernels.kernel_path(fmt, device, self.preference)
