"""The profiler's sync-free quantizers and per-layer errors against sixbit_tune.formats (the specification): every
route's quantized product bit for bit (NVFP4 W4A4 to a documented tolerance), the derived weight operands of the
NVFP4-stored routes as the runtime derives them."""

from __future__ import annotations

import pytest
import torch

from sixbit_tune import formats
from sixbit_tune.profiling.quant import (
    INT8_F32_EXACT_K,
    fp8_codes,
    int8_codes,
    linear_errors,
    nvfp4_values,
    quantize_activation,
    quantize_weight,
    route_outputs,
    routes_for,
)
from sixbit_tune.routes import PROFILE_DEFAULT_ROUTES, PROFILE_ROUTES, profile_route


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
    assert got.shape == (len(PROFILE_DEFAULT_ROUTES), 2, 3) and got.dtype == torch.float32
    ref = (x.double() @ lin.weight.double().t())
    for fi, fmt in enumerate(PROFILE_DEFAULT_ROUTES):
        route = profile_route(fmt)
        xq = formats.fake_quant(x, route.activation)
        yq = formats.quantized_linear_reference(x, _route_weight(lin.weight, route), None, route.activation).double()
        for r in range(3):
            act = ((xq[r].double() - x[r].double()).norm() / x[r].double().norm()).item()
            out = ((yq[r] - ref[r]).norm() / ref[r].norm()).item()
            assert got[fi, 0, r].item() == pytest.approx(act, rel=1e-5), (fmt, r)
            assert got[fi, 1, r].item() == pytest.approx(out, rel=1e-4), (fmt, r)
    # NVFP4 errs more than INT8 on these inputs: a sanity check that the formats are not swapped.
    i = {f: PROFILE_DEFAULT_ROUTES.index(f) for f in ("nvfp4", "int8", "nvfp4/int8")}
    assert (got[i["nvfp4"]] > got[i["int8"]]).all()
    # W4A8 reads the INT8 activation (same act_err), and its NVFP4-derived weight errs more than INT8 W8A8.
    assert torch.equal(got[i["nvfp4/int8"], 0], got[i["int8"], 0])
    assert (got[i["nvfp4/int8"], 1] > got[i["int8"], 1]).all()


def test_linear_errors_one_format_and_nan_propagates():
    lin = torch.nn.Linear(32, 32)
    qw = quantize_weight(lin, ("int8",))
    assert qw.formats == ("int8",) and qw.nvfp4_v is None and qw.fp8_q is None
    x = torch.randn(2, 4, 32)
    x[1, 0, 0] = float("nan")
    got = linear_errors(x, lin(x), qw)
    assert got.shape == (1, 2, 2)
    assert torch.isfinite(got[:, :, 0]).all() and torch.isnan(got[:, :, 1]).all()


def test_quantize_weight_rejects_bad_input():
    lin = torch.nn.Linear(32, 16)
    with pytest.raises(ValueError, match="unknown format"):
        quantize_weight(lin, ("fp4",))
    with pytest.raises(ValueError, match="unknown format"):
        quantize_weight(lin, ("int8/int8",))  # the store's name of that route is "int8"
    odd = torch.nn.Linear(24, 8)
    for fmt in ("nvfp4", "nvfp4/int8", "nvfp4/fp8"):
        with pytest.raises(ValueError, match="K=24"):
            quantize_weight(odd, ("int8", fmt))
    with torch.no_grad():
        lin.weight[0, 0] = float("inf")
    from sixbit_tune.errors import NonFiniteError

    with pytest.raises(NonFiniteError, match="weight"):
        quantize_weight(lin)


def _route_weight(w: torch.Tensor, route) -> torch.Tensor:
    """The weight the formats reference quantizes on ``route``: the layer's own, or for a route over an NVFP4
    weight with another activation format the dequantized NVFP4 weight (the runtime's derivation)."""
    if route.weight == "nvfp4" and route.activation != "nvfp4":
        return formats.nvfp4.quantize(w).dequantize(torch.float32)
    return w


def _outputs(x: torch.Tensor, lin: torch.nn.Linear, routes) -> tuple:
    qw = quantize_weight(lin, routes)
    act, xv, xs, xq, xqs, xf, xfs = quantize_activation(x, *qw.act_key)
    outs = route_outputs(lin.out_features, xv, xs, qw.nvfp4_v, qw.nvfp4_s, xq, xqs, qw.int8_q, qw.int8_s,
                         xf, xfs, qw.fp8_q, qw.fp8_s)
    return qw, act, outs


# (M tokens, K, N): odd token counts and output widths, K not a multiple of 16 (no NVFP4 routes there), and a K
# longer than one exact float32 INT8 chunk
SHAPES = [(7, 64, 24), (1, 32, 5), (13, 48, 33), (9, 40, 17), (5, 24, 3), (6, INT8_F32_EXACT_K + 48, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in SHAPES])
def test_every_route_product_is_the_formats_reference(shape, dtype):
    """Each route's quantized product Q_a(x)·W_rᵀ equals formats.quantized_linear_reference of the route's weight:
    bit for bit for the INT8 and FP8 routes (the derived ones on the dequantized NVFP4 weight), to float32
    rounding for NVFP4 W4A4 (its scales are applied after the product)."""
    M, K, N = shape
    torch.manual_seed(M * 1000 + K + N)
    lin = torch.nn.Linear(K, N).to(dtype)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-2, 1, K).to(dtype))
        lin.weight[0] = 0.0  # an all-zero output channel
    x = _awkward((M, K), dtype)
    routes = routes_for(PROFILE_ROUTES, K)
    assert routes == (PROFILE_ROUTES if K % 16 == 0 else ("int8", "fp8"))
    qw, act, outs = _outputs(x, lin, routes)
    assert qw.formats == routes and len(outs) == len(routes)
    w = lin.weight.detach()
    for name, got in zip(routes, outs):
        route = profile_route(name)
        ref = formats.quantized_linear_reference(x, _route_weight(w, route), None, route.activation)
        assert got.shape == (M, N) and got.dtype == torch.float32
        if name == "nvfp4":
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
        else:
            assert torch.equal(got, ref), name


def test_derived_operands_are_the_runtimes():
    """The W4A8 and NVFP4-on-FP8 weight operands are the runtime's (Backend.derive_weight on the stored NVFP4
    weight), computed once by quantize_weight and stacked after the 8-bit-stored route's operand."""
    from sixbit_tune.runtime._backend import Backend

    lin = torch.nn.Linear(64, 12)
    qw = quantize_weight(lin, PROFILE_ROUTES)
    stored = formats.nvfp4.quantize(lin.weight.detach())
    backend = Backend("reference")
    for fmt, (q, s), own in (("int8", (qw.int8_q, qw.int8_s), int8_codes), ("fp8", (qw.fp8_q, qw.fp8_s), fp8_codes)):
        dq, ds = backend.derive_weight(stored, fmt, scratch=False)
        oq, os_ = own(lin.weight.detach())
        assert torch.equal(q[12:].float(), dq.float()) and torch.equal(s[12:], ds)
        assert torch.equal(q[:12].float(), oq.float()) and torch.equal(s[:12], os_)


def test_one_activation_quantization_per_format():
    """act_err rows are per activation format; every route reads its format's row (one quantization, shared)."""
    lin = torch.nn.Linear(32, 16)
    qw = quantize_weight(lin, ("nvfp4/fp8", "int8", "nvfp4/int8"))  # any order: stored in PROFILE_ROUTES order
    assert qw.formats == ("int8", "nvfp4/int8", "nvfp4/fp8") and qw.act_index == (0, 0, 1)
    assert qw.act_key == (None, True, True) and qw.int8_q.shape == (32, 32) and qw.fp8_q.shape == (16, 32)
    x = torch.randn(2, 3, 32)
    act = quantize_activation(x, *qw.act_key)[0]
    assert act.shape == (2, 2)
    got = linear_errors(x, lin(x), qw)
    assert torch.equal(got[:, 0], act[[0, 0, 1]])
    for r in range(2):
        xq = formats.fake_quant(x[r], "fp8").double()
        assert act[1, r].item() == pytest.approx(((xq - x[r].double()).norm() / x[r].double().norm()).item(),
                                                 rel=1e-6)


def test_fp8_codes_bit_exact():
    x = _awkward((4, 3, 40), torch.bfloat16)
    q, s = fp8_codes(x)
    q_ref, s_ref = formats.fp8.quantize(x)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)


def test_routes_for_leaves_out_nvfp4_weights_where_k_is_not_a_multiple_of_16():
    assert routes_for(("nvfp4/fp8", "int8", "nvfp4"), 64) == ("nvfp4", "int8", "nvfp4/fp8")
    assert routes_for(PROFILE_ROUTES, 40) == ("int8", "fp8")
    assert routes_for(("nvfp4",), 40) == ()
    with pytest.raises(ValueError, match="unknown profile route"):
        routes_for(("w4a8",), 64)
