"""Temporal Delta Cache: tolerance 0, window, cap, X + cached Δ per stream and per branch, tdc.blocks, cache bytes."""

from __future__ import annotations

import pytest
import torch
from rt_helpers import BlockRecorder, get_pipe, run_pipe

from sixbit_tune.models.adapters import get_adapter
from sixbit_tune.runtime import apply_policy, make_static_policy


def _skips_by_context(rec: BlockRecorder, contexts: list[str], n_blocks: int) -> dict[str, list[list[bool]]]:
    """skipped[context][step][block] from the recorder (calls come as steps × contexts × blocks)."""
    out: dict[str, list[list[bool]]] = {c: [] for c in contexts}
    calls = [rec.calls[i : i + n_blocks] for i in range(0, len(rec.calls), n_blocks)]
    for k, blocks in enumerate(calls):
        out[contexts[k % len(contexts)]].append([not c["ran"] for c in blocks])
    return out


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_tolerance_zero_never_skips_and_equals_dmpq_alone(family):
    pipe = get_pipe(family)
    with apply_policy(pipe, make_static_policy(pipe, "int8")) as h:
        alone = run_pipe(pipe, family, steps=6)
    policy = make_static_policy(pipe, "int8", 0.0, warmup=0, cooldown=0, max_skips=10)
    with apply_policy(pipe, policy) as h:
        got = run_pipe(pipe, family, steps=6)
        stats = h.stats()
    assert torch.equal(got, alone)
    assert stats.skipped_blocks == 0 and stats.skip_share == 0.0
    assert stats.cache_bytes == 0  # nothing cached when nothing can be skipped


@pytest.mark.parametrize("family,warmup,cooldown,max_skips", [("cogvideox", 2, 1, 2), ("wan", 1, 2, 1), ("ltx", 0, 0, 3)])
def test_large_tolerance_skips_only_in_window_and_at_most_max_skips_in_a_row(family, warmup, cooldown, max_skips):
    pipe = get_pipe(family)
    steps = 10
    adapter = get_adapter(pipe)
    n_blocks = len(adapter.blocks())
    contexts = ["cond", "uncond"] if adapter.cfg_mode == "separate" else ["cond_uncond"]
    policy = make_static_policy(pipe, "none", 1e9, warmup=warmup, cooldown=cooldown, max_skips=max_skips,
                                cache_dtype="float32")
    with apply_policy(pipe, policy) as h:
        rec = BlockRecorder(pipe)
        run_pipe(pipe, family, steps=steps)
        rec.remove()
        stats = h.stats()
    skipped = _skips_by_context(rec, contexts, n_blocks)
    for ctx, per_step in skipped.items():
        assert len(per_step) == steps
        for t, row in enumerate(per_step):
            if t < max(warmup, 2) or t >= steps - cooldown:  # 2: a skip needs two full computations first
                assert not any(row), (ctx, t)
        for b in range(n_blocks):
            pattern = [per_step[t][b] for t in range(steps)]
            # With an unbounded tolerance the block skips whenever allowed: exactly max_skips in a row, then one
            # full computation, inside the window.
            expected, run = [], 0
            for t in range(steps):
                can = max(warmup, 2) <= t < steps - cooldown and run < max_skips
                expected.append(can)
                run = run + 1 if can else 0
            assert pattern == expected, (ctx, b, pattern)
    n_skipped = sum(sum(sum(r) for r in v) for v in skipped.values())
    assert stats.skipped_blocks == n_skipped > 0
    assert stats.block_calls == steps * len(contexts) * n_blocks
    assert [s.skipped_blocks for s in stats.steps] == [sum(skipped[s.context][s.step]) for s in stats.steps]


@pytest.mark.parametrize("family", ["cogvideox", "wan", "hunyuanvideo"])
def test_skipped_block_returns_input_plus_cached_delta_of_its_own_branch(family):
    """Every stream of a skipped block is X + Δ of the same block's last full computation in the same context."""
    pipe = get_pipe(family)
    adapter = get_adapter(pipe)
    n_blocks = len(adapter.blocks())
    contexts = ["cond", "uncond"] if adapter.cfg_mode == "separate" else ["cond_uncond"]
    policy = make_static_policy(pipe, "int8", 1e9, warmup=2, cooldown=1, max_skips=2, cache_dtype="float32")
    with apply_policy(pipe, policy):
        rec = BlockRecorder(pipe)
        run_pipe(pipe, family, steps=6, prompts=["a cat", "a red car"])
        rec.remove()
    checked = 0
    last: dict[tuple[str, int], tuple] = {}
    calls = [rec.calls[i : i + n_blocks] for i in range(0, len(rec.calls), n_blocks)]
    for k, blocks in enumerate(calls):
        ctx = contexts[k % len(contexts)]
        for c in blocks:
            key = (ctx, c["block"])
            if c["ran"]:
                last[key] = tuple(y - x for x, y in zip(c["xs"], c["ys"]))
            else:
                deltas = last[key]
                assert len(c["ys"]) == len(deltas) == len(adapter.blocks()[c["block"]].streams)
                for x, y, d in zip(c["xs"], c["ys"], deltas):
                    assert torch.equal(y, x + d), (ctx, k, c["block"])
                checked += 1
    assert checked > 0


def test_cache_dtype_and_blocks_knobs_and_cache_bytes():
    pipe = get_pipe("cogvideox")
    adapter = get_adapter(pipe)
    n_blocks = len(adapter.blocks())
    policy = make_static_policy(pipe, "int8", 1e9, warmup=2, cooldown=1, max_skips=2, cache_dtype="bfloat16",
                                blocks=[1])
    with apply_policy(pipe, policy) as h:
        rec = BlockRecorder(pipe)
        run_pipe(pipe, "cogvideox", steps=6, prompts=["a cat"])
        rec.remove()
        stats = h.stats()
    skipped = _skips_by_context(rec, ["cond_uncond"], n_blocks)["cond_uncond"]
    assert not any(row[0] for row in skipped), "block 0 is not in tdc.blocks"
    assert any(row[1] for row in skipped)
    # Peak cache: one Δ of block 1 (both streams, both CFG rows) in bfloat16.
    c = next(c for c in rec.calls if c["block"] == 1)
    assert stats.cache_bytes == sum(x.numel() for x in c["xs"]) * 2


def test_unknown_step_count_disables_skipping_with_a_note_until_told():
    """A bare CogVideoX transformer is called without num_inference_steps in its cache context."""
    pipe = get_pipe("cogvideox")
    policy = make_static_policy(pipe, "none", 1e9, warmup=1, cooldown=1, max_skips=2)
    with apply_policy(pipe.transformer, policy) as h:
        run_pipe(pipe, "cogvideox", steps=6)
        stats = h.stats()
        assert stats.skipped_blocks == 0
        assert any("number of denoising steps is unknown" in n for n in stats.notes)
        h.num_inference_steps = 6
        run_pipe(pipe, "cogvideox", steps=6)
        told = h.stats()
    with apply_policy(pipe, policy) as h:
        run_pipe(pipe, "cogvideox", steps=6)
        via_pipe = h.stats()
    assert told.skipped_blocks > 0 and not told.notes
    assert [s.skipped_blocks for s in told.steps] == [s.skipped_blocks for s in via_pipe.steps]
    assert via_pipe.num_inference_steps == 6


def _expected_skips(rec, contexts, n_blocks, steps, tol, warmup, cooldown, max_skips):
    """Replay the TDC rule on the recorded run (float64, computed here): per context and block, the measured
    per-step change between the last two full computations, accumulated over skipped steps. Returns the expected
    skip flags and the smallest distance |accumulated − δ| met in a decision (to check τ is not on a knife edge)."""
    calls = [rec.calls[i : i + n_blocks] for i in range(0, len(rec.calls), n_blocks)]
    state = {}
    expected, margin = [], float("inf")
    for k, blocks in enumerate(calls):
        ctx, t = contexts[k % len(contexts)], k // len(contexts)
        row = []
        for c in blocks:
            s = state.setdefault((ctx, c["block"]), {"deltas": [], "acc": None, "run": 0})
            skip = False
            if warmup <= t < steps - cooldown and len(s["deltas"]) >= 2 and s["run"] < max_skips:
                (t0, d0), (t1, d1) = s["deltas"][-2:]
                num = torch.linalg.vector_norm((d1 - d0).reshape(d1.shape[0], -1), dim=1)
                den = torch.linalg.vector_norm(d0.reshape(d0.shape[0], -1), dim=1)
                rate = (num / den / (t1 - t0)).tolist()
                acc = [a + r for a, r in zip(s["acc"] or [0.0] * len(rate), rate)]
                margin = min(margin, *(abs(a - tol) for a in acc))
                skip = all(a <= tol for a in acc)
                if skip:
                    s["acc"], s["run"] = acc, s["run"] + 1
            if not skip:
                s["acc"], s["run"] = None, 0
                d = torch.cat([(y.double() - x.double()).reshape(x.shape[0], -1) for x, y in zip(c["xs"], c["ys"])], 1)
                s["deltas"].append((t, d))
            row.append(skip)
        expected.append(row)
    return expected, margin


@pytest.mark.parametrize("family,tol", [("wan", 0.35), ("mochi", 0.3), ("ltx", 0.17)])
def test_skip_decisions_follow_the_accumulated_change_rule(family, tol):
    pipe = get_pipe(family)
    adapter = get_adapter(pipe)
    n_blocks = len(adapter.blocks())
    contexts = ["cond", "uncond"] if adapter.cfg_mode == "separate" else ["cond_uncond"]
    steps, warmup, cooldown, max_skips = 12, 2, 1, 3
    policy = make_static_policy(pipe, "int8", tol, warmup=warmup, cooldown=cooldown, max_skips=max_skips,
                                cache_dtype="float32")
    with apply_policy(pipe, policy):
        rec = BlockRecorder(pipe)
        run_pipe(pipe, family, steps=steps, prompts=["a cat", "a dog"])
        rec.remove()
    got = [[not c["ran"] for c in rec.calls[i : i + n_blocks]] for i in range(0, len(rec.calls), n_blocks)]
    expected, margin = _expected_skips(rec, contexts, n_blocks, steps, tol, warmup, cooldown, max_skips)
    assert margin > 1e-4, f"δ={tol} is too close to an accumulated change ({margin}); pick another δ"
    assert got == expected
    flat = [s for row in got for s in row]
    assert any(flat) and not all(flat[n_blocks * len(contexts) * warmup :]), "δ should skip some calls, not all"
