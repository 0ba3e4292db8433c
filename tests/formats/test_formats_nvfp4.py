"""NVFP4 reference: bit-exact agreement with a slow scalar re-implementation, E4M3 block-scale rounding, error
bounds (hypothesis), edge cases and error handling."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sixbit_tune.errors import NonFiniteError
from sixbit_tune.formats import nvfp4

F32 = np.float32
FLT_MAX = float(np.finfo(np.float32).max)
MAGS = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


# ----------------------------------------------------------------------------------------------------------------
# Independent slow-but-obvious scalar reference (numpy float32 scalars emulate IEEE float32 arithmetic exactly).
# ----------------------------------------------------------------------------------------------------------------


def e4m3_rne(t: float) -> float:
    """Round t in [2**-6, 448] to the nearest E4M3 normal value, ties to even mantissa (exact Python floats)."""
    assert 2.0**-6 <= t <= 448.0
    _, e = math.frexp(t)  # t = m * 2**e with 0.5 <= m < 1, so the leading bit is 2**(e-1)
    quantum = 2.0 ** (e - 4)  # 3 mantissa bits below the leading bit
    return round(t / quantum) * quantum  # t / quantum is exact; round() on a float is round-half-to-even


def e2m1_code_scalar(p: float) -> int:
    """Nearest E2M1 magnitude by exhaustive distance, ties to the even code; sign from the sign bit."""
    a = min(abs(p), 6.0)
    dists = [abs(a - m) for m in MAGS]
    best = min(dists)
    cands = [i for i, d in enumerate(dists) if d == best]
    idx = cands[0] if len(cands) == 1 else next(i for i in cands if i % 2 == 0)
    return idx | (8 if math.copysign(1.0, p) < 0 else 0)


def scalar_nvfp4(x: np.ndarray, global_scale: float | None = None):
    """Returns (codes [..., K] int, block scales [..., K//16] float, s float32, dequantized [..., K] float32)."""
    x = np.asarray(x, dtype=np.float32)
    K = x.shape[-1]
    rows = x.reshape(-1, K)
    with np.errstate(all="ignore"):
        if global_scale is None:
            amax = F32(0.0)
            for v in rows.reshape(-1):
                amax = max(amax, abs(v))
            s = F32(amax) / F32(2688.0)
            if amax == 0 or not np.isfinite(F32(F32(1.0) / s) / F32(2.0**-6)):
                s = F32(1.0)
        else:
            s = F32(global_scale)
        codes = np.zeros(rows.shape, dtype=np.int64)
        deq = np.zeros(rows.shape, dtype=np.float32)
        scales = np.zeros((rows.shape[0], K // 16), dtype=np.float64)
        for i, row in enumerate(rows):
            for j in range(K // 16):
                blk = row[16 * j : 16 * j + 16]
                ab = F32(0.0)
                for v in blk:
                    ab = max(ab, abs(v))
                t = F32(F32(ab) / F32(6.0)) / s
                t = min(max(float(t), 2.0**-6), 448.0)
                b = F32(e4m3_rne(t))
                scales[i, j] = float(b)
                r = F32(F32(1.0) / s) / b
                for k, v in enumerate(blk):
                    p = F32(v) * r
                    p = min(max(p, F32(-6.0)), F32(6.0))
                    c = e2m1_code_scalar(float(p))
                    codes[i, 16 * j + k] = c
                    val = F32(-MAGS[c & 7] if c & 8 else MAGS[c & 7])
                    deq[i, 16 * j + k] = F32(val * b) * s
    lead = x.shape[:-1]
    return codes.reshape(x.shape), scales.reshape(*lead, K // 16), s, deq.reshape(x.shape)


def assert_matches_scalar(x: torch.Tensor, global_scale: float | None = None) -> nvfp4.NVFP4Tensor:
    t = nvfp4.quantize(x, global_scale=global_scale)
    codes, scales, s, deq = scalar_nvfp4(x.float().numpy(), global_scale)
    assert t.global_scale.dtype == torch.float32 and t.global_scale.dim() == 0
    assert np.float32(t.global_scale.item()).view(np.int32) == np.float32(s).view(np.int32)
    np.testing.assert_array_equal(t.block_scales.float().numpy().astype(np.float64), scales)
    np.testing.assert_array_equal(nvfp4.unpack_codes(t.data).numpy().astype(np.int64), codes)
    got = t.dequantize(torch.float32).numpy()
    np.testing.assert_array_equal(got.view(np.int32), deq.view(np.int32))  # bit-exact, signed zeros included
    return t


def _random_input(rng: np.random.Generator, shape, kind: str) -> np.ndarray:
    if kind == "normal":
        x = rng.standard_normal(shape)
    elif kind == "logmag":  # magnitudes over 12 decades, random signs
        x = rng.choice([-1.0, 1.0], shape) * 10.0 ** rng.uniform(-8, 4, shape)
    elif kind == "blocky":  # each 16-block its own scale, some blocks all zero, one big outlier
        x = rng.standard_normal(shape)
        x = x * 10.0 ** rng.uniform(-6, 3, (*shape[:-1], shape[-1] // 16, 1)).repeat(16, -1).reshape(shape)
        x.reshape(-1, 16)[:: 3] = 0.0
        x.reshape(-1)[rng.integers(x.size)] = 1e4
    elif kind == "grid":  # values on and between the E2M1 grid (many exact ties once scaled)
        x = rng.choice([-1.0, 1.0], shape) * rng.choice(np.arange(0, 6.25, 0.25), shape)
    else:
        raise AssertionError(kind)
    return x.astype(np.float32)


SHAPES = [(16,), (3, 32), (5, 3, 48), (1, 7, 1, 16), (2, 64)]
KINDS = ["normal", "logmag", "blocky", "grid"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_scalar_reference(shape, kind, dtype):
    rng = np.random.default_rng(zlib.crc32(repr((shape, kind)).encode()))
    x = torch.from_numpy(_random_input(rng, shape, kind)).to(dtype)
    t = assert_matches_scalar(x)
    assert t.shape == x.shape and t.orig_dtype == dtype
    assert t.data.shape == (*shape[:-1], shape[-1] // 2) and t.block_scales.shape == (*shape[:-1], shape[-1] // 16)


@pytest.mark.parametrize("s", [1.0, 0.01, 3.7e-3, 123.0])
def test_matches_scalar_reference_with_given_global_scale(s):
    rng = np.random.default_rng(7)
    x = torch.from_numpy(_random_input(rng, (4, 48), "blocky"))
    assert_matches_scalar(x, global_scale=s)


# ----------------------------------------------------------------------------------------------------------------
# E4M3 block scales
# ----------------------------------------------------------------------------------------------------------------

E4M3_POS = torch.arange(0, 127, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()  # 0x7f is NaN
E4M3_NORMAL = E4M3_POS[E4M3_POS >= 2.0**-6]  # codes 8..126, 2**-6 .. 448


def test_e4m3_table_sanity():
    assert E4M3_NORMAL.shape == (119,)
    assert float(E4M3_NORMAL[0]) == 2.0**-6 and float(E4M3_NORMAL[-1]) == 448.0
    for v in E4M3_NORMAL.tolist():
        assert e4m3_rne(v) == v


def test_torch_e4m3_cast_is_round_half_even():
    """The implementation relies on PyTorch's cast; check it against the E4M3 table at every midpoint."""
    lo, hi = E4M3_NORMAL[:-1], E4M3_NORMAL[1:]
    lo_codes = torch.arange(8, 8 + lo.numel())  # the byte code of lo; hi has code + 1
    mid = (lo + hi) / 2  # exact in float32
    even = torch.where(lo_codes % 2 == 0, lo, hi)
    assert torch.equal(mid.to(torch.float8_e4m3fn).float(), even)
    assert torch.equal(torch.nextafter(mid, hi).to(torch.float8_e4m3fn).float(), hi)
    assert torch.equal(torch.nextafter(mid, lo).to(torch.float8_e4m3fn).float(), lo)
    rng = np.random.default_rng(3)
    t = torch.from_numpy((2.0 ** rng.uniform(-6, math.log2(448), 20000)).astype(np.float32))
    expected = torch.tensor([e4m3_rne(v) for v in t.tolist()])
    assert torch.equal(t.to(torch.float8_e4m3fn).float(), expected)


def _blocks_with_amax(amaxes) -> torch.Tensor:
    """One 16-block per amax: the amax at position 0, smaller values after it."""
    a = torch.tensor(amaxes, dtype=torch.float32)[:, None]
    ramp = torch.linspace(1.0, -0.9, 16)[None, :]
    return (a * ramp).reshape(1, -1)


def test_block_scale_ties_and_neighbours():
    lo, hi = E4M3_NORMAL[:-1], E4M3_NORMAL[1:]
    mid = (lo + hi) / 2
    # global scale 1.0: t = amax_block / 6 exactly when 6 * mid is exact (mid has <= 5 significant bits)
    x = _blocks_with_amax((mid * 6).tolist())
    t = nvfp4.quantize(x, global_scale=1.0)
    lo_codes = torch.arange(8, 8 + lo.numel())
    assert torch.equal(t.block_scales.float()[0], torch.where(lo_codes % 2 == 0, lo, hi))
    # one ulp above / below every tie goes to the nearer neighbour
    up = _blocks_with_amax((torch.nextafter(mid, hi) * 6).tolist())
    assert torch.equal(nvfp4.quantize(up, global_scale=1.0).block_scales.float()[0], hi)
    dn = _blocks_with_amax((torch.nextafter(mid, lo) * 6).tolist())
    assert torch.equal(nvfp4.quantize(dn, global_scale=1.0).block_scales.float()[0], lo)
    assert_matches_scalar(x, global_scale=1.0)


@pytest.mark.parametrize("seed", range(3))
def test_block_scale_near_ties_with_arbitrary_global_scale(seed):
    """amax_block / 6 / s (two float32 divisions, in that order) lands within a few ulps of every E4M3 tie."""
    rng = np.random.default_rng(seed)
    s = float(np.float32(10.0 ** rng.uniform(-4, 2)))
    lo, hi = E4M3_NORMAL[:-1].double(), E4M3_NORMAL[1:].double()
    targets = torch.from_numpy(((lo + hi) / 2 * 6 * s).numpy().astype(np.float32))
    amaxes = torch.cat([targets, *(torch.nextafter(targets, targets * k) for k in (0.0, 2.0))])
    amaxes = torch.cat([amaxes, torch.nextafter(amaxes[-targets.numel():], amaxes[-targets.numel():] * 2)])
    amaxes = amaxes[(amaxes / 6 / s) <= 448]
    assert_matches_scalar(_blocks_with_amax(amaxes.tolist()), global_scale=s)


def test_block_scale_floor():
    # blocks whose amax/6/s < 2**-6 (including an all-zero block) get exactly 2**-6, never a subnormal
    x = torch.cat([torch.full((16,), 1000.0), torch.full((16,), 1e-3), torch.zeros(16), torch.full((16,), -2e-4)])
    t = assert_matches_scalar(x[None])
    b = t.block_scales.float()[0]
    assert b[0] == 448.0
    assert torch.all(b[1:] == 2.0**-6)
    codes = nvfp4.unpack_codes(t.data)[0]
    assert torch.all(codes[16:48] == 0) and torch.all(codes[48:] == 8)  # tiny negatives keep their sign bit
    # right at the floor: t == 2**-6 exactly, and just below it
    x2 = _blocks_with_amax([6 * 2.0**-6, float(np.nextafter(F32(6 * 2.0**-6), F32(0)))])
    assert torch.all(nvfp4.quantize(x2, global_scale=1.0).block_scales.float() == 2.0**-6)


def test_block_scale_cap_and_element_saturation():
    # a global scale far too small: t = 1000 -> capped at 448; elements then saturate at +-6 (codes 7 / 15)
    x = torch.tensor([[6.0, -6.0, 3.0, -0.0] + [0.5] * 12])
    t = assert_matches_scalar(x, global_scale=1e-3)
    assert float(t.block_scales.float()[0, 0]) == 448.0
    assert nvfp4.unpack_codes(t.data)[0, :4].tolist() == [7, 15, 7, 8]


@pytest.mark.parametrize("seed", range(5))
def test_default_scale_puts_amax_block_at_448(seed):
    torch.manual_seed(seed)
    x = torch.randn(3, 64) * 10.0 ** (seed - 2)
    t = nvfp4.quantize(x)
    flat_blocks = x.reshape(-1, 16).abs().amax(-1)
    assert float(t.block_scales.float().reshape(-1)[flat_blocks.argmax()]) == 448.0
    assert float(t.global_scale) == float(x.abs().amax() / 2688.0)


# ----------------------------------------------------------------------------------------------------------------
# Error bounds (hypothesis)
# ----------------------------------------------------------------------------------------------------------------


@st.composite
def nvfp4_inputs(draw):
    lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=3))
    K = 16 * draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    seed = draw(st.integers(0, 2**31 - 1))
    log_scale = draw(st.floats(-30, 30)) if dtype == torch.float32 else draw(st.floats(-3, 3))
    kind = draw(st.sampled_from(KINDS))
    x = _random_input(np.random.default_rng(seed), (*lead, K), kind) * np.float32(10.0**log_scale)
    if dtype == torch.float16:
        x = np.clip(x, -60000, 60000)
    return torch.from_numpy(x.astype(np.float32)).to(dtype)


def half_step(v: torch.Tensor) -> torch.Tensor:
    """Half the E2M1 step around |v| (in units of b*s): 0.25 below 2, 0.5 below 4, 1 above (covers the clamp)."""
    return torch.where(v < 2, 0.25, torch.where(v < 4, 0.5, 1.0)).double()


@settings(max_examples=80, deadline=None)
@given(nvfp4_inputs())
def test_nvfp4_error_bound(x):
    t = nvfp4.quantize(x)
    deq = t.dequantize()
    assert torch.isfinite(deq).all()
    xd = x.double()
    K = x.shape[-1]
    b = t.block_scales.double().repeat_interleave(16, dim=-1).reshape(x.shape)
    s = float(t.global_scale)
    assert torch.all((b >= 2.0**-6) & (b <= 448.0))
    amax = float(x.float().abs().max())
    if s == 1.0 and amax / 2688.0 != 1.0:
        # degenerate-scale rule (amax tiny): everything encodes to signed zero
        assert torch.all(deq == 0)
        return
    assert np.float32(s) == np.float32(amax) / np.float32(2688.0)
    v = xd.abs() / (b * s)
    bound = (half_step(v) + 2e-6) * b * s
    err = (xd - deq.double()).abs()
    assert torch.all(err <= bound), f"K={K} max excess {(err - bound).max()}"
    assert torch.all(deq.double() * xd >= 0)  # never flips the sign


@settings(max_examples=40, deadline=None)
@given(nvfp4_inputs())
def test_nvfp4_low_precision_inputs_quantize_like_float32(x):
    t = nvfp4.quantize(x)
    t32 = nvfp4.quantize(x.float())
    assert torch.equal(t.data, t32.data)
    assert torch.equal(t.block_scales.view(torch.uint8), t32.block_scales.view(torch.uint8))
    assert torch.equal(t.global_scale, t32.global_scale)
    assert t.orig_dtype == x.dtype
    assert t.dequantize(x.dtype).dtype == x.dtype
    assert torch.equal(t.dequantize(x.dtype), t.dequantize().to(x.dtype))


# ----------------------------------------------------------------------------------------------------------------
# Edge cases
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_all_zero_tensor(dtype):
    x = torch.zeros(3, 2, 32, dtype=dtype)
    t = nvfp4.quantize(x)
    assert float(t.global_scale) == 1.0
    assert torch.all(t.data == 0)
    assert torch.all(t.block_scales.float() == 2.0**-6)
    deq = t.dequantize(dtype)
    assert deq.dtype == dtype and torch.equal(deq, x) and not deq.signbit().any()
    assert float(nvfp4.global_scale_of(x)) == 1.0


def test_negative_zero_keeps_sign_bit():
    x = torch.full((1, 16), -0.0)
    t = nvfp4.quantize(x)
    assert torch.all(nvfp4.unpack_codes(t.data) == 8)
    assert torch.all(t.dequantize().signbit())


@pytest.mark.parametrize("amax", [1e-45, 1e-40, 1e-38, 1e-36, 1e-34, 4e-34, 6e-34, 1e-33, 1e-30, 1e-20])
def test_tiny_amax_never_nan_or_inf(amax):
    rng = np.random.default_rng(11)
    x = torch.from_numpy((rng.uniform(-1, 1, (2, 32)) * amax).astype(np.float32))
    x[0, 3] = float(np.float32(amax))
    t = assert_matches_scalar(x)
    deq = t.dequantize()
    assert torch.isfinite(deq).all() and torch.isfinite(t.block_scales.float()).all()
    s32 = np.float32(float(x.abs().max())) / np.float32(2688.0)
    with np.errstate(all="ignore"):
        degenerate = s32 == 0 or not np.isfinite(np.float32(np.float32(1.0) / s32) / np.float32(2.0**-6))
    if degenerate:  # rule: s = 1.0 and every element encodes to signed zero
        assert float(t.global_scale) == 1.0 and torch.all(deq == 0)
    else:
        assert float(t.global_scale) == float(s32)
        rel = float((deq.double() - x.double()).norm() / x.double().norm())
        assert rel < 0.2, rel


def test_degenerate_rule_threshold():
    """The rule flips exactly where (1/s)/2**-6 stops being finite; both sides are finite and sensible."""
    # 1/s * 64 overflows when s < 64 / FLT_MAX; find the smallest float32 amax with a usable scale
    def usable(bits: int) -> bool:
        a = np.int32(bits).view(np.float32)
        with np.errstate(all="ignore"):
            return bool(np.isfinite(np.float32(np.float32(1.0) / (a / np.float32(2688.0))) / np.float32(2.0**-6)))

    lo, hi = int(np.float32(1e-35).view(np.int32)), int(np.float32(1e-32).view(np.int32))
    assert not usable(lo) and usable(hi)
    while hi - lo > 1:  # bisect on the bit pattern: lo unusable, hi usable, adjacent float32 at the end
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if usable(mid) else (mid, hi)
    for bits, ok in ((lo, False), (hi, True)):
        amax = float(np.int32(bits).view(np.float32))
        x = torch.full((1, 16), amax)
        t = nvfp4.quantize(x)
        assert (float(t.global_scale) != 1.0) == ok
        deq = t.dequantize()
        assert torch.isfinite(deq).all()
        if ok:  # the amax element: code 7 (6.0) at b = 448
            assert torch.all(nvfp4.unpack_codes(t.data) == 7)
            assert torch.allclose(deq.double(), x.double(), rtol=1e-6, atol=0)
        else:
            assert torch.all(deq == 0)
        assert 4e-34 < amax < 6e-34


@pytest.mark.parametrize("outlier", [1e30, -1e30, FLT_MAX, -FLT_MAX])
def test_single_huge_outlier(outlier):
    torch.manual_seed(5)
    x = torch.randn(5, 64)
    x[2, 17] = outlier
    t = assert_matches_scalar(x)
    deq = t.dequantize()
    assert torch.isfinite(deq).all()
    assert nvfp4.unpack_codes(t.data)[2, 17] == (15 if outlier < 0 else 7)
    assert float(t.block_scales.float()[2, 1]) == 448.0
    assert abs(float(deq[2, 17]) - outlier) <= 1e-6 * abs(outlier)
    # every other block underflows to the floor scale and encodes to signed zero
    others = torch.ones(5, 4, dtype=torch.bool)
    others[2, 1] = False
    assert torch.all(t.block_scales.float()[others] == 2.0**-6)


def test_max_float16_and_bfloat16_values():
    for dtype in (torch.float16, torch.bfloat16):
        info = torch.finfo(dtype)
        x = torch.tensor([[info.max, -info.max, info.tiny, 1.0] * 4], dtype=dtype)
        t = assert_matches_scalar(x)
        assert torch.isfinite(t.dequantize(dtype)).all()


def test_empty_leading_dim():
    x = torch.zeros(0, 32)
    t = nvfp4.quantize(x)
    assert t.data.shape == (0, 16) and t.block_scales.shape == (0, 2) and float(t.global_scale) == 1.0
    assert t.dequantize().shape == (0, 32)


def test_nbytes():
    t = nvfp4.quantize(torch.randn(3, 5, 64))
    assert t.nbytes == 3 * 5 * 32 + 3 * 5 * 4 + 4


def test_quantize_does_not_modify_input_and_works_on_non_contiguous():
    x = torch.randn(32, 48)
    xc = x.clone()
    xt = x.t()  # [48, 32], non-contiguous
    t = nvfp4.quantize(xt)
    assert torch.equal(x, xc)
    t2 = nvfp4.quantize(xt.contiguous())
    assert torch.equal(t.data, t2.data) and torch.equal(t.block_scales.view(torch.uint8), t2.block_scales.view(torch.uint8))


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [15, 17, 100, 8, 1])
def test_k_not_multiple_of_16(K):
    with pytest.raises(ValueError, match=rf"K={K}\b.*16|16.*K={K}\b"):
        nvfp4.quantize(torch.randn(2, K))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_non_finite_input(bad, dtype):
    x = torch.randn(2, 32).to(dtype)
    x[1, 5] = bad
    with pytest.raises(NonFiniteError, match="NVFP4 input"):
        nvfp4.quantize(x)
    with pytest.raises(NonFiniteError):
        nvfp4.global_scale_of(x)


@pytest.mark.parametrize("s", [0.0, -1.0, float("nan"), float("inf"), 1e-38])
def test_bad_global_scale(s):
    with pytest.raises(ValueError, match="global_scale"):
        nvfp4.quantize(torch.randn(2, 16), global_scale=s)


def test_bad_input_types():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        nvfp4.quantize(torch.ones(2, 16, dtype=torch.int32))
    with pytest.raises(TypeError):
        nvfp4.quantize(torch.ones(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="0-d"):
        nvfp4.quantize(torch.tensor(1.0))


def test_nvfp4tensor_validates_parts():
    t = nvfp4.quantize(torch.randn(2, 32))
    with pytest.raises(ValueError, match="data"):
        nvfp4.NVFP4Tensor(t.data[:, :8], t.block_scales, t.global_scale, t.shape, t.orig_dtype)
    with pytest.raises(ValueError, match="block_scales"):
        nvfp4.NVFP4Tensor(t.data, t.block_scales.float(), t.global_scale, t.shape, t.orig_dtype)
    with pytest.raises(ValueError, match="global_scale"):
        nvfp4.NVFP4Tensor(t.data, t.block_scales, t.global_scale.reshape(1), t.shape, t.orig_dtype)
    with pytest.raises(ValueError, match="16"):
        nvfp4.NVFP4Tensor(t.data, t.block_scales, t.global_scale, torch.Size([2, 31]), t.orig_dtype)


def test_check_false_skips_only_the_finiteness_scan():
    x = torch.randn(3, 32)
    a, b = nvfp4.quantize(x), nvfp4.quantize(x, check=False)
    assert torch.equal(a.data, b.data) and torch.equal(a.global_scale, b.global_scale)
    assert torch.equal(a.block_scales.view(torch.uint8), b.block_scales.view(torch.uint8))
    x[0, 0] = float("nan")
    nvfp4.quantize(x, check=False)  # no error: the caller promised to have checked
    with pytest.raises(ValueError, match="K=20"):
        nvfp4.quantize(torch.randn(2, 20), check=False)  # shape checks stay


def test_global_scale_from_amax_is_elementwise_rule():
    amax = torch.tensor([0.0, 1e-36, 5e-34, 1.0, 2688.0, FLT_MAX])
    s = nvfp4.global_scale_from_amax(amax)
    for a, got in zip(amax.tolist(), s.tolist()):
        assert got == float(nvfp4.global_scale_of(torch.tensor([a])))
    assert s[0] == 1.0 and s[1] == 1.0 and s[4] == 1.0 and s[3] == float(np.float32(1.0) / np.float32(2688.0))


@pytest.mark.gpu
def test_cuda_reference_equals_cpu_reference():
    """Kernel tests may build the reference on the GPU: it must give the same bits as on the CPU."""
    from sixbit_tune.formats import int8

    rng = np.random.default_rng(21)
    for kind in KINDS:
        x = torch.from_numpy(_random_input(rng, (33, 96), kind))
        for dtype in (torch.float32, torch.bfloat16):
            xc = x.to(dtype)
            a, b = nvfp4.quantize(xc), nvfp4.quantize(xc.cuda())
            assert torch.equal(a.data, b.data.cpu())
            assert torch.equal(a.block_scales.view(torch.uint8), b.block_scales.cpu().view(torch.uint8))
            assert torch.equal(a.global_scale, b.global_scale.cpu())
            assert torch.equal(a.dequantize(), b.dequantize().cpu())
            (q, s), (qg, sg) = int8.quantize(xc), int8.quantize(xc.cuda())
            assert torch.equal(q, qg.cpu()) and torch.equal(s, sg.cpu())


@pytest.mark.parametrize("shape", [(1, 16), (7, 48), (3, 5, 32)])
def test_block_values_equal_dequantize_before_the_global_scale(shape):
    x = torch.randn(shape) * 3
    v, s = nvfp4.block_values(x)
    t = nvfp4.quantize(x)
    assert torch.equal(s, t.global_scale)
    assert torch.equal(v * s, nvfp4.dequantize(t))
