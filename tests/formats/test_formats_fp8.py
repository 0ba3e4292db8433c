"""FP8 E4M3 reference: every code's value, an independent table encoder, ties, saturation, the reciprocal rule,
zero and tiny rows, error bounds (hypothesis), odd shapes, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sixbit_tune import formats
from sixbit_tune.errors import NonFiniteError
from sixbit_tune.formats import fp8

F32 = np.float32


def e4m3_value(byte: int) -> float:
    """Value of an E4M3 (fn) byte from its bit fields: sign, 4 exponent bits (bias 7), 3 mantissa bits."""
    sign = -1.0 if byte & 0x80 else 1.0
    e, m = (byte >> 3) & 15, byte & 7
    if e == 15 and m == 7:
        return math.nan
    if e == 0:
        return sign * m * 2.0**-9
    return sign * (1 + m / 8) * 2.0 ** (e - 7)


FINITE = [(b, e4m3_value(b)) for b in range(128) if not math.isnan(e4m3_value(b))]  # non-negative codes


def table_encode(v: float) -> int:
    """Nearest E4M3 byte of a float32 value in [-448, 448] by search over the code table; ties to the even
    mantissa (lowest code bit 0); the sign bit is the sign bit of ``v``."""
    a = abs(v)
    best = min(FINITE, key=lambda bv: (abs(bv[1] - a), bv[0] & 1))
    return best[0] | (0x80 if math.copysign(1.0, v) < 0 else 0)


def scalar_fp8_rows(x: np.ndarray):
    """Per row of a 2-D float32 array: (code bytes, scale) with numpy float32 arithmetic and the table encoder."""
    codes, scales = [], []
    for row in np.asarray(x, dtype=np.float32):
        amax = F32(0.0)
        for v in row:
            amax = max(amax, F32(abs(v)))
        scale = F32(amax) / F32(448.0)
        with np.errstate(divide="ignore", over="ignore"):
            r = F32(1.0) / scale
        if scale == 0 or not np.isfinite(r):
            codes.append([0] * len(row))
            scales.append(F32(0.0))
            continue
        codes.append([table_encode(float(min(max(F32(v) * r, F32(-448.0)), F32(448.0)))) for v in row])
        scales.append(scale)
    return np.array(codes, dtype=np.uint8).reshape(x.shape), np.array(scales, dtype=np.float32)


def bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


def test_every_code_decodes_to_its_bit_fields():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    vals = codes.view(torch.float8_e4m3fn).float().tolist()
    for b, got in enumerate(vals):
        want = e4m3_value(b)
        if math.isnan(want):
            assert math.isnan(got), b
        else:
            assert got == want and math.copysign(1.0, got) == math.copysign(1.0, want), (b, got, want)
    assert max(v for _, v in FINITE) == fp8.E4M3_MAX
    assert sum(math.isnan(v) for v in vals) == 2  # 0x7F and 0xFF only


def test_torch_cast_is_the_table_encoder():
    # The format is defined through PyTorch's cast; check that cast is nearest-even against the independent table.
    g = torch.Generator().manual_seed(5)
    v = torch.cat([
        (torch.rand(3000, generator=g) * 2 - 1) * 448,
        torch.randn(3000, generator=g) * 2.0 ** torch.randint(-12, 4, (3000,), generator=g),
        torch.tensor([0.0, -0.0, 448.0, -448.0, 2.0**-9, 2.0**-10, -(2.0**-10), 3 * 2.0**-10]),
    ])
    got = bits(v.to(torch.float8_e4m3fn)).tolist()
    want = [table_encode(float(t)) for t in v.tolist()]
    assert got == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (3, 5, 20), (2, 1, 3, 64), (4, 0)], ids=str)
def test_matches_scalar_reference(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape) + 11)
    x = (torch.randn(shape, generator=g) * torch.logspace(-3, 3, max(shape[-1], 1))[: shape[-1]]).to(dtype)
    if x.numel():
        x.view(-1, shape[-1])[0] = 0.0  # a zero row
    q, s = fp8.quantize(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == x.shape[:-1]
    rows = (math.prod(shape[:-1]), shape[-1])
    rq, rs = scalar_fp8_rows(x.float().numpy().reshape(rows))
    np.testing.assert_array_equal(bits(q).numpy().reshape(rows), rq)
    np.testing.assert_array_equal(s.numpy().reshape(-1).view(np.int32), rs.view(np.int32))
    deq = fp8.dequantize(q, s, dtype=dtype)
    assert deq.dtype == dtype
    assert torch.equal(deq, (q.float() * s.unsqueeze(-1)).to(dtype))


def test_ties_to_even_at_midpoints():
    # amax 448 -> scale 1 and r 1 exactly: the codes are the rounded values themselves
    mids = [1.0625, 1.1875, 1.9375, 3 * 2.0**-10, 2.0**-10, 5 * 2.0**-10, 12.5, 13.5, 15.5, 248.0, 432.0]
    want = [1.0, 1.25, 2.0, 2.0**-8, 0.0, 2.0**-8, 12.0, 14.0, 16.0, 256.0, 448.0]
    x = torch.tensor([[448.0, *mids, *[-m for m in mids]]])
    q, s = fp8.quantize(x)
    assert float(s[0]) == 1.0
    got = q.float()[0].tolist()
    assert got == [448.0, *want, *[-w for w in want]]
    assert bits(q)[0, 1 + len(mids) + 4].item() == 0x80  # -2**-10 rounds to -0: the sign bit stays


def test_saturates_at_448():
    # x * (1 / scale) can land just above 448; the clamp keeps it at the largest finite code (0x7E), never NaN
    g = torch.Generator().manual_seed(7)
    x = torch.rand(2000, 9, generator=g) * 10.0 ** torch.randint(-6, 6, (2000, 1), generator=g)
    q, s = fp8.quantize(x)
    amax = x.abs().amax(-1)
    over = (amax * (torch.ones_like(s) / s)) > 448.0
    assert bool(over.any())  # the case is real in this sample
    assert not bool(torch.isnan(q.float()).any())
    assert int(bits(q).max()) <= 0x7E
    assert torch.all(q.float().abs().amax(-1) == 448.0)
    assert torch.equal(fp8.encode(torch.tensor([1e9, -500.0, 464.0]), torch.tensor(1.0)).float(),
                       torch.tensor([448.0, -448.0, 448.0]))


def test_multiplies_by_the_reciprocal_not_divides():
    # e4m3(x * (1/s)) and e4m3(x / s) differ for some inputs; the format is the first.
    # values at float32 distance from E4M3 midpoints (times the row scale), where the two roundings part
    g = torch.Generator().manual_seed(9)
    vals = torch.tensor([v for _, v in FINITE])
    mids = (vals[1:] + vals[:-1]) / 2
    amax = torch.rand(4000, generator=g) + 1.0
    pick = mids[torch.randint(0, len(mids), (4000, 15), generator=g)]
    x = torch.cat([amax[:, None], (pick.double() * (amax.double() / 448)[:, None]).float()], 1)
    q, s = fp8.quantize(x)
    r = torch.ones_like(s) / s
    by_mul = (x * r[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    by_div = (x / s[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    differ = bits(by_mul) != bits(by_div)
    assert bool(differ.any())
    assert torch.equal(bits(q), bits(by_mul))


def test_zero_and_tiny_rows():
    x = torch.zeros(5, 16)
    x[1] = torch.randn(16)
    x[3] = torch.randn(16) * 1e-37  # 1 / (amax / 448) overflows float32: scale 0, zeros
    x[4] = torch.randn(16) * 1e-34  # small but representable: real codes
    x[2, 3] = -0.0
    q, s = fp8.quantize(x)
    assert s[0] == 0 and s[2] == 0 and s[3] == 0 and s[1] > 0 and s[4] > 0
    assert torch.all(bits(q[[0, 2, 3]]) == 0)  # +0 codes, the sign of -0.0 inputs is not kept
    deq = fp8.dequantize(q, s)
    assert torch.isfinite(deq).all() and torch.all(deq[[0, 2, 3]] == 0)
    assert float(q[4].float().abs().max()) == 448.0
    assert float((deq[3] - x[3]).abs().max()) <= float(x[3].abs().max())


def test_per_output_channel_axis():
    w = torch.randn(6, 40)
    q, s = fp8.quantize(w, axis=-1)
    assert s.shape == (6,)
    assert torch.equal(s, w.abs().amax(-1) / 448)
    q0, s0 = fp8.quantize(w.t(), axis=0)
    assert torch.equal(bits(q0.t()), bits(q)) and torch.equal(s0, s)
    assert torch.equal(fp8.dequantize(q0, s0, axis=0).t(), fp8.dequantize(q, s, axis=-1))


@st.composite
def fp8_inputs(draw):
    lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=3))
    K = draw(st.integers(1, 70))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    seed = draw(st.integers(0, 2**31 - 1))
    log_scale = draw(st.floats(-30, 30)) if dtype == torch.float32 else draw(st.floats(-3, 3))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, K)) * 10.0 ** rng.uniform(-2, 2, (*lead, 1)) * 10.0**log_scale
    if draw(st.booleans()):
        x[..., rng.integers(K)] *= 1000.0
    if dtype == torch.float16:
        x = np.clip(x, -60000, 60000)
    return torch.from_numpy(x.astype(np.float32)).to(dtype)


@settings(max_examples=80, deadline=None)
@given(fp8_inputs())
def test_fp8_error_bound(x):
    q, s = fp8.quantize(x)
    deq = fp8.dequantize(q, s)
    assert torch.isfinite(deq).all()
    err = (x.double() - deq.double()).abs()
    # half an E4M3 step: 2**-4 relative for normal codes, 2**-10 * scale in the subnormal range, plus the float32
    # roundings of r, x * r and the dequantization
    sd = s.double().unsqueeze(-1)
    bound = (x.double().abs() * 2.0**-4 + sd * 2.0**-10) * (1 + 1e-5)
    assert torch.all(err <= bound), float((err - bound).max())
    nz = s > 0
    assert torch.all(q.float().abs().amax(-1)[nz] == 448.0)
    assert torch.equal(s, x.float().abs().amax(-1) / 448)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input(bad):
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    x[2, 1] = bad
    with pytest.raises(NonFiniteError, match="FP8 input"):
        fp8.quantize(x)


def test_bad_arguments():
    with pytest.raises(ValueError, match="axis"):
        fp8.quantize(torch.randn(3, 4), axis=2)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        fp8.quantize(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least one dimension"):
        fp8.quantize(torch.tensor(1.0))
    q, s = fp8.quantize(torch.randn(3, 4))
    with pytest.raises(ValueError, match="scales shape"):
        fp8.dequantize(q, s[:2])
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        fp8.dequantize(q.view(torch.uint8), s)


def test_check_false_skips_only_the_finiteness_scan():
    x = torch.randn(3, 8)
    q, s = fp8.quantize(x)
    q2, s2 = fp8.quantize(x, check=False)
    assert torch.equal(bits(q), bits(q2)) and torch.equal(s, s2)
    x[1, 1] = float("inf")
    fp8.quantize(x, check=False)
    with pytest.raises(ValueError, match="axis"):
        fp8.quantize(x, axis=5, check=False)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("xshape", [(5, 64), (2, 3, 40), (1, 1, 1, 33)], ids=str)
def test_fp8_linear_matches_numpy(xshape, with_bias):
    g = torch.Generator().manual_seed(13)
    K = xshape[-1]
    x = torch.randn(xshape, generator=g) * 3
    w = torch.randn(24, K, generator=g) * 0.05
    b = torch.randn(24, generator=g) if with_bias else None
    y = formats.quantized_linear_reference(x, w, b, "fp8")
    assert y.dtype == torch.float32 and y.shape == (*xshape[:-1], 24)
    qx, sx = scalar_fp8_rows(x.numpy().reshape(-1, K))
    qw, sw = scalar_fp8_rows(w.numpy())
    table = np.array([e4m3_value(i) for i in range(256)])
    acc = table[qx.astype(np.int64)] @ table[qw.astype(np.int64)].T  # float64, exact at these sizes
    y32 = acc.astype(np.float32) * (sx[:, None] * sw[None, :])
    if b is not None:
        y32 = y32 + b.numpy()
    np.testing.assert_array_equal(y.numpy().reshape(-1, 24), y32)
    exact = x.double() @ w.double().t() + (b.double() if b is not None else 0)
    assert float(formats.relative_l2(y, exact)) < 0.1


def test_fp8_linear_accumulation_is_exact():
    """Partial sums that a float32 accumulator would round: the reference keeps them exact."""
    K = 4096
    x = torch.full((1, K), 448.0)
    x[0, 1::2] = 2.0**-9  # scale 1: codes 448 and 2**-9 (the smallest subnormal)
    w = torch.full((1, K), 448.0)
    y = formats.quantized_linear_reference(x, w, None, "fp8")
    products = np.where(np.arange(K) % 2 == 0, 448.0 * 448.0, 2.0**-9 * 448.0)
    exact = float(np.float32(products.sum()))  # float64 sum of these values is exact
    assert float(np.cumsum(products.astype(np.float32), dtype=np.float32)[-1]) != exact  # float32 would round
    assert float(y[0, 0]) == exact
