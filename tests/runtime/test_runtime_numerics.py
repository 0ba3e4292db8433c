"""All-INT8 / all-NVFP4 policies equal an independently built fake-quant model; ±inf thresholds; the DMPQ rule."""

from __future__ import annotations

import pytest
import torch
from rt_helpers import (
    FAMILIES,
    BlockRecorder,
    fake_quant_model,
    gamma_rows,
    get_pipe,
    run_pipe,
    transformer_and_inputs,
)

from sixbit_tune.models.adapters import get_adapter
from sixbit_tune.models.tiny import tiny_pipeline
from sixbit_tune.runtime import MixedPrecisionLinear, apply_policy, make_dynamic_policy, make_static_policy


@pytest.mark.parametrize("fmt", ["int8", "nvfp4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_static_policy_equals_reference_fake_quant(family, fmt):
    model, inputs = transformer_and_inputs(family)
    reference, _ = transformer_and_inputs(family)
    fake_quant_model(reference, fmt)
    n_layers = len(get_adapter(model).all_linears())
    with torch.no_grad():
        expected = reference(**inputs)[0]
        plain = model(**inputs)[0]
        handle = apply_policy(model, make_static_policy(model, fmt))
        got = model(**inputs)[0]
    assert torch.equal(got, expected), f"{family} {fmt}: max diff {(got - expected).abs().max().item()}"
    assert not torch.equal(got, plain)  # the policy did quantize something
    stats = handle.stats()
    assert stats.layer_calls == {"nvfp4": n_layers if fmt == "nvfp4" else 0,
                                 "int8": n_layers if fmt == "int8" else 0, "fp8": 0, "none": 0}
    assert stats.nvfp4_share == (1.0 if fmt == "nvfp4" else 0.0)
    assert stats.execution == {fmt: "reference"}
    handle.remove()


def test_static_policy_over_a_pipeline_run_equals_reference_fake_quant():
    """Several steps, separate CFG (Wan): every call of every step uses the quantized layers."""
    pipe = get_pipe("wan")
    reference = tiny_pipeline("wan")
    fake_quant_model(reference.transformer, "int8")
    expected = run_pipe(reference, "wan", steps=3)
    with apply_policy(pipe, make_static_policy(pipe, "int8")):
        got = run_pipe(pipe, "wan", steps=3)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_infinite_thresholds_select_one_format_everywhere(family):
    pipe = get_pipe(family)
    names = get_adapter(pipe).all_linears()
    predictors = {n: (1.0, 0.0, 0.9, 10) for n in names}
    results = {}
    # A dynamic layer stores its weight once, in NVFP4: its robust (INT8) route runs INT8 activations on the INT8
    # operand derived from the NVFP4 weight, as a static NVFP4-stored policy on its robust route does.
    for fmt, mode in (("int8", "robust"), ("nvfp4", "fast")):
        with apply_policy(pipe, make_static_policy(pipe, "nvfp4", mode=mode)):
            results[fmt] = run_pipe(pipe, family, steps=3)
    for tau, first, fmt in ((float("inf"), "nvfp4", "nvfp4"), (float("-inf"), "int8", "int8")):
        policy = make_dynamic_policy(pipe, predictors, tau, first_step_format=first)
        with apply_policy(pipe, policy) as handle:
            got = run_pipe(pipe, family, steps=3)
            stats = handle.stats()
        assert torch.equal(got, results[fmt]), (family, tau)
        assert stats.nvfp4_share == (1.0 if fmt == "nvfp4" else 0.0)
    # +inf with an INT8 first step: INT8 at step 0 only, NVFP4 afterwards.
    with apply_policy(pipe, make_dynamic_policy(pipe, predictors, float("inf"), first_step_format="int8")) as h:
        run_pipe(pipe, family, steps=3)
        shares = [(s.step, s.nvfp4_share) for s in h.stats().steps]
    assert all(share == (0.0 if step == 0 else 1.0) for step, share in shares), shares


@pytest.mark.parametrize("family", ["cogvideox", "wan", "hunyuanvideo"])
def test_dmpq_decisions_follow_the_rule_per_context_and_row(family):
    """Layer j of block l runs NVFP4 at step t iff α_j·Γ_l(t−1) + β_j ≤ τ for every row of the call, with Γ of the
    same guidance context; INT8 at the first step. Γ and the formats actually used are recorded independently."""
    pipe = get_pipe(family)
    adapter = get_adapter(pipe)
    names = list(adapter.all_linears())
    # Predictors with varied slopes so that the decision differs across layers and steps.
    predictors = {n: (0.5 + (i % 5) * 0.6, 0.01 * (i % 3), None, None) for i, n in enumerate(names)}
    steps = 4
    # A first run records Γ to place τ in the middle of the predictions.
    rec = BlockRecorder(pipe)
    run_pipe(pipe, family, steps=steps, prompts=["a cat", "a dog"])
    rec.remove()
    preds = sorted(a * g + b for c in rec.calls for a, b, _, _ in predictors.values() for g in gamma_rows(c["xs"], c["ys"]))
    tau = preds[len(preds) // 2]
    tau = (tau + min(p for p in preds if p > tau)) / 2  # strictly between two predictions

    policy = make_dynamic_policy(pipe, predictors, tau)
    handle = apply_policy(pipe, policy)
    rec = BlockRecorder(pipe)
    used: dict[tuple[int, str], str] = {}  # (block call index, layer) -> format it ran in
    layer_of = {}
    for ref in adapter.blocks():
        for rel, mod in ref.module.named_modules():
            if isinstance(mod, MixedPrecisionLinear):
                layer_of[mod] = (ref.index, f"{ref.name}.{rel}")
                mod.register_forward_hook(
                    lambda m, a, o: used.__setitem__((len(rec.calls) - 1, layer_of[m][1]), m.fmt)
                )
    n_blocks = len(adapter.blocks())
    contexts_per_step = 2 if adapter.cfg_mode == "separate" else 1
    run_pipe(pipe, family, steps=steps, prompts=["a cat", "a dog"])
    stats = handle.stats()
    handle.remove()
    rec.remove()

    # Expected formats from the recorded Γ: calls come as steps × contexts × blocks, in order.
    calls = [rec.calls[i : i + n_blocks] for i in range(0, len(rec.calls), n_blocks)]
    assert len(calls) == steps * contexts_per_step
    expected = {}
    for k in range(len(calls)):
        prev = calls[k - contexts_per_step] if k >= contexts_per_step else None
        for ref in adapter.blocks():
            g = gamma_rows(prev[ref.index]["xs"], prev[ref.index]["ys"]) if prev else None
            for rel in adapter.linears(ref):
                name = f"{ref.name}.{rel}"
                a, b, _, _ = predictors[name]
                fmt = "int8" if g is None else ("nvfp4" if all(a * gi + b <= tau for gi in g) else "int8")
                expected[(k * n_blocks + ref.index, name)] = fmt
    assert used == expected
    fmts = set(used.values())
    assert fmts == {"int8", "nvfp4"}, "τ should split the layers"
    assert stats.layer_calls["nvfp4"] == sum(f == "nvfp4" for f in used.values())
    assert [s.context for s in stats.steps][:contexts_per_step] == (
        ["cond", "uncond"] if contexts_per_step == 2 else ["cond_uncond"]
    )
