"""The measured route menu: the shapes a real model's in-block linears see, each route timed against the
unquantized layer, and the menu entries computed from those times."""

from __future__ import annotations

import pytest
import torch

from sixbit_tune import routes as R
from sixbit_tune.models.adapters import get_adapter
from sixbit_tune.models.tiny import tiny_transformer, tiny_transformer_inputs
from sixbit_tune.runtime.menu import UNQUANTIZED, linear_shapes, measure_menu


def test_linear_shapes_count_every_in_block_linear_call_of_one_model_call():
    t = tiny_transformer("wan")
    inputs = tiny_transformer_inputs("wan", batch=2)
    shapes = linear_shapes(t, lambda: t(**inputs))
    linears = get_adapter(t).all_linears()
    assert sum(shapes.values()) == len(linears)  # each in-block linear runs once per call
    assert {(k, n) for _, k, n in shapes} == {(lin.in_features, lin.out_features) for lin in linears.values()}
    tokens = inputs["hidden_states"].shape[0] * inputs["hidden_states"][0, 0].numel() // 4  # 1x2x2 patches
    assert max(m for m, _, _ in shapes) == tokens
    assert all(not lin._forward_pre_hooks for lin in linears.values())  # the hooks are removed


def test_menu_entries_follow_from_the_per_shape_times():
    shapes = {(8, 32, 48): 3, (5, 48, 32): 1}
    m = measure_menu(shapes, "cpu", torch.float32, compile=False, warmup=1, repeats=2)
    quantized = [k for k in R.all_route_keys() if not k.startswith("none")]
    assert set(m.menu) == set(quantized) and not m.failed
    assert set(m.per_shape) == set(shapes)
    for key, entry in m.menu.items():
        assert entry.implementation == "reference"  # the CPU runs the reference numerics
        route_ms = sum(t[key] * shapes[s] for s, t in m.per_shape.items())
        base_ms = sum(t[UNQUANTIZED] * shapes[s] for s, t in m.per_shape.items())
        assert entry.speedup == pytest.approx(base_ms / route_ms)
        flops = sum(2 * a * b * c * n for (a, b, c), n in shapes.items())
        assert entry.tflops == pytest.approx(flops / (route_ms * 1e-3) / 1e12)
    s = (8, 32, 48)
    pick = m.fastest(s, ["int8/int8", "fp8/fp8"])
    assert m.per_shape[s][pick] == min(m.per_shape[s]["int8/int8"], m.per_shape[s]["fp8/fp8"])
    with pytest.raises(KeyError, match="none of"):
        m.fastest(s, ["bogus/route"])
    m.to_json()  # JSON-ready


def test_nvfp4_routes_are_left_out_where_k_is_not_a_multiple_of_16():
    m = measure_menu({(4, 24, 16): 1}, "cpu", torch.float32, routes=["nvfp4/fp8", "int8/int8"], compile=False,
                     warmup=0, repeats=1)
    assert set(m.per_shape[(4, 24, 16)]) == {UNQUANTIZED, "int8/int8"}
    assert set(m.menu) == {"int8/int8"}


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        measure_menu({}, "cpu")
    with pytest.raises(ValueError, match="unknown route"):
        measure_menu({(4, 32, 16): 1}, "cpu", routes=["int8/fp8"], compile=False)


def test_compiled_menu_times_the_compiled_layers():
    m = measure_menu({(8, 32, 16): 1}, "cpu", torch.float32, routes=["fp8/fp8"], compile=True, warmup=1,
                     repeats=1)
    assert set(m.menu) == {"fp8/fp8"} and m.menu["fp8/fp8"].speedup > 0
