"""The policy's attention section through apply_policy: fixed 8-bit blocks, dynamic blocks decided per step by the
DMPQ rule on the attention's own line and threshold, statistics, and remove()."""

from __future__ import annotations

import math

import pytest
import torch
from rt_helpers import get_pipe, run_pipe

from sixbit_tune import policy as P
from sixbit_tune.models.adapters import get_adapter
from sixbit_tune.runtime import apply_policy, make_static_policy
from sixbit_tune.runtime.attention import install_attention

FAMILY = "wan"  # separate CFG: one transformer call per branch and step
STEPS = 4


def _processors(pipe):
    return [a.module.processor for a in get_adapter(pipe).all_attentions()]


def _attention(modes: dict[int, str], threshold: float = 0.0, line=(1.0, 0.0)) -> P.Attention:
    blocks = {str(i): P.AttentionBlock(m, {"pooled": P.Line(*line)} if m == "dynamic" else None)
              for i, m in modes.items()}
    return P.Attention(threshold, "int8", blocks)


def test_fixed_8bit_blocks_equal_the_installer_and_remove_restores():
    pipe = get_pipe(FAMILY)
    base = make_static_policy(pipe, "int8")
    plain = run_pipe(pipe, FAMILY, steps=STEPS)
    processors = _processors(pipe)
    n_blocks = len(get_adapter(pipe).blocks())
    with apply_policy(pipe, base):  # the same policy, its attention installed by hand on every block
        with install_attention(pipe, fmt="int8", preference="reference"):
            expected = run_pipe(pipe, FAMILY, steps=STEPS)
    with apply_policy(pipe, base.replace(attention=_attention({i: "8bit" for i in range(n_blocks)}))) as h:
        got = run_pipe(pipe, FAMILY, steps=STEPS)
        stats = h.stats()
    assert torch.equal(got, expected)
    assert stats.attention_installed
    assert stats.attention_calls == {"8bit": stats.block_calls - stats.skipped_blocks}
    assert stats.attention_8bit_share == 1.0
    assert _processors(pipe) == processors  # the same processor objects are back
    assert torch.equal(run_pipe(pipe, FAMILY, steps=STEPS), plain)


@pytest.mark.parametrize("threshold", [-math.inf, math.inf])
def test_dynamic_blocks_follow_the_rule_at_infinite_thresholds(threshold):
    pipe = get_pipe(FAMILY)
    base = make_static_policy(pipe, "int8")
    n_blocks = len(get_adapter(pipe).blocks())
    with apply_policy(pipe, base):
        bf16 = run_pipe(pipe, FAMILY, steps=STEPS)
    policy = base.replace(attention=_attention({i: "dynamic" for i in range(n_blocks)}, threshold))
    with apply_policy(pipe, policy) as h:
        got = run_pipe(pipe, FAMILY, steps=STEPS)
        stats = h.stats()
    per_step = [s.attention_calls for s in stats.steps]
    if threshold < 0:  # never under the threshold: the model's own attention everywhere
        assert torch.equal(got, bf16)
        assert all(c == {"bf16": n_blocks} for c in per_step)
    else:  # bf16 at each context's first step (no Γ yet), 8-bit afterwards
        assert not torch.equal(got, bf16)
        assert all(c == ({"bf16": n_blocks} if s.step == 0 else {"8bit": n_blocks})
                   for c, s in zip(per_step, stats.steps))
        assert stats.attention_8bit_share == (STEPS - 1) / STEPS


def test_dynamic_attention_decides_per_block_from_gamma():
    """A threshold between the blocks' predictions: each computation's mode is the rule applied to the block's Γ
    at its previous computation (recorded by a forward hook on the block, independently of the runtime)."""
    pipe = get_pipe(FAMILY)
    adapter = get_adapter(pipe)
    n_blocks = len(adapter.blocks())
    base = make_static_policy(pipe, "int8")
    gammas: list[list[float]] = [[] for _ in range(n_blocks)]
    hooks = []
    for i, ref in enumerate(adapter.blocks()):
        def hook(m, args, kwargs, out, i=i, ref=ref):
            x = adapter.streams_in(ref, args, kwargs)[0]
            y = out[0] if isinstance(out, tuple) else out
            gammas[i].append(float((y.float() - x.float()).abs().sum() / x.float().abs().sum()))
        hooks.append(ref.module.register_forward_hook(hook, with_kwargs=True))
    try:
        with apply_policy(pipe, base):
            run_pipe(pipe, FAMILY, steps=STEPS)
    finally:
        for h in hooks:
            h.remove()
    # Calls alternate cond/uncond per step in Wan: per block, the Γ of call k, for k in execution order.
    flat = sorted(g for gs in gammas for g in gs)
    threshold = flat[len(flat) // 2]  # the line alpha=1, beta=0 predicts Γ itself: about half fall under
    policy = base.replace(attention=_attention({i: "dynamic" for i in range(n_blocks)}, threshold))
    with apply_policy(pipe, policy) as h:
        run_pipe(pipe, FAMILY, steps=STEPS)
        stats = h.stats()
    contexts = sorted({s.context for s in stats.steps})
    for ctx in contexts:
        calls = [k for k, s in enumerate(stats.steps) if s.context == ctx]
        for pos, k in enumerate(calls):
            want = {}
            for i in range(n_blocks):
                if pos == 0:
                    mode = "bf16"
                else:
                    mode = "8bit" if gammas[i][calls[pos - 1]] <= threshold else "bf16"
                want[mode] = want.get(mode, 0) + 1
            assert stats.steps[k].attention_calls == want, (ctx, pos)
    assert 0 < stats.attention_8bit_share < 1


def test_policy_file_with_attention_round_trips_and_applies(tmp_path):
    pipe = get_pipe(FAMILY)
    n_blocks = len(get_adapter(pipe).blocks())
    policy = make_static_policy(pipe, "int8").replace(
        attention=_attention({0: "8bit", n_blocks - 1: "dynamic"}, 0.5, line=(0.2, 0.01)))
    path = P.save(policy, tmp_path / "p.json")
    loaded = P.load(path)
    assert loaded.attention == policy.attention
    with apply_policy(pipe, loaded) as h:
        run_pipe(pipe, FAMILY, steps=STEPS)
        stats = h.stats()
    assert stats.attention_installed and sum(stats.attention_calls.values()) == 2 * 2 * STEPS
