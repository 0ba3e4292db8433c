"""The profiler's sync-free quantizers and per-layer errors against sixbit_tune.formats (the specification)."""

from __future__ import annotations

import pytest
import torch

from sixbit_tune import formats
from sixbit_tune.profiling.quant import int8_codes, linear_errors, nvfp4_values, quantize_weight


def _awkward(shape, dtype=torch.float32):
    x = torch.randn(*shape) * torch.logspace(-3, 2, shape[-1])
    x[..., 5] = 0.0
    if x.dim() > 1:
        x[0] = 0.0  # an all-zero row
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nvfp4_values_bit_exact(dtype):
    x = _awkward((3, 5, 64), dtype)
    v, s = nvfp4_values(x)
    assert torch.equal(v * s, formats.fake_quant(x.float(), "nvfp4"))
    t = formats.nvfp4.quantize(x)
    assert torch.equal(s, t.global_scale)


def test_nvfp4_values_all_zero():
    v, s = nvfp4_values(torch.zeros(2, 32))
    assert torch.equal(v, torch.zeros(2, 32)) and s.item() == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int8_codes_bit_exact(dtype):
    x = _awkward((4, 3, 48), dtype)
    q, s = int8_codes(x)
    q_ref, s_ref = formats.int8.quantize(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_nvfp4_needs_k_multiple_of_16():
    with pytest.raises(ValueError, match="K=24"):
        nvfp4_values(torch.zeros(2, 24))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_errors_match_direct_computation(bias):
    lin = torch.nn.Linear(64, 32, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(0.1, 3.0, 64))
    x = torch.randn(3, 7, 64)
    x[1] *= 20.0  # rows with different ranges: the NVFP4 global scale spans all rows
    y = lin(x)
    got = linear_errors(x, y, quantize_weight(lin))
    assert got.shape == (2, 2, 3) and got.dtype == torch.float32
    ref = (x.double() @ lin.weight.double().t())
    for fi, fmt in enumerate(formats.FORMATS):
        xq = formats.fake_quant(x, fmt)
        yq = formats.quantized_linear_reference(x, lin.weight, None, fmt).double()
        for r in range(3):
            act = ((xq[r].double() - x[r].double()).norm() / x[r].double().norm()).item()
            out = ((yq[r] - ref[r]).norm() / ref[r].norm()).item()
            assert got[fi, 0, r].item() == pytest.approx(act, rel=1e-5), (fmt, r)
            assert got[fi, 1, r].item() == pytest.approx(out, rel=1e-4), (fmt, r)
    # NVFP4 errs more than INT8 on these inputs: a sanity check that the formats are not swapped.
    assert (got[0] > got[1]).all()


def test_linear_errors_one_format_and_nan_propagates():
    lin = torch.nn.Linear(32, 32)
    qw = quantize_weight(lin, ("int8",))
    x = torch.randn(2, 4, 32)
    x[1, 0, 0] = float("nan")
    got = linear_errors(x, lin(x), qw)
    assert got.shape == (1, 2, 2)
    assert torch.isfinite(got[:, :, 0]).all() and torch.isnan(got[:, :, 1]).all()


def test_quantize_weight_rejects_bad_input():
    lin = torch.nn.Linear(32, 16)
    with pytest.raises(ValueError, match="unknown format"):
        quantize_weight(lin, ("fp8",))
    with torch.no_grad():
        lin.weight[0, 0] = float("inf")
    from sixbit_tune.errors import NonFiniteError

    with pytest.raises(NonFiniteError, match="weight"):
        quantize_weight(lin)
