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


def _policy_and_shapes():
    from sixbit_tune.runtime import make_dynamic_policy

    t = tiny_transformer("wan")
    inputs = tiny_transformer_inputs("wan", batch=2)
    shapes = linear_shapes(t, lambda: t(**inputs))
    names = list(get_adapter(t).all_linears())
    policy = make_dynamic_policy(t, {n: (1.0, 0.0, 0.9, 10) for n in names[::2]}, 0.5, other_layers="int8")
    return t, inputs, shapes, policy


def test_choose_8bit_routes_takes_the_faster_8bit_route_at_each_layer_shape():
    from sixbit_tune import policy as P
    from sixbit_tune.runtime import apply_policy
    from sixbit_tune.runtime.menu import MenuMeasurement, choose_8bit_routes

    t, inputs, shapes, policy = _policy_and_shapes()
    fp8_wins = {kn for kn in sorted({(k, n) for _, k, n in shapes})[::2]}  # FP8 faster at every other (K, N)
    per_shape = {}
    for m, k, n in shapes:
        fast8, slow8 = (1.0, 2.0) if (k, n) in fp8_wins else (2.0, 1.0)
        per_shape[(m, k, n)] = {UNQUANTIZED: 3.0, "int8/int8": slow8, "fp8/fp8": fast8, "nvfp4/int8": slow8,
                                "nvfp4/fp8": fast8, "nvfp4/nvfp4": 5.0}
    entry = P.MenuEntry("reference", tflops=1.5, speedup=1.25)
    measured = MenuMeasurement("cpu", {"fp8/fp8": entry}, per_shape, dict(shapes))
    new, chosen = choose_8bit_routes(policy, measured)
    assert new.target.menu["fp8/fp8"] == entry and "int8/int8" in new.target.menu  # merged into the menu
    for name, lp in policy.dmpq.layers.items():
        got = new.dmpq.layers[name]
        fp8 = (lp.in_features, lp.out_features) in fp8_wins
        assert (got.mode, got.predictor, got.encoder) == (lp.mode, lp.predictor, lp.encoder)
        if lp.mode == "dynamic":  # NVFP4-stored: W4A4 stays the fast route, W4A8 takes the faster operand
            assert (got.weight, got.fast, got.robust) == ("nvfp4", "nvfp4", "fp8" if fp8 else "int8")
        else:  # INT8-stored static layers store FP8 where FP8 W8A8 is faster
            assert (got.weight, got.fast, got.robust) == (("fp8",) * 3 if fp8 else ("int8",) * 3)
    assert sum(chosen.values()) == len(policy.dmpq.layers)
    assert chosen.get("fp8/fp8", 0) + chosen.get("int8/int8", 0) == sum(
        lp.mode != "dynamic" for lp in policy.dmpq.layers.values())
    assert P.Policy.from_dict(new.to_dict()) == new  # a valid policy
    with apply_policy(t, new) as h, torch.no_grad():
        assert torch.isfinite(t(**inputs)[0]).all()
        assert h.stats().weight_bytes["fp8"] > 0


def test_choose_8bit_routes_follows_a_measured_menu_and_leaves_unmeasured_shapes():
    from sixbit_tune.runtime.menu import choose_8bit_routes

    _, _, shapes, policy = _policy_and_shapes()
    kept = next(s for s in shapes if sum(t[1:] == s[1:] for t in shapes) == 1)  # the only shape of its (K, N)
    measured = measure_menu({s: c for s, c in shapes.items() if s != kept}, "cpu", torch.float32, compile=False,
                            warmup=1, repeats=3, routes=["int8/int8", "fp8/fp8", "nvfp4/int8", "nvfp4/fp8"])
    new, _ = choose_8bit_routes(policy, measured)
    unmeasured = 0
    for name, lp in policy.dmpq.layers.items():
        got = new.dmpq.layers[name]
        at = [s for s in measured.per_shape if s[1:] == (lp.in_features, lp.out_features)]
        if not at:
            assert got == lp  # not measured: as it was
            unmeasured += 1
            continue
        pair = ("nvfp4/int8", "nvfp4/fp8") if lp.weight == "nvfp4" else ("int8/int8", "fp8/fp8")
        ms = {r: sum(measured.per_shape[s][r] * measured.counts[s] for s in at) for r in pair}
        assert R.Route(got.weight, got.robust).key == min(pair, key=ms.__getitem__)
    assert unmeasured == sum((lp.in_features, lp.out_features) == kept[1:] for lp in policy.dmpq.layers.values()) > 0
