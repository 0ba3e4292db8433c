"""Triton W8A8 INT8 and emulated NVFP4 W4A4 GEMMs vs sixbit_tune.formats (CPU interpreter).

INT8: the int32 accumulation is exact and the epilogue does the reference's float32 operations in the
reference's order, so the float32 output must be identical and a bf16/fp16 output must equal the reference
rounded once to that dtype.

NVFP4: the dequantized operands are exact in the dot dtype, so the only differences from
``quantized_linear_reference`` are the float32 summation order (bounded by ``K * 2**-24 * |A| @ |W|.T`` with
the global scales) and the final rounding to the output dtype (half an ulp: ``2**-9`` relative for bf16).
"""

from __future__ import annotations

import pytest
import torch

from sixbit_tune.formats import int8, nvfp4, quantized_linear_reference

GEMM_SHAPES = [(1, 32, 64), (7, 48, 48), (33, 40, 256), (100, 64, 96), (157, 24, 128)]
OUT_ULP = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _inputs(M, N, K, with_bias=True):
    x = torch.randn(M, K) * 2
    x[0, : K // 2] *= 50.0  # one token with larger values: per-token scales differ
    w = torch.randn(N, K) * 0.1
    b = torch.randn(N) if with_bias else None
    return x, w, b


@pytest.mark.parametrize("M,N,K", GEMM_SHAPES)
@pytest.mark.parametrize("variant", ["pointer", "tma", "tma-store", "tma-store-sub", "tma-flat"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_gemm_matches_reference(interp, M, N, K, variant, out_dtype):
    from sixbit_tune.kernels.gemm_int8 import int8_gemm

    x, w, b = _inputs(M, N, K, with_bias=out_dtype != torch.float16)
    qx, sx = int8.quantize(x)
    qw, sw = int8.quantize(w)
    y = int8_gemm(qx, qw, sx, sw, b, out_dtype, variant=variant)
    ref = quantized_linear_reference(x, w, b, "int8")
    assert y.dtype == out_dtype and y.shape == (M, N)
    assert torch.equal(y, ref.to(out_dtype))


def test_int8_gemm_pointer_handles_k_not_multiple_of_16(interp):
    from sixbit_tune.kernels.gemm_int8 import int8_gemm

    x, w, b = _inputs(9, 20, 50)
    qx, sx = int8.quantize(x)
    qw, sw = int8.quantize(w)
    y = int8_gemm(qx, qw, sx, sw, b, torch.float32)  # auto picks the pointer kernel
    assert torch.equal(y, quantized_linear_reference(x, w, b, "int8"))


def _nvfp4_bound(x, w, ref, out_dtype):
    a, wq = nvfp4.quantize(x), nvfp4.quantize(w)
    mag = a.dequantize().abs() @ wq.dequantize().abs().T
    K = x.shape[-1]
    return K * 2.0**-24 * mag * 2 + OUT_ULP[out_dtype] * ref.abs() + 1e-30


@pytest.mark.parametrize("M,N,K", GEMM_SHAPES)
@pytest.mark.parametrize(
    "form", ["auto", "deq", "deq-swap", "deq-tma", "deq-tma-swap", "packed", "packed-swap"]
)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_gemm_matches_reference(interp, M, N, K, form, out_dtype):
    from sixbit_tune.kernels.gemm_nvfp4 import nvfp4_linear_emulated

    if form.startswith("deq-tma") and K % 32:
        pytest.skip("the TMA forms need K % 32 == 0 (auto falls back to pointer loads there)")
    x, w, b = _inputs(M, N, K)
    wq = nvfp4.quantize(w)
    y, amax = nvfp4_linear_emulated(x, wq, b, out_dtype, form=form)
    assert float(amax) == float(x.abs().max())
    ref = quantized_linear_reference(x, w, b, "nvfp4")
    assert y.dtype == out_dtype and y.shape == (M, N)
    err = (y.float() - ref).abs()
    assert bool((err <= _nvfp4_bound(x, w, ref, out_dtype)).all()), float(err.max())


@pytest.mark.parametrize("fmt", ["int8", "nvfp4"])
def test_dispatch_triton_linear_matches_reference_path(interp, fmt):
    from sixbit_tune.kernels import quantize_weight, quantized_linear

    x = torch.randn(3, 11, 64, dtype=torch.bfloat16)
    w = torch.randn(40, 64)
    b = torch.randn(40)
    qw = quantize_weight(w, fmt, preference="triton")
    y = quantized_linear(x, qw, b, fmt, torch.float32, preference="triton")
    ref = quantized_linear(x, qw, b, fmt, torch.float32, preference="reference")
    assert y.shape == (3, 11, 40)
    if fmt == "int8":
        assert torch.equal(y, ref)
    else:
        bound = _nvfp4_bound(x.reshape(-1, 64), w, ref.reshape(-1, 40), torch.float32)
        assert bool(((y - ref).abs().reshape(-1, 40) <= bound).all())
