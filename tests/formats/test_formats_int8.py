"""INT8 reference: scalar re-implementation, ties, division semantics, error bounds (hypothesis), edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sixbit_tune.errors import NonFiniteError
from sixbit_tune.formats import int8

F32 = np.float32


def scalar_int8_rows(x: np.ndarray):
    """Per row of a 2-D float32 array: (q list, scale) with Python round() (half to even) of the float32 quotient."""
    qs, scales = [], []
    for row in np.asarray(x, dtype=np.float32):
        amax = F32(0.0)
        for v in row:
            amax = max(amax, abs(v))
        scale = F32(amax) / F32(127.0)
        if scale == 0:
            q = [0] * len(row)
        else:
            q = [max(-127, min(127, round(float(F32(v) / scale)))) for v in row]
        qs.append(q)
        scales.append(scale)
    return np.array(qs, dtype=np.int64).reshape(x.shape), np.array(scales, dtype=np.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (3, 5, 20), (2, 1, 3, 64)], ids=str)
def test_matches_scalar_reference(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[-1])).to(dtype)
    x.view(-1, shape[-1])[0] = 0.0  # a zero row
    q, s = int8.quantize(x)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == x.shape[:-1]
    rq, rs = scalar_int8_rows(x.float().numpy().reshape(-1, shape[-1]))
    np.testing.assert_array_equal(q.numpy().reshape(-1, shape[-1]).astype(np.int64), rq)
    np.testing.assert_array_equal(s.numpy().reshape(-1).view(np.int32), rs.view(np.int32))
    deq = int8.dequantize(q, s, dtype=dtype)
    assert deq.dtype == dtype
    assert torch.equal(deq, (q.float() * s.unsqueeze(-1)).to(dtype))


def test_round_half_to_even_and_clamp():
    # amax 127 -> scale 1.0 exactly: quotients are the values themselves
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.0, 3.49]])
    q, s = int8.quantize(x)
    assert float(s[0]) == 1.0
    assert q[0].tolist() == [127, 0, 2, 2, 0, -2, -2, 126, -127, 3]


def test_uses_ieee_division_not_reciprocal_multiplication():
    # scale = 889 / 127 = 7 exactly; 45.5 / 7 = 6.5 is a tie -> 6, whereas 45.5 * float32(1/7) = 6.5000005 -> 7
    x = torch.tensor([[889.0, 45.5, -45.5, 87.5]])
    q, s = int8.quantize(x)
    assert float(s[0]) == 7.0
    assert float(torch.tensor(45.5) * (1.0 / s[0])) != 6.5  # the trap is real
    assert q[0].tolist() == [127, 6, -6, 12]


def test_zero_rows_give_zero_scale_and_exact_zeros():
    x = torch.zeros(4, 16)
    x[1] = torch.randn(16)
    q, s = int8.quantize(x)
    assert s[0] == 0 and s[2] == 0 and s[3] == 0 and s[1] > 0
    assert torch.all(q[[0, 2, 3]] == 0)
    deq = int8.dequantize(q, s)
    assert torch.isfinite(deq).all() and torch.all(deq[[0, 2, 3]] == 0)


def test_scale_underflow_row_is_zero_not_nan():
    x = torch.tensor([[1e-44, -1e-44, 0.0], [1e-40, 5e-41, -1e-40]])
    q, s = int8.quantize(x)
    deq = int8.dequantize(q, s)
    assert float(s[0]) == 0.0 and torch.all(q[0] == 0)  # 1e-44 / 127 underflows to 0
    assert torch.isfinite(deq).all()
    assert (deq - x).abs().max() <= 1e-40


def test_per_output_channel_axis():
    w = torch.randn(6, 40)
    q, s = int8.quantize(w, axis=-1)
    assert s.shape == (6,)
    assert torch.equal(s, w.abs().amax(-1) / 127)
    q0, s0 = int8.quantize(w.t(), axis=0)  # the same reduction expressed on the transpose
    assert torch.equal(q0.t(), q) and torch.equal(s0, s)
    assert torch.equal(int8.dequantize(q0, s0, axis=0).t(), int8.dequantize(q, s, axis=-1))


@st.composite
def int8_inputs(draw):
    lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=3))
    K = draw(st.integers(1, 70))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    seed = draw(st.integers(0, 2**31 - 1))
    log_scale = draw(st.floats(-30, 30)) if dtype == torch.float32 else draw(st.floats(-3, 3))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, K)) * 10.0 ** rng.uniform(-2, 2, (*lead, 1)) * 10.0**log_scale
    if draw(st.booleans()):
        x[..., rng.integers(K)] *= 1000.0  # an outlier per row
    if dtype == torch.float16:
        x = np.clip(x, -60000, 60000)
    return torch.from_numpy(x.astype(np.float32)).to(dtype)


@settings(max_examples=80, deadline=None)
@given(int8_inputs())
def test_int8_error_bound(x):
    q, s = int8.quantize(x)
    deq = int8.dequantize(q, s)
    assert torch.isfinite(deq).all()
    assert int(q.abs().max()) <= 127
    err = (x.double() - deq.double()).abs()
    bound = s.double().unsqueeze(-1) * (0.5 + 1e-4)
    assert torch.all(err <= bound), float((err - bound).max())
    # the amax element of every non-zero row maps to +-127
    nz = s > 0
    assert torch.all(q.abs().amax(-1)[nz] == 127)
    assert torch.equal(s, x.float().abs().amax(-1) / 127)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input(bad):
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    x[2, 1] = bad
    with pytest.raises(NonFiniteError, match="INT8 input"):
        int8.quantize(x)


def test_bad_arguments():
    with pytest.raises(ValueError, match="axis"):
        int8.quantize(torch.randn(3, 4), axis=2)
    with pytest.raises(TypeError):
        int8.quantize(torch.ones(3, 4, dtype=torch.int64))
    q, s = int8.quantize(torch.randn(3, 4))
    with pytest.raises(ValueError, match="scales shape"):
        int8.dequantize(q, s[:2])
    with pytest.raises(TypeError, match="int8"):
        int8.dequantize(q.to(torch.int32), s)


def test_check_false_skips_only_the_finiteness_scan():
    x = torch.randn(3, 8)
    q, s = int8.quantize(x)
    q2, s2 = int8.quantize(x, check=False)
    assert torch.equal(q, q2) and torch.equal(s, s2)
    x[1, 1] = float("inf")
    int8.quantize(x, check=False)
    with pytest.raises(ValueError, match="axis"):
        int8.quantize(x, axis=5, check=False)
