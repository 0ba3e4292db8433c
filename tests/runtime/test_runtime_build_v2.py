"""Policies of schema version 2 built and applied: one stored weight per layer in the statistics, derived robust
routes, FP8-stored weights, per-branch predictors, version-1 files, and the attention section."""

from __future__ import annotations

import pytest
import torch
from rt_helpers import fake_quant_model, get_pipe, run_pipe, transformer_and_inputs

from sixbit_tune import policy as P
from sixbit_tune.errors import PolicyError
from sixbit_tune.formats import weight_bytes
from sixbit_tune.models.adapters import get_adapter
from sixbit_tune.runtime import apply_policy, make_dynamic_policy, make_static_policy
from sixbit_tune.runtime.apply import GPUMismatchWarning


def test_dynamic_layers_store_one_nvfp4_weight_and_count_scratch_separately():
    pipe = get_pipe("wan")
    linears = get_adapter(pipe).all_linears()
    names = list(linears)
    predictors = {n: (1.0, 0.0, 0.9, 10) for n in names[::2]}
    policy = make_dynamic_policy(pipe, predictors, 0.5, other_layers="int8")
    expected = {"nvfp4": 0, "int8": 0, "fp8": 0, "none": 0}
    shapes = set()
    for n, lin in linears.items():
        fmt = "nvfp4" if n in predictors else "int8"
        expected[fmt] += weight_bytes(fmt, lin.out_features, lin.in_features)
        if n in predictors:
            shapes.add((lin.out_features, lin.in_features))
    with apply_policy(pipe, policy) as h:
        run_pipe(pipe, "wan", steps=2)
        stats = h.stats()
        allocated = h.backend.scratch_bytes()
    assert stats.weight_bytes == expected  # a dynamic layer counts once, in NVFP4
    assert stats.scratch_bytes == {"int8": sum(weight_bytes("int8", n, k) for n, k in shapes)}
    assert allocated == stats.scratch_bytes  # the robust route ran on every shape at the first step
    assert stats.execution == {"int8": "reference", "nvfp4": "reference"}
    assert "scratch" in stats.summary()


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_minus_inf_threshold_runs_the_robust_w4a8_route_everywhere(family):
    pipe = get_pipe(family)
    names = get_adapter(pipe).all_linears()
    with apply_policy(pipe, make_static_policy(pipe, "nvfp4", mode="robust")) as h:
        static = run_pipe(pipe, family, steps=3)
        assert h.stats().layer_calls["int8"] == sum(s.layer_calls["int8"] for s in h.stats().steps) > 0
    with apply_policy(pipe, make_static_policy(pipe, "int8")):
        int8_weights = run_pipe(pipe, family, steps=3)
    policy = make_dynamic_policy(pipe, {n: (1.0, 0.0, None, None) for n in names}, float("-inf"))
    with apply_policy(pipe, policy) as h:
        got = run_pipe(pipe, family, steps=3)
        assert h.stats().nvfp4_share == 0.0
    assert torch.equal(got, static)
    assert not torch.equal(got, int8_weights)  # W4A8 over the NVFP4 values, not INT8 weights of the original


def test_static_fp8_weights_equal_the_reference_fake_quant():
    model, inputs = transformer_and_inputs("wan")
    reference, _ = transformer_and_inputs("wan")
    fake_quant_model(reference, "fp8")
    policy = make_static_policy(model, "fp8")
    assert {lp.weight for lp in policy.dmpq.layers.values()} == {"fp8"}
    with torch.no_grad():
        expected = reference(**inputs)[0]
        with apply_policy(model, policy) as h:
            got = model(**inputs)[0]
            stats = h.stats()
    assert torch.equal(got, expected)
    assert stats.execution == {"fp8": "reference"} and set(k for k, v in stats.weight_bytes.items() if v) == {"fp8"}
    n_linears = len(get_adapter(model).all_linears())
    assert stats.layer_calls == {"nvfp4": 0, "int8": 0, "fp8": n_linears, "none": 0}


def test_layer_calls_count_the_activation_format_of_the_route_that_ran():
    """A dynamic NVFP4-stored layer whose fast route is FP8 counts its fast calls as FP8, not as NVFP4 (W4A4)."""
    pipe = get_pipe("wan")
    names = list(get_adapter(pipe).all_linears())
    policy = make_dynamic_policy(pipe, {n: (0.0, 0.0, None, None) for n in names}, 1.0, fast="fp8", robust="int8",
                                 warmup=0, cooldown=0)
    with apply_policy(pipe, policy) as h:
        run_pipe(pipe, "wan", steps=3)
        stats = h.stats()
    per_step = {(s.context, s.step): s.layer_calls for s in stats.steps}
    assert all(c["int8"] == len(names) and c["fp8"] == 0 for (ctx, step), c in per_step.items() if step == 0)
    assert all(c["fp8"] == len(names) and c["int8"] == 0 for (ctx, step), c in per_step.items() if step > 0)
    assert stats.nvfp4_share == 0.0 and stats.layer_calls["fp8"] > 0


def test_per_branch_predictors_decide_with_their_upper_envelope():
    pipe = get_pipe("wan")
    name = next(iter(get_adapter(pipe).all_linears()))
    lines = {"cond": (0.2, 0.3, 0.9, 10), "uncond": (0.7, 0.1, 0.8, 10)}
    policy = make_dynamic_policy(pipe, {name: lines}, 0.5)
    assert policy.dmpq.layers[name].predictor == {k: P.Line(*v) for k, v in lines.items()}
    with apply_policy(pipe, policy) as h:
        info = next(b for b in h.controller.blocks if b.dynamic)
        assert (info.alphas, info.betas) == ([0.7], [0.3])


def test_a_version_1_policy_applies_like_its_migration(tmp_path):
    pipe = get_pipe("wan")
    v2 = make_dynamic_policy(pipe, {n: (1.0, 0.0, 0.9, 10) for n in list(get_adapter(pipe).all_linears())[:3]}, 0.3,
                             first_step_format="robust")
    d = v2.to_dict()
    d["schema_version"] = 1
    d["target"] = {"gpu": None, "compute_capability": None, "nvfp4_path": "reference"}
    d["dmpq"]["first_step_format"] = "int8"
    del d["dmpq"]["first_step"]
    for lp in d["dmpq"]["layers"].values():
        weight = lp.pop("weight")
        for k in ("fast", "robust"):
            lp.pop(k)
        mode = lp.pop("mode")
        pred = lp.pop("predictor", None)
        lp["mode"] = "dynamic" if mode == "dynamic" else weight
        if pred:
            lp["alpha"], lp["beta"], lp["r2"], lp["n"] = pred["pooled"]
    with apply_policy(pipe, v2):
        expected = run_pipe(pipe, "wan", steps=3)
    with apply_policy(pipe, d) as h:
        got = run_pipe(pipe, "wan", steps=3)
        assert h.policy.schema_version == 2
    assert torch.equal(got, expected)


def test_route_implementation_mismatch_warns():
    pipe = get_pipe("ltx")
    policy = make_static_policy(pipe, "nvfp4")
    assert policy.target.menu["nvfp4/nvfp4"].implementation == "reference"  # where it was made
    menu = dict(policy.target.menu, **{"nvfp4/nvfp4": P.MenuEntry("triton-nvfp4-emulated")})
    other = policy.replace(target=P.Target(None, None, menu))
    with pytest.warns(GPUMismatchWarning, match="route nvfp4/nvfp4: tuned with 'triton-nvfp4-emulated'"):
        apply_policy(pipe, other).remove()
    with pytest.raises(PolicyError, match="strict_gpu"):
        apply_policy(pipe, other, strict_gpu=True)


def test_gptq_encoder_named_on_one_layer_needs_its_hessian():
    pipe = get_pipe("ltx")
    policy = make_static_policy(pipe, "nvfp4")
    name = next(iter(policy.dmpq.layers))
    layers = dict(policy.dmpq.layers)
    lp = layers[name]
    layers[name] = P.LayerPolicy("nvfp4", lp.in_features, lp.out_features, encoder="gptq")
    with pytest.raises(PolicyError, match="1 missing") as e:
        apply_policy(pipe, policy.replace(dmpq=P.DMPQ(0.0, layers)))
    assert e.value.key == f"dmpq.layers.{name}.encoder"
