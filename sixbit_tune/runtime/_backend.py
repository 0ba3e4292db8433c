"""Where a quantized linear runs: :mod:`sixbit_tune.kernels` dispatch with a per-policy kernel preference.

``"auto"``: Triton kernels on CUDA, the reference numerics elsewhere; ``"triton"``: kernels or an error;
``"reference"``: the plain-PyTorch specification everywhere (:class:`sixbit_tune.kernels.KernelPreference`).

The runtime calls the kernels with ``check_finite=False``: their finiteness check costs one host sync per layer
call. Non-finite values are caught once per step instead (see :mod:`sixbit_tune.runtime.controller`).

Derived weight operands. A route whose activation format differs from the stored weight's (an NVFP4 weight on the
INT8 or FP8 route) converts the weight at call time: the NVFP4 weight dequantized to float32, then quantized with
the INT8 (or FP8) weight rule, one scale per output channel (:meth:`Backend.derive_weight`). The result is written
into a scratch buffer that one :class:`Backend` (one applied policy) shares between all layers of the same shape and
operand format, so what stays resident is the stored encoding plus one buffer per (format, shape).
"""

from __future__ import annotations

from typing import Any

import torch

from sixbit_tune import kernels
from sixbit_tune import routes as _routes
from sixbit_tune.formats import weight_bytes

KERNEL_PREFERENCES = tuple(p.value for p in kernels.KernelPreference)


class Backend:
    """Quantize weights once, derive route operands, and run quantized linears for one kernel preference."""

    def __init__(self, preference: str = "auto"):
        if str(preference) not in KERNEL_PREFERENCES:
            raise ValueError(f"kernel_preference must be one of {KERNEL_PREFERENCES}, got {preference!r}")
        self.preference = kernels.KernelPreference(str(preference))
        # (operand format, N, K) -> (codes [N, K], float32 scales [N]) on the device of the last use.
        self._scratch: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def quantize_weight(self, weight: torch.Tensor, fmt: str, encoder: str = "standard",
                        hessian: torch.Tensor | None = None) -> Any:
        """The stored encoding of ``weight`` ``[N, K]`` in ``fmt`` (``kernels.quantize_weight``); ``encoder`` and
        ``hessian`` choose the NVFP4 weight encoder and are ignored for the other formats."""
        if fmt != "nvfp4":
            encoder, hessian = "standard", None
        return kernels.quantize_weight(weight, fmt, preference=self.preference, encoder=encoder, hessian=hessian)

    def derive_weight(self, qweight: Any, fmt: str, *, scratch: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``fmt`` (``"int8"`` or ``"fp8"``) weight operand derived from an NVFP4 ``qweight`` ``[N, K]``: the
        INT8/FP8 weight rule (one scale per output channel) applied to ``qweight.dequantize(torch.float32)``.

        With ``scratch`` (eager calls), the result is written into this backend's scratch buffer for
        (``fmt``, N, K) and that buffer is returned (valid until the next derivation of that shape); without it
        (under ``torch.compile``), fresh tensors.
        """
        if fmt not in _routes.ROUTES["nvfp4"] or not _routes.is_derived("nvfp4", fmt):
            raise ValueError(f"an NVFP4 weight has no derived {fmt!r} operand (its routes: {_routes.ROUTES['nvfp4']})")
        w = qweight.dequantize(torch.float32)
        q, s = kernels.quantize_activation(w, fmt, preference=self.preference, check_finite=False)
        if not scratch:
            return q, s
        N, K = w.shape
        buf = self._scratch.get((fmt, N, K))
        if buf is None or buf[0].device != q.device:
            buf = (torch.empty_like(q), torch.empty_like(s))
            self._scratch[(fmt, N, K)] = buf
        buf[0].copy_(q)
        buf[1].copy_(s)
        return buf

    def scratch_bytes(self) -> dict[str, int]:
        """Bytes of the scratch buffers allocated so far, by operand format (codes and scales)."""
        out: dict[str, int] = {}
        for (fmt, N, K) in self._scratch:
            out[fmt] = out.get(fmt, 0) + weight_bytes(fmt, N, K)
        return out

    def release_scratch(self) -> None:
        """Drop the scratch buffers (they are allocated again at the next derivation)."""
        self._scratch.clear()

    def linear(self, x: torch.Tensor, qweight: Any, bias: torch.Tensor | None, fmt: str, out_dtype) -> torch.Tensor:
        """``Q(x) @ Q(W).T + bias`` in ``out_dtype`` (``kernels.quantized_linear``)."""
        return kernels.quantized_linear(
            x, qweight, bias, fmt, out_dtype, preference=self.preference, check_finite=False
        )

    def path(self, fmt: str, device: torch.device) -> str:
        """The execution path ``fmt`` takes on ``device`` (``kernels.kernel_path``)."""
        return kernels.kernel_path(fmt, device, self.preference)
