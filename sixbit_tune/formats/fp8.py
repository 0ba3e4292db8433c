"""FP8 E4M3 reference numerics: the specification every FP8 kernel path is tested against.

Element format: ``torch.float8_e4m3fn`` (1 sign bit, 4 exponent bits with bias 7, 3 mantissa bits; no infinities;
the byte patterns ``0x7F`` and ``0xFF`` are NaN; largest finite magnitude 448, smallest subnormal ``2**-9``).

For each slice along ``axis`` (activations: one scale per token, ``axis=-1``; weights ``[N, K]``: one scale per
output channel, also ``axis=-1``, i.e. reduced over K), all in float32, each operation IEEE round-to-nearest-even:

* ``scale = amax(|x|) / 448`` (IEEE float32 division);
* ``r = 1 / scale`` (IEEE float32 division);
* ``q = e4m3(clamp(x * r, -448, 448))``: a multiplication by that reciprocal (never a division of ``x``), the
  saturation to the largest finite E4M3 magnitude, then PyTorch's round-to-nearest-even cast
  ``.to(torch.float8_e4m3fn)``;
* a slice whose reciprocal ``1 / scale`` is not finite in float32 (an all-zero slice, or an amax below about
  ``448 * 2**-128`` = 1.3e-36) gets scale 0 and ``q = +0`` everywhere, exactly, never NaN (the dequantized error of
  such a slice is at most its amax);
* dequantized value ``float32(q) * scale``.

Every code is a valid finite E4M3 value: the NaN patterns are never produced.
"""

from __future__ import annotations

import torch

from sixbit_tune.formats.common import ieee_div, norm_axis, slice_amax

E4M3_MAX = 448.0
DTYPE = torch.float8_e4m3fn



def scales_from_amax(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, r)`` of slices whose ``amax(|x|)`` is given (float32 tensor, any shape, no host sync).

    ``scale = amax / 448`` and ``r = 1 / scale``; both are 0 where the scale is 0 or ``r`` is not finite (see the
    module docstring). For kernels and profiling code that already hold the amax.
    """
    amax = amax.to(torch.float32)
    scale = ieee_div(amax, E4M3_MAX)
    r = torch.ones_like(scale) / scale  # tensor / tensor: a true IEEE division on every device
    usable = (scale > 0) & torch.isfinite(r)
    zero = torch.zeros_like(scale)
    return torch.where(usable, scale, zero), torch.where(usable, r, zero)


def encode(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``e4m3(clamp(x * r, -448, 448))`` with ``r`` broadcast against float32 ``x``; a zero ``r`` gives +0 codes.

    Returns a ``torch.float8_e4m3fn`` tensor of ``x``'s shape.
    """
    v = (x.to(torch.float32) * r).clamp(-E4M3_MAX, E4M3_MAX)
    v = torch.where(r == 0, torch.zeros_like(v), v)  # never -0.0 or 0 * inf for a zero slice
    return v.to(DTYPE)


def quantize(x: torch.Tensor, axis: int = -1, *, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to FP8 E4M3 with one scale per slice reduced over ``axis``.

    Args:
        x: float32/float16/bfloat16 tensor, any shape with at least one dim.
        axis: the reduced dim (default the last).
        check: scan ``x`` for NaN/Inf (a device synchronization). Pass False only where the caller has already
            checked; non-finite input then gives unspecified codes instead of an error.

    Returns:
        ``(q, scales)``: ``q`` ``torch.float8_e4m3fn`` of ``x.shape``; ``scales`` float32 of ``x.shape`` without
        ``axis``.

    Raises:
        NonFiniteError: ``x`` contains NaN or Inf.
        TypeError: ``x`` is not a float32/float16/bfloat16 tensor.
        ValueError: ``axis`` out of range.
    """
    xf, ax, amax = slice_amax(x, axis, "FP8 input", check)
    scales, r = scales_from_amax(amax)
    return encode(xf, r.unsqueeze(ax)), scales


def dequantize(
    q: torch.Tensor, scales: torch.Tensor, axis: int = -1, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``float32(q) * scales`` (scales broadcast back along ``axis``), then cast to ``dtype``."""
    if q.dtype != DTYPE:
        raise TypeError(f"FP8 dequantize expects float8_e4m3fn q, got {q.dtype}")
    ax = norm_axis(axis, q.dim())
    expected = q.shape[:ax] + q.shape[ax + 1 :]
    if scales.shape != expected:
        raise ValueError(
            f"scales shape {tuple(scales.shape)} does not match q shape {tuple(q.shape)} without axis {axis} "
            f"({tuple(expected)})"
        )
    return (q.to(torch.float32) * scales.to(torch.float32).unsqueeze(ax)).to(dtype)


def exact_matmul(qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
    """``qa @ qb.T`` of two E4M3 code tensors ``[..., K]`` and ``[N, K]``, accumulated exactly, as float32.

    Every product of two E4M3 values is a multiple of ``2**-18`` below ``2**18`` in magnitude, so float64 holds
    every partial sum exactly while ``K <= 2**17``; the float64 result is rounded once to float32 (the value an
    exact float32-accumulating kernel produces before its scales are applied).
    """
    return torch.matmul(qa.to(torch.float64), qb.to(torch.float64).t()).to(torch.float32)
