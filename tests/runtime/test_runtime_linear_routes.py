"""One stored weight per layer and its routes: the robust route's operand derived from the NVFP4 values, bit for bit
against sixbit_tune.formats; what stays resident; the shared scratch buffer; route selection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sixbit_tune import routes
from sixbit_tune.formats import fp8, int8, nvfp4, weight_bytes
from sixbit_tune.runtime import MixedPrecisionLinear
from sixbit_tune.runtime._backend import Backend


def _linear(n: int = 48, k: int = 64, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.mul_(3.0)
        lin.weight[0, :16] = 0.0  # an all-zero NVFP4 block and a row whose amax comes from the rest
    return lin


def _expected(x, lin, act):
    """``Q(x) @ Wd.T + b`` for the ``act`` route over an NVFP4-stored weight, from the formats only."""
    wd = nvfp4.quantize(lin.weight.detach()).dequantize(torch.float32)
    if act == "int8":
        qx, sx = int8.quantize(x)
        qw, sw = int8.quantize(wd)
        acc = torch.matmul(qx.to(torch.float64), qw.to(torch.float64).t()).to(torch.float32)
    else:
        qx, sx = fp8.quantize(x)
        qw, sw = fp8.quantize(wd)
        acc = fp8.exact_matmul(qx, qw)
    return (acc * (sx[..., None] * sw[None, :]) + lin.bias.float()).to(x.dtype)


@pytest.mark.parametrize("fmt,module", [("int8", int8), ("fp8", fp8)])
def test_derived_weight_is_the_formats_rule_on_the_dequantized_nvfp4_values(fmt, module):
    w = _linear().weight.detach()
    stored = nvfp4.quantize(w)
    q, s = Backend("reference").derive_weight(stored, fmt)
    eq, es = module.quantize(nvfp4.dequantize(stored, torch.float32))
    assert q.dtype == eq.dtype and torch.equal(q.view(torch.int8), eq.view(torch.int8)) and torch.equal(s, es)
    with pytest.raises(ValueError, match="no derived"):
        Backend("reference").derive_weight(stored, "nvfp4")


@pytest.mark.parametrize("act", ["int8", "fp8"])
def test_robust_route_over_an_nvfp4_weight_equals_the_reference_bit_for_bit(act):
    lin = _linear()
    layer = MixedPrecisionLinear(lin, "robust", Backend("reference"), weight="nvfp4", robust=act)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert torch.equal(layer(x), _expected(x, lin, act))


def test_a_dynamic_layer_holds_only_its_nvfp4_encoding():
    lin = _linear()
    layer = MixedPrecisionLinear(lin, "dynamic", Backend("reference"), weight="nvfp4")
    assert list(layer.qweights) == ["nvfp4"] and isinstance(layer.qweight, nvfp4.NVFP4Tensor)
    assert layer.weight_bytes() == {"nvfp4": weight_bytes("nvfp4", 48, 64)}
    # Nothing else stays resident on the module: no INT8 copy in its attributes or parameters, and its buffers are
    # exactly the NVFP4 encoding's tensors (codes, block scales, tensor scale).
    held = [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]
    assert all(t.dtype != torch.int8 for t in held)
    assert [b.dtype for b in layer.buffers()] == [torch.uint8, torch.float8_e4m3fn, torch.float32]
    assert sum(b.numel() * b.element_size() for b in layer.buffers()) == weight_bytes("nvfp4", 48, 64)
    assert layer.scratch_shapes() == {("int8", 48, 64)}
    x = torch.randn(3, 64)
    with torch.no_grad():
        layer.fmt = routes.ROBUST_FORMAT
        assert torch.equal(layer(x), _expected(x, lin, "int8"))
        layer.fmt = routes.FAST_FORMAT
        ref = MixedPrecisionLinear(lin, "fast", Backend("reference"), weight="nvfp4")
        assert torch.equal(layer(x), ref(x))


def test_layers_of_one_shape_share_one_scratch_buffer():
    backend = Backend("reference")
    a = MixedPrecisionLinear(_linear(seed=1), "robust", backend, weight="nvfp4")
    b = MixedPrecisionLinear(_linear(seed=2), "robust", backend, weight="nvfp4")
    c = MixedPrecisionLinear(_linear(n=32, seed=3), "robust", backend, weight="nvfp4", robust="fp8")
    x = torch.randn(4, 64)
    with torch.no_grad():
        qa = backend.derive_weight(a.qweight, "int8")
        ptr = qa[0].data_ptr()
        ya, yb, _ = a(x), b(x), c(x)
        assert backend.derive_weight(b.qweight, "int8")[0].data_ptr() == ptr  # reused, not reallocated
        assert torch.equal(a(x), ya) and torch.equal(b(x), yb)  # each call derives its own layer's operand
    assert backend.scratch_bytes() == {"int8": weight_bytes("int8", 48, 64), "fp8": weight_bytes("fp8", 32, 64)}
    backend.release_scratch()
    assert backend.scratch_bytes() == {}


def test_static_int8_and_fp8_weights_run_their_own_encoding():
    lin = _linear()
    for fmt in ("int8", "fp8"):
        layer = MixedPrecisionLinear(lin, "fast", Backend("reference"), weight=fmt)
        assert list(layer.qweights) == [fmt] and layer.scratch_shapes() == set()
        assert layer.formats == (fmt,) and layer.weight_bytes() == {fmt: weight_bytes(fmt, 48, 64)}


def test_route_selection_and_bad_routes():
    lin = _linear()
    layer = MixedPrecisionLinear(lin, "dynamic", Backend("reference"), weight="nvfp4", fast="fp8", robust="int8")
    assert layer.fmt == routes.ROBUST_FORMAT and layer.activation == "int8"  # the default initial route
    layer.fmt = routes.FAST_FORMAT  # the controller's name of the fast route, whatever its activation format
    assert layer.route == "fast" and layer.activation == "fp8"
    layer.fmt = "robust"
    assert layer.activation == "int8"
    with pytest.raises(ValueError, match="route"):
        layer.fmt = "fp8"
    static = MixedPrecisionLinear(lin, "fast", Backend("reference"), weight="int8")
    with pytest.raises(ValueError, match="fast route only"):
        static.fmt = routes.ROBUST_FORMAT
    with pytest.raises(ValueError, match="do not run over"):
        MixedPrecisionLinear(lin, "fast", Backend("reference"), weight="int8", fast="nvfp4")
    with pytest.raises(ValueError, match="weight must be"):
        MixedPrecisionLinear(lin, "fast", Backend("reference"), weight="none")
    # The version-1 modes still construct the same layers.
    v1 = MixedPrecisionLinear(lin, "dynamic", Backend("reference"))
    assert (v1.weight_format, v1.fast, v1.robust, v1.mode) == ("nvfp4", "nvfp4", "int8", "dynamic")
    assert MixedPrecisionLinear(lin, "int8", Backend("reference")).weight_format == "int8"


def test_a_static_derived_route_compiles_to_the_eager_result():
    lin = _linear()
    layer = MixedPrecisionLinear(lin, "robust", Backend("reference"), weight="nvfp4")
    x = torch.randn(3, 64)
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, backend="eager")(x)
    assert torch.equal(compiled, eager)
    assert layer._backend.scratch_bytes() == {"int8": weight_bytes("int8", 48, 64)}  # only the eager call used it
