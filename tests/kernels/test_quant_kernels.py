"""Triton activation quantizers vs sixbit_tune.formats, bit for bit (CPU interpreter)."""

from __future__ import annotations

import pytest
import torch

from sixbit_tune.errors import NonFiniteError
from sixbit_tune.formats import int8, nvfp4

SHAPES = [(1, 64), (7, 48), (33, 160), (100, 96), (157, 1920)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rand(shape, dtype, scale=3.0):
    return (torch.randn(shape) * scale).to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_rows_bit_exact(interp, shape, dtype):
    from sixbit_tune.kernels.quant import quantize_int8_rows

    x = _rand(shape, dtype)
    x[0, :5] = 0.0
    if shape[0] > 2:
        x[1] = 0.0  # a zero row: scale 0, codes 0
        x[2] = x[2] * 1e-30  # tiny but nonzero row
    q, s = quantize_int8_rows(x)
    rq, rs = int8.quantize(x)
    assert torch.equal(s, rs)
    assert torch.equal(q, rq)


@pytest.mark.parametrize("shape,loop_k", [((3, 16400), None), ((9, 96), 64), ((5, 4100), None)])
def test_int8_rows_long_row_loop_kernel(interp, shape, loop_k):
    from sixbit_tune.kernels.quant import quantize_int8_rows

    x = _rand(shape, torch.bfloat16)
    x[1] = 0.0
    q, s = quantize_int8_rows(x, loop_k=loop_k)
    rq, rs = int8.quantize(x)
    assert torch.equal(s, rs) and torch.equal(q, rq)


def _nvfp4_inputs(shape, dtype):
    yield _rand(shape, dtype)
    # Quarter-integer values hit E2M1 rounding ties and E4M3-exact block scales often.
    t = (torch.randint(-24, 25, shape).float() / 4).to(dtype)
    t[0, :3] = -0.0
    yield t
    # Blocks of very different magnitude: floors and caps of the block scale.
    w = _rand(shape, torch.float32)
    w[:, :16] *= 2e3
    w[:, 16:32] *= 1e-5
    yield w.to(dtype)
    yield torch.zeros(shape, dtype=dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_bit_exact(interp, shape, dtype):
    from sixbit_tune.kernels.quant import quantize_nvfp4

    for i, x in enumerate(_nvfp4_inputs(shape, dtype)):
        # Alternate the two load forms (even/odd strided loads; one load then split), same bits expected.
        data, scales, gs, deq, amax = quantize_nvfp4(x, write_dequant=True, params={"pair_loads": i % 2 == 0})
        ref = nvfp4.quantize(x)
        assert torch.equal(gs, ref.global_scale)
        assert torch.equal(scales.view(torch.uint8), ref.block_scales.view(torch.uint8))
        assert torch.equal(data, ref.data)
        assert float(amax) == float(x.float().abs().max())
        # The bf16 expansion E2M1[code] * b (no global scale) is exact.
        M, K = shape
        codes = nvfp4.decode_e2m1(nvfp4.unpack_codes(ref.data)).reshape(M, K // 16, 16)
        expect = (codes * ref.block_scales.float()[..., None]).reshape(M, K)
        assert torch.equal(deq.float(), expect)


@pytest.mark.parametrize("fmt", ["int8", "nvfp4"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_dispatch_triton_rejects_nonfinite(interp, fmt, bad):
    from sixbit_tune.kernels import quantize_activation

    x = _rand((9, 32), torch.bfloat16)
    x[4, 7] = bad
    with pytest.raises(NonFiniteError, match="activation"):
        quantize_activation(x, fmt, preference="triton")


@pytest.mark.parametrize("fmt", ["int8", "nvfp4"])
def test_dispatch_triton_quantizers_match_reference(interp, fmt):
    from sixbit_tune.kernels import quantize_activation, quantize_weight

    x = _rand((2, 5, 64), torch.bfloat16)
    got = quantize_activation(x, fmt, preference="triton")
    ref = quantize_activation(x, fmt, preference="reference")
    w = _rand((48, 64), torch.float32)
    gw = quantize_weight(w, fmt, preference="triton")
    rw = quantize_weight(w, fmt, preference="reference")
    if fmt == "int8":
        assert got[0].shape == x.shape and got[1].shape == x.shape[:-1]
        for a, b in zip((*got, *gw), (*ref, *rw)):
            assert torch.equal(a, b)
    else:
        for a, b in ((got, ref), (gw, rw)):
            assert a.shape == b.shape and a.orig_dtype == b.orig_dtype
            assert torch.equal(a.data, b.data)
            assert torch.equal(a.block_scales.view(torch.uint8), b.block_scales.view(torch.uint8))
            assert torch.equal(a.global_scale, b.global_scale)
