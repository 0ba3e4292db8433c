"""NVFP4 weight encoders: valid codes every decoder reads, the scale search never worse than the standard encoder per
block, GPTQ lowering the calibrated output error, determinism, odd shapes, K checks, zeros and NaN, and the
``encoder`` keyword of ``sixbit_tune.kernels.quantize_weight``."""

from __future__ import annotations

import pytest
import torch

from sixbit_tune import kernels
from sixbit_tune.errors import NonFiniteError
from sixbit_tune.formats import nvfp4

ENCODERS = nvfp4.WEIGHT_ENCODERS


def _weights(seed: int, shape=(24, 64)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # heavy-tailed rows of different magnitudes, as trained weights are
    w = torch.randn(shape, generator=g) * torch.rand(shape[:-1], generator=g).unsqueeze(-1) * 3
    return w + 0.2 * torch.randn(shape, generator=g) ** 3


def _calibration(seed: int, K: int, rows: int = 512) -> torch.Tensor:
    """Correlated inputs with a few large channels, as transformer activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) / K**0.5 + torch.eye(K)
    x = torch.randn(rows, K, generator=g) @ mix
    return x * (1 + 4 * (torch.rand(K, generator=g) > 0.9))


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return x.double().T @ x.double()


def _encode(w, encoder, x=None):
    if encoder == "gptq":
        x = _calibration(1, w.shape[-1]) if x is None else x
        return nvfp4.quantize_weight(w, encoder, hessian=_hessian(x))
    return nvfp4.quantize_weight(w, encoder)


def _block_errors(t: nvfp4.NVFP4Tensor, w: torch.Tensor) -> torch.Tensor:
    d = (t.dequantize() - w.float()).reshape(*w.shape[:-1], w.shape[-1] // 16, 16)
    return d.square().sum(-1)


def test_weight_encoder_names():
    assert nvfp4.WEIGHT_ENCODERS[0] == nvfp4.DEFAULT_WEIGHT_ENCODER == "standard"
    with pytest.raises(ValueError, match="unknown NVFP4 weight encoder 'round'.*scale-search"):
        nvfp4.quantize_weight(torch.randn(4, 32), "round")


def test_standard_encoder_is_quantize_bit_for_bit():
    w = _weights(0)
    a, b = nvfp4.quantize_weight(w), nvfp4.quantize(w)
    assert torch.equal(a.data, b.data)
    assert torch.equal(a.block_scales.view(torch.uint8), b.block_scales.view(torch.uint8))
    assert torch.equal(a.global_scale, b.global_scale)


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_codes_decode_with_the_existing_decoders(encoder, dtype):
    w = _weights(3, (40, 96)).to(dtype)
    t = _encode(w, encoder)
    # a valid NVFP4Tensor: packed codes, E4M3 scales that are positive and finite, the standard global scale
    assert t.data.dtype == torch.uint8 and tuple(t.data.shape) == (40, 48)
    scales = t.block_scales.to(torch.float32)
    assert bool(torch.isfinite(scales).all()) and bool((scales > 0).all())
    assert not bool(torch.signbit(scales).any())
    assert torch.equal(t.global_scale, nvfp4.global_scale_of(w))
    # the reference decoder: dequantized = E2M1[code] * b * s, element by element
    codes = nvfp4.unpack_codes(t.data).reshape(40, 6, 16)
    manual = (nvfp4.E2M1_VALUES[codes.long()] * scales.unsqueeze(-1)) * t.global_scale
    deq = t.dequantize()
    assert torch.equal(deq, manual.reshape(40, 96))
    assert float((deq - w.float()).norm() / w.float().norm()) < 0.2
    # the kernels' NVFP4 GEMM (reference path) reads the same codes: equal to the dequantized-operand product
    x = torch.randn(5, 96)
    y = kernels.quantized_linear(x, t, None, "nvfp4", torch.float32, preference="reference")
    xq = nvfp4.quantize(x).dequantize()
    torch.testing.assert_close(y, xq @ deq.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape", [(24, 64), (3, 5, 48), (1, 16), (17, 160)])
def test_scale_search_is_never_worse_than_standard_per_block(seed, shape):
    w = _weights(seed, shape)
    std = _block_errors(nvfp4.quantize(w), w)
    ss_t = nvfp4.quantize_weight(w, "scale-search")
    ss = _block_errors(ss_t, w)
    assert bool((ss <= std).all())
    if std.numel() >= 8:  # it does lower the error (a lone block may already have its best scale)
        assert float(ss.sum()) < float(std.sum())
    # every block keeps the standard rounding of its elements for the scale it chose
    blocks = w.float().reshape(*shape[:-1], shape[-1] // 16, 16)
    r = (1.0 / ss_t.global_scale) / ss_t.block_scales.to(torch.float32)
    again = nvfp4.encode_e2m1((blocks * r.unsqueeze(-1)).clamp(-6, 6)).reshape(shape)
    assert torch.equal(nvfp4.pack_codes(again), ss_t.data)


def test_scale_search_keeps_the_standard_scale_where_nothing_is_better():
    # a block whose values sit on the E2M1 grid of the standard scale has zero error: nothing may replace it
    w = torch.tensor([[6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.0] * 2, [-6.0, 1.0] * 8])
    std, ss = nvfp4.quantize(w), nvfp4.quantize_weight(w, "scale-search")
    assert torch.equal(std.block_scales.view(torch.uint8), ss.block_scales.view(torch.uint8))
    assert torch.equal(std.data, ss.data)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_deterministic(encoder):
    w = _weights(5, (32, 128))
    a, b = _encode(w, encoder), _encode(w.clone(), encoder)
    assert torch.equal(a.data, b.data)
    assert torch.equal(a.block_scales.view(torch.uint8), b.block_scales.view(torch.uint8))
    assert torch.equal(a.global_scale, b.global_scale)


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("shape", [(1, 16), (7, 48), (33, 16), (0, 32)])
def test_odd_shapes(encoder, shape):
    w = torch.randn(shape)
    t = _encode(w, encoder)
    assert t.shape == torch.Size(shape) and t.orig_dtype == torch.float32
    assert t.dequantize().shape == torch.Size(shape)


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("K", [8, 20, 33])
def test_k_must_be_a_multiple_of_16(encoder, K):
    with pytest.raises(ValueError, match=rf"K={K}.*multiple of 16|multiple of 16.*K={K}"):
        nvfp4.quantize_weight(torch.randn(4, K), encoder, hessian=torch.eye(K))


@pytest.mark.parametrize("encoder", ENCODERS)
def test_all_zero_weights_match_the_standard_encoder(encoder):
    w = torch.zeros(8, 32)
    w[1, 3] = -0.0
    w[2] = -0.0
    t, ref = _encode(w, encoder), nvfp4.quantize(w)
    assert torch.equal(t.data, ref.data)  # zero codes, the sign of -0.0 kept as the standard encoder keeps it
    assert torch.equal(t.block_scales.view(torch.uint8), ref.block_scales.view(torch.uint8))
    assert torch.equal(t.global_scale, ref.global_scale) and float(t.global_scale) == 1.0
    assert not bool(t.dequantize().any())


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_raise_as_the_standard_encoder(encoder, bad):
    w = torch.randn(4, 32)
    w[2, 7] = bad
    with pytest.raises(NonFiniteError, match="must be finite"):
        _encode(w, encoder)


def test_gptq_lowers_the_calibrated_output_error():
    w = _weights(7, (48, 128))
    pool = _calibration(11, 128, 1536)
    x_cal, x_test = pool[:1024], pool[1024:]

    def out_err(t, x):
        return float((x @ (t.dequantize() - w).T).norm() / (x @ w.T).norm())

    std = nvfp4.quantize(w)
    ss = nvfp4.quantize_weight(w, "scale-search")
    gq = nvfp4.quantize_weight(w, "gptq", hessian=_hessian(x_cal))
    for x in (x_cal, x_test):  # also on inputs it was not calibrated on, drawn the same way
        assert out_err(gq, x) < 0.9 * min(out_err(std, x), out_err(ss, x))


def test_gptq_with_an_identity_hessian_is_the_scale_search():
    # no correlation between inputs: there is nothing to compensate, every column rounds to nearest
    w = _weights(9, (16, 64))
    a = nvfp4.quantize_weight(w, "gptq", hessian=torch.eye(64))
    b = nvfp4.quantize_weight(w, "scale-search")
    assert torch.equal(a.data, b.data)
    assert torch.equal(a.block_scales.view(torch.uint8), b.block_scales.view(torch.uint8))


def test_gptq_dead_inputs_do_not_break_it():
    w = _weights(2, (8, 32))
    x = _calibration(3, 32)
    x[:, 5] = 0  # an input channel that is always zero
    t = nvfp4.quantize_weight(w, "gptq", hessian=_hessian(x))
    assert bool(torch.isfinite(t.dequantize()).all())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "needs hessian"),
        ({"hessian": torch.eye(16)}, r"hessian must be a \[32, 32\]"),
        ({"hessian": torch.full((32, 32), float("nan"))}, "hessian must be finite"),
        ({"hessian": torch.eye(32), "damp": -1.0}, "damp must be"),
    ],
)
def test_gptq_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nvfp4.quantize_weight(torch.randn(4, 32), "gptq", **kwargs)


def test_gptq_needs_a_2d_weight():
    with pytest.raises(ValueError, match="2-D linear weight"):
        nvfp4.quantize_weight(torch.randn(2, 4, 32), "gptq", hessian=torch.eye(32))


# -------------------------------------------------------------------------------- sixbit_tune.kernels keyword


def test_kernels_quantize_weight_default_is_standard():
    w = _weights(4, (16, 64))
    a = kernels.quantize_weight(w, "nvfp4", preference="reference")
    b = kernels.quantize_weight(w, "nvfp4", preference="reference", encoder="standard")
    for t in (a, b):
        assert torch.equal(t.data, nvfp4.quantize(w).data)


@pytest.mark.parametrize("encoder", ["scale-search", "gptq"])
def test_kernels_quantize_weight_passes_the_encoder(encoder):
    w = _weights(4, (16, 64))
    h = _hessian(_calibration(2, 64))
    got = kernels.quantize_weight(w, "nvfp4", encoder=encoder, hessian=h)
    want = nvfp4.quantize_weight(w, encoder, hessian=h)
    assert torch.equal(got.data, want.data)
    assert torch.equal(got.block_scales.view(torch.uint8), want.block_scales.view(torch.uint8))
    assert not torch.equal(got.block_scales.view(torch.uint8), nvfp4.quantize(w).block_scales.view(torch.uint8))
    y = kernels.quantized_linear(torch.randn(3, 64), got, None, "nvfp4", torch.float32)
    assert y.shape == (3, 16) and bool(torch.isfinite(y).all())


def test_kernels_quantize_weight_rejects_bad_encoders():
    w = torch.randn(8, 32)
    with pytest.raises(ValueError, match="unknown NVFP4 weight encoder"):
        kernels.quantize_weight(w, "nvfp4", encoder="nope")
    with pytest.raises(ValueError, match="for NVFP4 only"):
        kernels.quantize_weight(w, "int8", encoder="scale-search")
    with pytest.raises(NonFiniteError):
        kernels.quantize_weight(torch.full((8, 32), float("nan")), "nvfp4", encoder="scale-search")
