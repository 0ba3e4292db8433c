"""Temporal Delta Cache knobs: tdc.cache_dtype float8_e4m3fn, tdc.extrapolate, tdc.refresh_robust, tdc.blocks."""

from __future__ import annotations

import pytest
import torch
from rt_helpers import BlockRecorder, get_pipe, run_pipe

from sixbit_tune.formats import fp8
from sixbit_tune.models.adapters import get_adapter
from sixbit_tune.runtime import apply_policy, make_dynamic_policy, make_static_policy


def _contexts(pipe) -> list[str]:
    return ["cond", "uncond"] if get_adapter(pipe).cfg_mode == "separate" else ["cond_uncond"]


def _calls_by_step(rec: BlockRecorder, contexts: list[str], n_blocks: int):
    """(context, step, block call) for every recorded block call (calls come as steps × contexts × blocks)."""
    calls = [rec.calls[i : i + n_blocks] for i in range(0, len(rec.calls), n_blocks)]
    for k, blocks in enumerate(calls):
        for c in blocks:
            yield contexts[k % len(contexts)], k // len(contexts), c


def _fp8_round_trip(d: torch.Tensor) -> torch.Tensor:
    """What an FP8 cache gives back for ``d``: E4M3 codes with one scale per token, dequantized to float32."""
    q, s = fp8.quantize(d, -1)
    return fp8.dequantize(q, s, -1, torch.float32)


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
@pytest.mark.parametrize("cache_dtype", ["float32", "float8_e4m3fn"])
@pytest.mark.parametrize("extrapolate", [0, 1])
def test_skipped_block_returns_input_plus_the_stored_or_extrapolated_delta(family, cache_dtype, extrapolate):
    """Each stream of a skipped block at step t (last computed at s, before that at p) is exactly
    X + D_s (extrapolate 0) or X + (D_s + (D_s - D_p) * (t - s) / (s - p)) (extrapolate 1), with D = Δ for a float32
    cache and Δ through FP8 E4M3 with a per-token scale for a float8_e4m3fn cache."""
    pipe = get_pipe(family)
    adapter = get_adapter(pipe)
    n_blocks = len(adapter.blocks())
    contexts = _contexts(pipe)
    # max_skips 2: skips one and two steps after a computation, and computations 1 and 3 steps apart.
    policy = make_static_policy(pipe, "none", 1e9, warmup=2, cooldown=1, max_skips=2, cache_dtype=cache_dtype,
                                extrapolate=extrapolate)
    with apply_policy(pipe, policy):
        rec = BlockRecorder(pipe)
        run_pipe(pipe, family, steps=9)
        rec.remove()
    stored = _fp8_round_trip if cache_dtype == "float8_e4m3fn" else (lambda d: d)
    history: dict[tuple[str, int], list[tuple[int, tuple]]] = {}
    checked, seen_gaps, differs_from_last = 0, set(), False
    for ctx, t, c in _calls_by_step(rec, contexts, n_blocks):
        key = (ctx, c["block"])
        if c["ran"]:
            history.setdefault(key, []).append((t, tuple(stored(y - x) for x, y in zip(c["xs"], c["ys"]))))
            continue
        (p, d_p), (s, d_s) = history[key][-2:]
        for x, y, a, b in zip(c["xs"], c["ys"], d_s, d_p):
            expected = x + (a + (a - b) * ((t - s) / (s - p))) if extrapolate else x + a
            assert torch.equal(y, expected), (ctx, t, c["block"])
            differs_from_last |= not torch.equal(y, x + a)
        seen_gaps.add((t - s, s - p))
        checked += 1
    assert checked > 0
    assert {(1, 1), (2, 1), (1, 3), (2, 3)} <= seen_gaps
    assert differs_from_last == bool(extrapolate)


def test_forced_skip_without_an_earlier_delta_returns_the_last_delta():
    """Extrapolation needs two computations; a skip forced after the first returns X + Δ of that one."""
    pipe = get_pipe("wan")
    n_blocks = len(get_adapter(pipe).blocks())
    contexts = _contexts(pipe)
    policy = make_static_policy(pipe, "none", 1e-12, warmup=0, cooldown=0, max_skips=3, cache_dtype="float32",
                                extrapolate=1)
    maps = {c: [[False] * n_blocks, [True] * n_blocks, [True] * n_blocks] for c in contexts}
    with apply_policy(pipe, policy) as h:
        h.force_skips(maps)
        rec = BlockRecorder(pipe)
        run_pipe(pipe, "wan", steps=4)
        rec.remove()
    delta0 = {}
    checked = 0
    for ctx, t, c in _calls_by_step(rec, contexts, n_blocks):
        assert c["ran"] == (t in (0, 3)), (ctx, t)
        if t == 0:
            delta0[(ctx, c["block"])] = tuple(y - x for x, y in zip(c["xs"], c["ys"]))
        elif t in (1, 2):
            for x, y, d in zip(c["xs"], c["ys"], delta0[(ctx, c["block"])]):
                assert torch.equal(y, x + d)
            checked += 1
    assert checked == 2 * len(contexts) * n_blocks


def _one_block_cache_run(cache_dtype: str, extrapolate: int = 0, blocks=(1,)):
    pipe = get_pipe("cogvideox")
    policy = make_static_policy(pipe, "int8", 1e9, warmup=2, cooldown=1, max_skips=2, cache_dtype=cache_dtype,
                                blocks=list(blocks), extrapolate=extrapolate)
    with apply_policy(pipe, policy) as h:
        rec = BlockRecorder(pipe)
        out = run_pipe(pipe, "cogvideox", steps=6, prompts=["a cat"])
        rec.remove()
        stats = h.stats()
    return out, stats, rec


def test_fp8_cache_holds_about_half_the_bytes_of_bf16_and_changes_the_output_a_little():
    out32, s32, rec = _one_block_cache_run("float32")
    out16, s16, _ = _one_block_cache_run("bfloat16")
    out8, s8, _ = _one_block_cache_run("float8_e4m3fn")
    xs = next(c for c in rec.calls if c["block"] == 1)["xs"]
    elems = sum(x.numel() for x in xs)
    tokens = sum(x[..., 0].numel() for x in xs)  # one float32 scale per token (per slice of the last dim)
    assert s16.cache_bytes == 2 * elems
    assert s8.cache_bytes == elems + 4 * tokens
    # Half of bf16 plus 4 bytes per token: 0.5 * (1 + 4 / C) of it for hidden size C (0.5625 at this model's 32).
    assert s8.cache_bytes < 0.6 * s16.cache_bytes
    assert s8.skipped_blocks == s16.skipped_blocks == s32.skipped_blocks > 0
    # The same skips; the output moves by about the storage error of the cache, FP8 more than bf16.
    err16 = (torch.linalg.vector_norm(out16 - out32) / torch.linalg.vector_norm(out32)).item()
    err8 = (torch.linalg.vector_norm(out8 - out32) / torch.linalg.vector_norm(out32)).item()
    assert 0 < err16 < err8 < 0.05, (err16, err8)
    # Extrapolation keeps a second Δ per block: twice the bytes.
    _, s8x, _ = _one_block_cache_run("float8_e4m3fn", extrapolate=1)
    assert s8x.cache_bytes == 2 * s8.cache_bytes


def test_blocks_outside_tdc_blocks_allocate_no_cache():
    pipe = get_pipe("cogvideox")
    _, one, rec = _one_block_cache_run("float8_e4m3fn", blocks=(1,))
    _, both, _ = _one_block_cache_run("float8_e4m3fn", blocks=(0, 1))
    assert both.cache_bytes == 2 * one.cache_bytes  # the two blocks' streams have the same shapes
    _, none, _ = _one_block_cache_run("float8_e4m3fn", blocks=())
    assert none.cache_bytes == 0 and none.skipped_blocks == 0
    assert len(get_adapter(pipe).blocks()) == 2


@pytest.mark.parametrize("refresh", [0, 1])
def test_refresh_after_a_skip_takes_the_robust_route(refresh):
    """τ = +inf puts every dynamic layer on NVFP4 after the first step; with tdc.refresh_robust the computation
    right after a (forced) skip runs the block's dynamic layers in INT8."""
    pipe = get_pipe("wan")
    adapter = get_adapter(pipe)
    n_blocks = len(adapter.blocks())
    names = list(adapter.all_linears())
    dynamic = names[::2]
    per_block = [sum(n.startswith(f"{ref.name}.") for n in dynamic) for ref in adapter.blocks()]
    policy = make_dynamic_policy(pipe, {n: (1.0, 0.0, None, None) for n in dynamic}, float("inf"),
                                 other_layers="none", tdc_tolerance=1e-12, warmup=0, cooldown=0, max_skips=2,
                                 cache_dtype="float32", refresh_robust=refresh)
    skip_block0_at_2 = [[False] * n_blocks, [False] * n_blocks, [True] + [False] * (n_blocks - 1)]
    with apply_policy(pipe, policy) as h:
        h.force_skips({c: skip_block0_at_2 for c in _contexts(pipe)})
        run_pipe(pipe, "wan", steps=5)
        steps = h.stats().steps
    for s in steps:
        if s.step == 0:
            expected_int8 = sum(per_block)  # the first-step format
        elif s.step == 3:
            expected_int8 = per_block[0] if refresh else 0  # block 0's first computation after its skip
        else:
            expected_int8 = 0
        assert s.layer_calls["int8"] == expected_int8, (s.context, s.step, s.layer_calls)
        assert s.skipped_blocks == (1 if s.step == 2 else 0)


def test_compiled_statistics_store_the_same_fp8_cache():
    """``compile_stats=True`` fuses the FP8 encoding of Δ with the statistics: same skips, bytes and output."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pipe = get_pipe("hunyuanvideo")  # dual-stream blocks: two cached streams per block
    policy = make_static_policy(pipe, "int8", 1e9, warmup=2, cooldown=1, max_skips=2, cache_dtype="float8_e4m3fn",
                                extrapolate=1)
    runs = {}
    for fused in (False, True):
        with apply_policy(pipe, policy, compile_stats=fused) as h:
            runs[fused] = (run_pipe(pipe, "hunyuanvideo", steps=6), h.stats())
    assert counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    (eager, es), (got, fs) = runs[False], runs[True]
    assert not any("torch.compile failed" in n for n in fs.notes), fs.notes
    assert es.skipped_blocks > 0 and fs.steps == es.steps and fs.cache_bytes == es.cache_bytes
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-5)
