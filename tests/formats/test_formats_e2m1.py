"""E2M1 encoding/decoding and nibble packing, checked against hand tables and an independent brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sixbit_tune.formats import nvfp4

MAGS = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def brute_force_codes(v: np.ndarray) -> np.ndarray:
    """Nearest E2M1 magnitude by exhaustive distance (float64, exact for float32 inputs near the grid); a tie goes
    to the even code index (mantissa bit 0); sign bit copied from the input's sign bit; magnitudes above 6 are
    clamped to 6 first, as the spec says."""
    v = np.asarray(v, dtype=np.float32)
    a = np.minimum(np.abs(v.astype(np.float64)), 6.0)
    dist = np.abs(a[:, None] - MAGS[None, :])
    is_min = dist == dist.min(axis=1, keepdims=True)
    even = (np.arange(8) % 2 == 0)[None, :]
    idx = np.argmax(is_min * 2 + even, axis=1)  # a minimum with even index wins over a minimum with odd index
    return (idx | (np.signbit(v).astype(np.int64) << 3)).astype(np.uint8)


def encode(values) -> np.ndarray:
    return nvfp4.encode_e2m1(torch.tensor(np.asarray(values, dtype=np.float32))).numpy()


# value -> expected code; every representable value, every tie, both signs, signed zero, saturation.
TABLE = [
    (0.0, 0), (0.5, 1), (1.0, 2), (1.5, 3), (2.0, 4), (3.0, 5), (4.0, 6), (6.0, 7),
    (-0.0, 8), (-0.5, 9), (-1.0, 10), (-1.5, 11), (-2.0, 12), (-3.0, 13), (-4.0, 14), (-6.0, 15),
    # ties: to the code whose mantissa bit is 0
    (0.25, 0), (0.75, 2), (1.25, 2), (1.75, 4), (2.5, 4), (3.5, 6), (5.0, 6),
    (-0.25, 8), (-0.75, 10), (-1.25, 10), (-1.75, 12), (-2.5, 12), (-3.5, 14), (-5.0, 14),
    # negatives that round to zero keep the sign bit
    (-0.1, 8), (-1e-30, 8), (-1e-45, 8), (1e-45, 0), (0.2, 0),
    # beyond +-6 saturates (encode_e2m1 saturates; quantize clamps before encoding anyway)
    (6.0001, 7), (7.0, 7), (100.0, 7), (1e30, 7), (-6.0001, 15), (-7.0, 15), (-1e30, 15),
]


@pytest.mark.parametrize("value,code", TABLE, ids=[f"{v!r}->{c}" for v, c in TABLE])
def test_encode_table(value, code):
    assert int(encode([value])[0]) == code
    assert int(brute_force_codes(np.array([value]))[0]) == code  # the brute force agrees with the hand table


def _neighbours(points: np.ndarray, steps: int = 3) -> np.ndarray:
    """float32 values within ``steps`` ulps of each point (both directions), the points included."""
    out = [points.astype(np.float32)]
    up = down = points.astype(np.float32)
    for _ in range(steps):
        up = np.nextafter(up, np.float32(np.inf))
        down = np.nextafter(down, np.float32(-np.inf))
        out += [up, down]
    return np.concatenate(out)


def test_encode_around_every_value_and_midpoint():
    mids = (MAGS[1:] + MAGS[:-1]) / 2
    pts = np.concatenate([MAGS, mids, [6.0]])
    pts = np.concatenate([pts, -pts])
    v = _neighbours(pts, steps=4)
    np.testing.assert_array_equal(encode(v), brute_force_codes(v))


def test_encode_every_bfloat16_value():
    # all 65536 bf16 bit patterns (finite ones), which contain every midpoint and both zeros exactly
    v = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    v = v[torch.isfinite(v)].numpy()
    np.testing.assert_array_equal(encode(v), brute_force_codes(v))


def test_encode_random_float32():
    rng = np.random.default_rng(1)
    v = np.concatenate(
        [
            rng.uniform(-6.5, 6.5, 200_000),
            rng.choice([-1.0, 1.0], 20_000) * 10.0 ** rng.uniform(-40, 1, 20_000),
        ]
    ).astype(np.float32)
    np.testing.assert_array_equal(encode(v), brute_force_codes(v))


def test_encode_rejects_non_float32():
    with pytest.raises(TypeError, match="float32"):
        nvfp4.encode_e2m1(torch.zeros(4, dtype=torch.float64))


def test_decode_matches_bit_layout():
    # independent formula: bit 3 sign, bits 2-1 exponent (bias 1), bit 0 mantissa; exponent 0 is subnormal
    for code in range(16):
        sign = -1.0 if code & 8 else 1.0
        e, m = (code >> 1) & 3, code & 1
        mag = m * 0.5 if e == 0 else 2.0 ** (e - 1) * (1 + m / 2)
        got = float(nvfp4.decode_e2m1(torch.tensor([code], dtype=torch.uint8))[0])
        assert got == sign * mag and math.copysign(1.0, got) == sign, code
        assert float(nvfp4.E2M1_VALUES[code]) == got
    assert nvfp4.E2M1_VALUES.dtype == torch.float32 and nvfp4.E2M1_VALUES.shape == (16,)


def test_decode_encode_round_trip():
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(nvfp4.encode_e2m1(nvfp4.decode_e2m1(codes)), codes)


def test_decode_rejects_float():
    with pytest.raises(TypeError):
        nvfp4.decode_e2m1(torch.zeros(3))


def test_pack_layout_even_element_low_nibble():
    codes = torch.tensor([[1, 2, 3, 4, 15, 0, 8, 7]], dtype=torch.uint8)
    data = nvfp4.pack_codes(codes)
    assert data.dtype == torch.uint8
    assert data.tolist() == [[0x21, 0x43, 0x0F, 0x78]]
    assert torch.equal(nvfp4.unpack_codes(data), codes)


@pytest.mark.parametrize("shape", [(16,), (3, 32), (2, 5, 48), (1, 1, 1, 2)], ids=str)
def test_pack_unpack_round_trip(shape):
    codes = torch.randint(0, 16, shape, dtype=torch.uint8)
    data = nvfp4.pack_codes(codes)
    assert data.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(nvfp4.unpack_codes(data), codes)
    # every byte value survives unpack -> pack
    all_bytes = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(2, 128)
    assert torch.equal(nvfp4.pack_codes(nvfp4.unpack_codes(all_bytes)), all_bytes)


def test_pack_rejects_odd_last_dim():
    with pytest.raises(ValueError, match="even"):
        nvfp4.pack_codes(torch.zeros(3, 5, dtype=torch.uint8))


def test_unpack_rejects_non_uint8():
    with pytest.raises(TypeError, match="uint8"):
        nvfp4.unpack_codes(torch.zeros(3, 4, dtype=torch.int8))
