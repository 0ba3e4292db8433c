"""Per-guidance-branch predictor lines at inference: a separate-CFG pipeline (Wan: one transformer call per branch,
in cache contexts named "cond" and "uncond") decides each branch's routes and attention with that branch's lines;
batched calls and contexts without a branch name use the policy's decision line (the branches' upper envelope)."""

from __future__ import annotations

from rt_helpers import get_pipe, run_pipe

from sixbit_tune import policy as P
from sixbit_tune.models.adapters import get_adapter
from sixbit_tune.runtime import apply_policy, make_dynamic_policy, make_static_policy

STEPS = 4
FAST_COND = {"cond": (0.0, 0.0, 0.9, 10), "uncond": (0.0, 1.0, 0.9, 10)}  # at τ = 0.5: cond fast, uncond robust


def test_each_branch_takes_the_routes_its_own_lines_give():
    pipe = get_pipe("wan")
    names = list(get_adapter(pipe).all_linears())
    policy = make_dynamic_policy(pipe, {n: FAST_COND for n in names}, 0.5)
    with apply_policy(pipe, policy) as h:
        run_pipe(pipe, "wan", steps=STEPS)
        stats = h.stats()
    by_ctx = {}
    for s in stats.steps:
        if s.step > 0:  # the first step runs the first-step route
            c = by_ctx.setdefault(s.context, {"nvfp4": 0, "int8": 0})
            c["nvfp4"] += s.layer_calls["nvfp4"]
            c["int8"] += s.layer_calls["int8"]
    assert set(by_ctx) == {"cond", "uncond"}
    assert by_ctx["cond"]["int8"] == 0 < by_ctx["cond"]["nvfp4"]
    assert by_ctx["uncond"]["nvfp4"] == 0 < by_ctx["uncond"]["int8"]
    # The shared decision line is the envelope (alpha 0, beta 1): robust everywhere where no branch is named.
    assert policy.dmpq.layers[names[0]].decision_line[:2] == (0.0, 1.0)


def test_each_branch_chooses_its_attention_with_its_own_line():
    pipe = get_pipe("wan")
    n_blocks = len(get_adapter(pipe).blocks())
    lines = {b: P.Line(*v) for b, v in FAST_COND.items()}
    attention = P.Attention(0.5, "int8", {str(i): P.AttentionBlock("dynamic", lines) for i in range(n_blocks)})
    with apply_policy(pipe, make_static_policy(pipe, "int8").replace(attention=attention)) as h:
        run_pipe(pipe, "wan", steps=STEPS)
        stats = h.stats()
    for s in stats.steps:
        if s.step > 0:
            assert s.attention_calls == {"8bit" if s.context == "cond" else "bf16": n_blocks}, s
