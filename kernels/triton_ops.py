"""The Triton kernels as torch custom operators (``torch.library.triton_op``), imported only where Triton is.

Each operator's body launches its kernels through ``torch.library.wrap_triton``, so ``torch.compile`` traces the
kernels themselves into the graph (Inductor schedules them with the surrounding code) instead of stopping at an
opaque call. The fake implementations give output shapes and dtypes without running anything (the bodies
themselves cannot run on fake tensors under Triton's CPU interpreter).

* ``sixbit::int8_quantize_triton(x [M, K])`` -> ``(q int8 [M, K], scales float32 [M])``
* ``sixbit::int8_gemm_triton(xq, wq, xs, ws, bias, out_dtype)`` -> ``[M, N]``
* ``sixbit::nvfp4_quantize_triton(x [M, K])`` -> ``(data uint8 [M, K/2], block_scales float8_e4m3fn [M, K/16],
  global_scale float32 [], amax float32 [])``
* ``sixbit::nvfp4_linear_triton(x, w_data, w_block_scales, w_global_scale, bias, out_dtype)`` ->
  ``(y [M, N], amax float32 [])``: the emulated NVFP4 GEMM with its activation quantizer

All are bit-identical to the plain-function forms in :mod:`.quant`, :mod:`.gemm_int8` and :mod:`.gemm_nvfp4`,
which they call. The amax/scales outputs let the caller check for NaN/Inf without a second pass.
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from .gemm_int8 import int8_gemm
from .gemm_nvfp4 import nvfp4_linear_emulated
from .quant import quantize_int8_rows, quantize_nvfp4


@triton_op("sixbit::int8_quantize_triton", mutates_args=())
def int8_quantize_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_int8_rows(x.contiguous())


@int8_quantize_triton.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:1], dtype=torch.float32)


@triton_op("sixbit::int8_gemm_triton", mutates_args=())
def int8_gemm_triton(
    xq: torch.Tensor, wq: torch.Tensor, xs: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return int8_gemm(xq.contiguous(), wq.contiguous(), xs.contiguous(), ws.contiguous(), bias, out_dtype)


@int8_gemm_triton.register_fake
def _(xq, wq, xs, ws, bias, out_dtype):
    return xq.new_empty((xq.shape[0], wq.shape[0]), dtype=out_dtype)


@triton_op("sixbit::nvfp4_quantize_triton", mutates_args=())
def nvfp4_quantize_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    data, scales, gs, _, amax = quantize_nvfp4(x.contiguous())
    return data, scales, gs, amax


@nvfp4_quantize_triton.register_fake
def _(x):
    M, K = x.shape
    return (x.new_empty((M, K // 2), dtype=torch.uint8), x.new_empty((M, K // 16), dtype=torch.float8_e4m3fn),
            x.new_empty((), dtype=torch.float32), x.new_empty((), dtype=torch.float32))


class _Weight:
    """The attributes of an NVFP4Tensor that the emulated GEMM reads."""

    def __init__(self, data, block_scales, global_scale):
        self.data, self.block_scales, self.global_scale = data, block_scales, global_scale


@triton_op("sixbit::nvfp4_linear_triton", mutates_args=())
def nvfp4_linear_triton(
    x: torch.Tensor, w_data: torch.Tensor, w_block_scales: torch.Tensor, w_global_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    return nvfp4_linear_emulated(x.contiguous(), _Weight(w_data, w_block_scales, w_global_scale), bias, out_dtype)


@nvfp4_linear_triton.register_fake
def _(x, w_data, w_block_scales, w_global_scale, bias, out_dtype):
    return x.new_empty((x.shape[0], w_data.shape[0]), dtype=out_dtype), x.new_empty((), dtype=torch.float32)
