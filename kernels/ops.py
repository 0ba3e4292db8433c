"""The PyTorch-side kernel entry points as torch custom operators (namespace ``sixbit``), with fake implementations.

``torch.compile`` sees each of these as one node of known output shape and dtype, so a function that calls
:func:`sixbit_tune.kernels.quantized_linear` compiles without graph breaks. The Triton kernels are registered
separately in :mod:`.triton_ops` (imported only where Triton is installed); this module needs torch only.

Every operator takes 2-D activations ``[M, K]`` (the dispatch flattens leading dims) and returns fresh,
contiguous tensors. The ``*_reference`` operators run :mod:`sixbit_tune.formats` and are opaque to the compiler:
their NaN/Inf check (which synchronizes with the device) runs inside them, at run time.

* ``sixbit::int8_quantize_reference(x)`` -> ``(q int8 [M, K], scales float32 [M])``
* ``sixbit::fp8_quantize_reference(x)`` -> ``(q float8_e4m3fn [M, K], scales float32 [M])``
* ``sixbit::nvfp4_quantize_reference(x)`` -> ``(data uint8 [M, K/2], block_scales float8_e4m3fn [M, K/16],
  global_scale float32 [])``
* ``sixbit::int8_linear_reference`` / ``sixbit::fp8_linear_reference(x, wq, ws, bias, out_dtype)`` and
  ``sixbit::nvfp4_linear_reference(x, w_data, w_block_scales, w_global_scale, bias, out_dtype)`` -> ``[M, N]``
* ``sixbit::nvfp4_linear_native(x, w_data, w_block_scales, w_global_scale, bias, out_dtype)`` ->
  ``(y [M, N], amax float32 [])``: the block-scaled FP4 tensor-core GEMM of :mod:`.native_nvfp4` (activation
  quantized by the Triton kernel; amax for the caller's NaN/Inf check)
* ``sixbit::finite_copy(x, what)`` -> a copy of ``x`` after checking that it is finite: how a compiled graph
  raises :class:`~sixbit_tune.errors.NonFiniteError` (a data-dependent check inside the graph would break it,
  and an operator without outputs would be removed as dead code)
"""

from __future__ import annotations

import torch
from torch.library import custom_op

from sixbit_tune.formats import fp8, int8, nvfp4
from sixbit_tune.formats.common import check_finite


def _linear_out(x: torch.Tensor, N: int, out_dtype: torch.dtype) -> torch.Tensor:
    return x.new_empty((x.shape[0], N), dtype=out_dtype)


def _finish(y: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).contiguous()


# ----------------------------------------------------------------------------------------- quantizers


@custom_op("sixbit::int8_quantize_reference", mutates_args=())
def int8_quantize_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = int8.quantize(x)
    return q.contiguous(), s.contiguous()


@int8_quantize_reference.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


@custom_op("sixbit::fp8_quantize_reference", mutates_args=())
def fp8_quantize_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = fp8.quantize(x)
    return q.contiguous(), s.contiguous()


@fp8_quantize_reference.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=fp8.DTYPE), x.new_empty(x.shape[:-1], dtype=torch.float32)


@custom_op("sixbit::nvfp4_quantize_reference", mutates_args=())
def nvfp4_quantize_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = nvfp4.quantize(x)
    return t.data.contiguous(), t.block_scales.contiguous(), t.global_scale.clone()


@nvfp4_quantize_reference.register_fake
def _(x):
    nvfp4.check_k(x.shape[-1])
    lead, K = tuple(x.shape[:-1]), x.shape[-1]
    return (x.new_empty((*lead, K // 2), dtype=torch.uint8),
            x.new_empty((*lead, K // nvfp4.BLOCK_SIZE), dtype=torch.float8_e4m3fn),
            x.new_empty((), dtype=torch.float32))


# ------------------------------------------------------------------------------------------- linears


@custom_op("sixbit::int8_linear_reference", mutates_args=())
def int8_linear_reference(
    x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    xq, xs = int8.quantize(x)
    # Exact integer accumulation: |sum| <= K * 127**2 < 2**53, so float64 holds it exactly.
    acc = xq.double() @ wq.double().T
    return _finish(acc.float() * (xs[:, None] * ws[None, :]), bias, out_dtype)


@custom_op("sixbit::fp8_linear_reference", mutates_args=())
def fp8_linear_reference(
    x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    xq, xs = fp8.quantize(x)
    return _finish(fp8.exact_matmul(xq, wq) * (xs[:, None] * ws[None, :]), bias, out_dtype)


@int8_linear_reference.register_fake
@fp8_linear_reference.register_fake
def _(x, wq, ws, bias, out_dtype):
    return _linear_out(x, wq.shape[0], out_dtype)


def _nvfp4_weight(w_data, w_block_scales, w_global_scale) -> nvfp4.NVFP4Tensor:
    N = w_data.shape[0]
    return nvfp4.NVFP4Tensor(data=w_data, block_scales=w_block_scales, global_scale=w_global_scale,
                             shape=torch.Size((N, w_data.shape[1] * 2)), orig_dtype=torch.float32)


@custom_op("sixbit::nvfp4_linear_reference", mutates_args=())
def nvfp4_linear_reference(
    x: torch.Tensor, w_data: torch.Tensor, w_block_scales: torch.Tensor, w_global_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    w = _nvfp4_weight(w_data, w_block_scales, w_global_scale)
    return _finish(nvfp4.quantize(x).dequantize() @ w.dequantize().T, bias, out_dtype)


@custom_op("sixbit::nvfp4_linear_native", mutates_args=())
def nvfp4_linear_native(
    x: torch.Tensor, w_data: torch.Tensor, w_block_scales: torch.Tensor, w_global_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    from .native_nvfp4 import nvfp4_gemm_native
    from .quant import quantize_nvfp4

    data, scales, gs, _, amax = quantize_nvfp4(x.contiguous())
    a = nvfp4.NVFP4Tensor(data=data, block_scales=scales, global_scale=gs, shape=x.shape, orig_dtype=x.dtype)
    w = _nvfp4_weight(w_data, w_block_scales, w_global_scale)
    return nvfp4_gemm_native(a, w, bias, out_dtype).contiguous(), amax.clone()


@nvfp4_linear_reference.register_fake
def _(x, w_data, w_block_scales, w_global_scale, bias, out_dtype):
    return _linear_out(x, w_data.shape[0], out_dtype)


@nvfp4_linear_native.register_fake
def _(x, w_data, w_block_scales, w_global_scale, bias, out_dtype):
    return _linear_out(x, w_data.shape[0], out_dtype), x.new_empty((), dtype=torch.float32)


# -------------------------------------------------------------------------------------------- attention

#: Head dims the 8-bit attention kernel takes (``kernels.attention.check_kernel_inputs``).
ATTENTION_HEAD_DIMS = (16, 32, 64, 128, 256)


@custom_op("sixbit::attention_8bit_reference", mutates_args=())
def attention_8bit_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                             qk_format: str) -> torch.Tensor:
    from sixbit_tune.formats.attention import attention_8bit_reference as reference

    return reference(q, k, v, scale, qk_format).contiguous()


@attention_8bit_reference.register_fake
def _(q, k, v, scale, qk_format):
    return q.new_empty(q.shape)


# -------------------------------------------------------------------------------------------- checks


@custom_op("sixbit::finite_copy", mutates_args=())
def finite_copy(x: torch.Tensor, what: str) -> torch.Tensor:
    check_finite(x, what)
    return x.clone()


@finite_copy.register_fake
def _(x, what):
    return torch.empty_like(x)
