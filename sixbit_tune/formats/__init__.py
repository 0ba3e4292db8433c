"""Reference numerics of the quantized formats NVFP4, INT8 and FP8 E4M3, in plain PyTorch.

This package is the specification: every kernel in ``sixbit_tune.kernels`` is tested against it bit for bit
(codes, scales) and the runtime's emulated paths call it. Submodules: :mod:`.nvfp4`, :mod:`.int8`, :mod:`.fp8`.
Works on any device; imports torch only.

:data:`ALL_FORMATS` are the quantized formats every function here and ``sixbit_tune.kernels`` accept; :data:`FORMATS`
the two of the version-1 policies (NVFP4 fast, INT8 robust). The format and route vocabulary (stored weight formats,
activation formats, the routes each weight supports) is defined once in :mod:`sixbit_tune.routes` (standard library
only, so that the policy schema can use it) and re-exported here.
"""

from __future__ import annotations

import torch

from sixbit_tune.formats import fp8, int8, nvfp4
from sixbit_tune.formats.common import check_finite
from sixbit_tune.routes import (
    ACTIVATION_FORMATS,
    DEFAULT_ROUTES,
    QUANT_FORMATS,
    ROUTES,
    V1_FORMATS,
    WEIGHT_FORMATS,
    Route,
    operand_format,
)

FORMATS = V1_FORMATS
ALL_FORMATS = QUANT_FORMATS

__all__ = [
    "ACTIVATION_FORMATS",
    "ALL_FORMATS",
    "DEFAULT_ROUTES",
    "FORMATS",
    "ROUTES",
    "Route",
    "WEIGHT_FORMATS",
    "operand_format",
    "check_finite",
    "fake_quant",
    "fp8",
    "int8",
    "nvfp4",
    "quantized_linear_reference",
    "relative_l2",
    "weight_bytes",
]


def _check_fmt(fmt: str) -> None:
    if fmt not in ALL_FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; expected one of {ALL_FORMATS}")


def fake_quant(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Quantize ``x`` over its last dim in ``fmt`` and dequantize back; same shape and dtype as ``x``.

    nvfp4: one global scale for the whole tensor, 16-element blocks along the last dim.
    int8, fp8: one scale per row (slice along the last dim).

    Raises:
        ValueError: unknown ``fmt``; for nvfp4, a last dim that is not a multiple of 16.
        NonFiniteError: ``x`` contains NaN or Inf.
    """
    _check_fmt(fmt)
    if fmt == "nvfp4":
        return nvfp4.quantize(x).dequantize(x.dtype)
    if fmt == "fp8":
        q, s = fp8.quantize(x, axis=-1)
        return fp8.dequantize(q, s, axis=-1, dtype=x.dtype)
    q, s = int8.quantize(x, axis=-1)
    return int8.dequantize(q, s, axis=-1, dtype=x.dtype)


def quantized_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str
) -> torch.Tensor:
    """Reference quantized linear ``y = Q(x) @ Q(weight).T + bias``, float32 output ``[..., N]``.

    * ``"nvfp4"`` (W4A4): ``x`` (one global scale over the whole activation tensor) and ``weight`` (one global scale)
      are quantized over K, dequantized to float32 and multiplied in float32 (``torch.matmul``).
    * ``"int8"`` (W8A8): per-token ``x`` scales ``sx`` and per-output-channel weight scales ``sw``; the integer
      accumulation ``acc = qx @ qw.T`` is exact (computed in float64, exact for K < 2**37 since every partial sum is
      an integer below 2**53); then ``acc.float() * (sx[..., None] * sw[None, :])`` in float32. ``acc.float()`` is
      the same round-to-nearest-even conversion as an int32 accumulator's ``.float()``.
    * ``"fp8"`` (W8A8 E4M3): per-token ``x`` scales ``sx`` and per-output-channel weight scales ``sw``; the code
      products are accumulated exactly (float64, exact for K <= 2**17, see :func:`fp8.exact_matmul`) and rounded
      once to float32, then ``acc * (sx[..., None] * sw[None, :])`` in float32: the dequantized operands multiplied
      with an exact accumulation, scales applied in the epilogue as ``torch._scaled_mm`` does.
    * ``bias`` (``[N]`` or None) is added last as ``+ bias.float()``.

    Args:
        x: ``[..., K]`` activation, float32/float16/bfloat16.
        weight: ``[N, K]``.
        bias: ``[N]`` or None.
        fmt: ``"nvfp4"``, ``"int8"`` or ``"fp8"``.

    Raises:
        ValueError: unknown ``fmt``, mismatched shapes, or (nvfp4) K not a multiple of 16.
        NonFiniteError: ``x`` or ``weight`` contains NaN or Inf.
    """
    _check_fmt(fmt)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [N, K], got shape {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x last dim must equal weight K={weight.shape[1]}, got x shape {tuple(x.shape)}")
    N = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    if fmt == "nvfp4":
        xd = nvfp4.quantize(x).dequantize(torch.float32)
        wd = nvfp4.quantize(weight).dequantize(torch.float32)
        y = torch.matmul(xd, wd.t())
    elif fmt == "fp8":
        qx, sx = fp8.quantize(x, axis=-1)
        qw, sw = fp8.quantize(weight, axis=-1)
        y = fp8.exact_matmul(qx, qw) * (sx[..., None] * sw[None, :])
    else:
        qx, sx = int8.quantize(x, axis=-1)
        qw, sw = int8.quantize(weight, axis=-1)
        acc = torch.matmul(qx.to(torch.float64), qw.to(torch.float64).t())
        y = acc.to(torch.float32) * (sx[..., None] * sw[None, :])
    if bias is not None:
        y = y + bias.float()
    return y


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``‖a − b‖₂ / ‖b‖₂`` over all elements, computed in float32; a float32 0-d tensor.

    0 when both norms are 0; +inf when ``b`` is all zero and ``a`` is not. NaN/Inf inputs propagate (use
    :func:`check_finite` first where that matters).

    Raises:
        ValueError: shapes differ.
    """
    if a.shape != b.shape:
        raise ValueError(f"relative_l2 needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    af = a.detach().to(torch.float32)
    bf = b.detach().to(torch.float32)
    num = torch.linalg.vector_norm(af - bf)
    den = torch.linalg.vector_norm(bf)
    out = num / den
    return torch.where(num == 0, torch.zeros_like(out), out)


def weight_bytes(fmt: str, N: int, K: int) -> int:
    """Storage bytes of an ``[N, K]`` weight in ``fmt``, scales included.

    nvfp4: ``N*K/2`` code bytes + ``N*K/16`` E4M3 block scales + 4 (the float32 global scale).
    int8, fp8: ``N*K`` + ``4*N`` (one float32 scale per output channel).

    Raises:
        ValueError: unknown ``fmt``, negative sizes, or (nvfp4) K not a multiple of 16.
    """
    _check_fmt(fmt)
    N, K = int(N), int(K)
    if N < 0 or K < 0:
        raise ValueError(f"N and K must be >= 0, got N={N}, K={K}")
    if fmt == "nvfp4":
        nvfp4.check_k(K)
        return N * K // 2 + N * K // nvfp4.BLOCK_SIZE + 4
    return N * K + 4 * N
