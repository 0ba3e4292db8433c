"""Symmetric INT8 reference numerics: the specification every INT8 kernel is tested against.

For each slice along ``axis`` (activations: one scale per token, ``axis=-1``; weights ``[N, K]``: one scale per
output channel, also ``axis=-1``, i.e. reduced over K), all in float32:

* ``scale = amax(|x|) / 127`` (IEEE float32 division);
* ``q = clamp(round_half_even(x / scale), -127, 127)`` with IEEE float32 division (not a multiplication by a
  reciprocal); -128 is never produced;
* a slice whose scale is 0 (an all-zero slice, or an amax below ~1.8e-43 whose scale underflows) gets scale 0 and
  ``q = 0`` exactly, never NaN;
* dequantized value ``float32(q) * scale``.
"""

from __future__ import annotations

import torch

from sixbit_tune.formats.common import ieee_div, norm_axis, slice_amax

QMAX = 127



def quantize(x: torch.Tensor, axis: int = -1, *, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to symmetric INT8 with one scale per slice reduced over ``axis``.

    Args:
        x: float32/float16/bfloat16 tensor, any shape with at least one dim.
        axis: the reduced dim (default the last).
        check: scan ``x`` for NaN/Inf (a device synchronization). Pass False only where the caller has already
            checked; non-finite input then gives unspecified codes instead of an error.

    Returns:
        ``(q, scales)``: ``q`` int8 of ``x.shape``; ``scales`` float32 of ``x.shape`` without ``axis``.

    Raises:
        NonFiniteError: ``x`` contains NaN or Inf.
        TypeError: ``x`` is not a float32/float16/bfloat16 tensor.
        ValueError: ``axis`` out of range.
    """
    xf, ax, amax = slice_amax(x, axis, "INT8 input", check)
    scales = ieee_div(amax, float(QMAX))
    s = scales.unsqueeze(ax)
    zero = s == 0
    q = torch.round(xf / torch.where(zero, torch.ones_like(s), s)).clamp(-QMAX, QMAX)
    q = torch.where(zero, torch.zeros_like(q), q)
    return q.to(torch.int8), scales


def dequantize(
    q: torch.Tensor, scales: torch.Tensor, axis: int = -1, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``float32(q) * scales`` (scales broadcast back along ``axis``), then cast to ``dtype``."""
    if q.dtype != torch.int8:
        raise TypeError(f"INT8 dequantize expects int8 q, got {q.dtype}")
    ax = norm_axis(axis, q.dim())
    expected = q.shape[:ax] + q.shape[ax + 1 :]
    if scales.shape != expected:
        raise ValueError(
            f"scales shape {tuple(scales.shape)} does not match q shape {tuple(q.shape)} without axis {axis} "
            f"({tuple(expected)})"
        )
    return (q.to(torch.float32) * scales.to(torch.float32).unsqueeze(ax)).to(dtype)
