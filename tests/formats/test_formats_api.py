"""Package-level API of sixbit_tune.formats: fake_quant, quantized_linear_reference, relative_l2, check_finite,
weight_bytes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sixbit_tune import formats
from sixbit_tune.errors import NonFiniteError
from sixbit_tune.formats import fp8, int8, nvfp4


def test_formats_tuple():
    assert formats.FORMATS == ("nvfp4", "int8")
    assert formats.ALL_FORMATS == ("nvfp4", "int8", "fp8")


@pytest.mark.parametrize("fmt", formats.ALL_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fake_quant_shape_dtype_and_definition(fmt, dtype):
    x = torch.randn(2, 3, 48).to(dtype)
    y = formats.fake_quant(x, fmt)
    assert y.shape == x.shape and y.dtype == dtype
    if fmt == "nvfp4":
        expected = nvfp4.dequantize(nvfp4.quantize(x), dtype)
    elif fmt == "fp8":
        q, s = fp8.quantize(x)
        expected = fp8.dequantize(q, s, dtype=dtype)
    else:
        q, s = int8.quantize(x)
        expected = int8.dequantize(q, s, dtype=dtype)
    assert torch.equal(y, expected)
    assert float(formats.relative_l2(y, x)) < {"nvfp4": 0.15, "fp8": 0.05, "int8": 0.02}[fmt]


def test_fake_quant_errors():
    with pytest.raises(ValueError, match="unknown quantization format"):
        formats.fake_quant(torch.randn(2, 16), "fp4")
    with pytest.raises(ValueError, match="K=24"):
        formats.fake_quant(torch.randn(2, 24), "nvfp4")
    x = torch.randn(2, 16)
    x[0, 0] = float("nan")
    for fmt in formats.ALL_FORMATS:
        with pytest.raises(NonFiniteError):
            formats.fake_quant(x, fmt)


def _int8_numpy(x: np.ndarray):
    """Independent per-row INT8 quantizer in numpy (float32 division, np.round is half to even)."""
    x = x.astype(np.float32)
    scale = (np.abs(x).max(axis=-1) / np.float32(127)).astype(np.float32)
    safe = np.where(scale == 0, np.float32(1), scale)
    q = np.clip(np.round(x / safe[..., None]), -127, 127)
    return np.where(scale[..., None] == 0, 0, q).astype(np.int64), scale


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("xshape", [(5, 64), (2, 3, 64), (1, 1, 1, 64)], ids=str)
def test_int8_linear_matches_float64(xshape, with_bias):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(xshape, generator=g) * 3
    w = torch.randn(24, 64, generator=g) * 0.05
    b = torch.randn(24, generator=g) if with_bias else None
    y = formats.quantized_linear_reference(x, w, b, "int8")
    assert y.dtype == torch.float32 and y.shape == (*xshape[:-1], 24)

    qx, sx = _int8_numpy(x.numpy())
    qw, sw = _int8_numpy(w.numpy())
    acc = qx @ qw.T  # exact int64
    y64 = acc.astype(np.float64) * sx.astype(np.float64)[..., None] * sw.astype(np.float64)[None, :]
    if b is not None:
        y64 = y64 + b.numpy().astype(np.float64)
    # within float32 rounding: 3 roundings (acc -> f32, sx*sw, product) + bias add
    tol = 4 * 2.0**-24 * (np.abs(y64) + (np.abs(b.numpy()) if b is not None else 0)) + 1e-30
    assert np.all(np.abs(y.numpy().astype(np.float64) - y64) <= tol)
    # and bit-exact with the contract's float32 formula evaluated in numpy
    y32 = acc.astype(np.float32) * (sx[..., None] * sw[None, :])
    if b is not None:
        y32 = y32 + b.numpy()
    np.testing.assert_array_equal(y.numpy(), y32)


def test_int8_linear_accumulation_is_exact_for_large_k():
    K = 8192
    x = torch.full((2, K), 1.0)
    x[1, ::2] = -1.0
    w = torch.full((3, K), 2.0)
    y = formats.quantized_linear_reference(x, w, None, "int8")
    sx, sw = 1.0 / 127, 2.0 / 127
    acc = torch.tensor([[127 * 127 * K] * 3, [0] * 3], dtype=torch.float64)
    expected = (acc.float() * torch.tensor(np.float32(sx) * np.float32(sw)))
    assert torch.equal(y, expected)


def test_int8_linear_exact_accumulation_random_large_k():
    """|acc| far above 2**24 with odd partial sums: a float32 accumulator would round, the reference must not."""
    g = torch.Generator().manual_seed(3)
    K = 4096
    x = torch.rand(4, K, generator=g) * 0.5 + 0.5  # all positive, q in 64..127: acc ~ 3.7e7 > 2**24
    w = torch.rand(5, K, generator=g) * 0.5 + 0.5
    y = formats.quantized_linear_reference(x, w, None, "int8")
    qx, sx = _int8_numpy(x.numpy())
    qw, sw = _int8_numpy(w.numpy())
    acc = qx @ qw.T
    assert np.abs(acc).min() > 2**24
    np.testing.assert_array_equal(y.numpy(), acc.astype(np.float32) * (sx[..., None] * sw[None, :]))


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nvfp4_linear_is_dequantize_then_matmul(dtype, with_bias):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 5, 48, generator=g) * 4).to(dtype)
    w = (torch.randn(16, 48, generator=g) * 0.1).to(dtype)
    b = torch.randn(16, generator=g).to(dtype) if with_bias else None
    y = formats.quantized_linear_reference(x, w, b, "nvfp4")
    assert y.dtype == torch.float32 and y.shape == (2, 5, 16)
    expected = nvfp4.quantize(x).dequantize() @ nvfp4.quantize(w).dequantize().t()
    if b is not None:
        expected = expected + b.float()
    assert torch.equal(y, expected)
    exact = x.double() @ w.double().t() + (b.double() if b is not None else 0)
    assert float(formats.relative_l2(y, exact)) < 0.2


def test_linear_errors():
    x, w = torch.randn(3, 32), torch.randn(8, 32)
    with pytest.raises(ValueError, match="unknown quantization format"):
        formats.quantized_linear_reference(x, w, None, "int4")
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        formats.quantized_linear_reference(x, w[0], None, "int8")
    with pytest.raises(ValueError, match="K=32"):
        formats.quantized_linear_reference(torch.randn(3, 16), w, None, "int8")
    with pytest.raises(ValueError, match="bias"):
        formats.quantized_linear_reference(x, w, torch.randn(7), "int8")
    with pytest.raises(ValueError, match="K=24"):
        formats.quantized_linear_reference(torch.randn(3, 24), torch.randn(8, 24), None, "nvfp4")
    w_bad = w.clone()
    w_bad[1, 1] = float("inf")
    for fmt in formats.ALL_FORMATS:
        with pytest.raises(NonFiniteError):
            formats.quantized_linear_reference(x, w_bad, None, fmt)


def test_relative_l2():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    r = formats.relative_l2(a, b)
    assert r.dtype == torch.float32 and r.dim() == 0
    assert math.isclose(float(r), math.sqrt(2), rel_tol=1e-6)
    assert float(formats.relative_l2(torch.zeros(4), torch.zeros(4))) == 0.0
    assert float(formats.relative_l2(b, b)) == 0.0
    assert float(formats.relative_l2(a, torch.zeros(2))) == math.inf
    x = torch.randn(3, 7)
    y = x + 0.01 * torch.randn(3, 7)
    ref = float((y.double() - x.double()).norm() / x.double().norm())
    yb, xb = y.bfloat16(), x.bfloat16()  # low-precision inputs are compared after an exact upcast to float32
    assert torch.equal(formats.relative_l2(yb, xb), formats.relative_l2(yb.float(), xb.float()))
    assert math.isclose(float(formats.relative_l2(y, x)), ref, rel_tol=1e-5)
    with pytest.raises(ValueError, match="equal shapes"):
        formats.relative_l2(torch.zeros(3), torch.zeros(4))


def test_check_finite():
    formats.check_finite(torch.randn(4), "fine")
    formats.check_finite(torch.arange(4), "ints")
    x = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")], dtype=torch.float16)
    with pytest.raises(NonFiniteError, match=r"activation of attn1\.to_q .* 1 NaN and 2 Inf"):
        formats.check_finite(x, "activation of attn1.to_q")


@pytest.mark.parametrize("N,K", [(1, 16), (24, 64), (3072, 3072)])
def test_weight_bytes_match_real_storage(N, K):
    assert formats.weight_bytes("nvfp4", N, K) == N * K // 2 + N * K // 16 + 4
    assert formats.weight_bytes("int8", N, K) == N * K + 4 * N
    assert formats.weight_bytes("fp8", N, K) == N * K + 4 * N
    if N * K <= 24 * 64:
        w = torch.randn(N, K)
        assert formats.weight_bytes("nvfp4", N, K) == nvfp4.quantize(w).nbytes
        q, s = int8.quantize(w)
        assert formats.weight_bytes("int8", N, K) == q.numel() * q.element_size() + s.numel() * s.element_size()
        q, s = fp8.quantize(w)
        assert formats.weight_bytes("fp8", N, K) == q.numel() * q.element_size() + s.numel() * s.element_size()


def test_weight_bytes_errors():
    with pytest.raises(ValueError, match="K=20"):
        formats.weight_bytes("nvfp4", 4, 20)
    with pytest.raises(ValueError, match="unknown quantization format"):
        formats.weight_bytes("fp16", 4, 16)
    with pytest.raises(ValueError, match=">= 0"):
        formats.weight_bytes("int8", -1, 16)
