"""PolicyHandle.record_skips / force_skips: the public way for benchmarks to read and impose the cache's decisions."""

from __future__ import annotations

import pytest
import torch
from rt_helpers import BlockRecorder, get_pipe, run_pipe

from sixbit_tune.models.adapters import get_adapter
from sixbit_tune.runtime import apply_policy, make_static_policy


def _observed(rec: BlockRecorder, contexts: list[str], n_blocks: int) -> dict[str, dict[int, list[bool]]]:
    """{context: {step: [block body did not run]}} from the recorder (calls come as steps × contexts × blocks)."""
    out: dict[str, dict[int, list[bool]]] = {c: {} for c in contexts}
    calls = [rec.calls[i : i + n_blocks] for i in range(0, len(rec.calls), n_blocks)]
    for k, blocks in enumerate(calls):
        out[contexts[k % len(contexts)]][k // len(contexts)] = [not c["ran"] for c in blocks]
    return out


def _contexts(pipe) -> list[str]:
    return ["cond", "uncond"] if get_adapter(pipe).cfg_mode == "separate" else ["cond_uncond"]


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_record_skips_is_what_ran(family):
    pipe = get_pipe(family)
    n_blocks = len(get_adapter(pipe).blocks())
    contexts = _contexts(pipe)
    policy = make_static_policy(pipe, "int8", 1e9, warmup=1, cooldown=1, max_skips=1, cache_dtype="float32")
    with apply_policy(pipe, policy) as h:
        record = h.record_skips()
        assert record == {}
        rec = BlockRecorder(pipe)
        run_pipe(pipe, family, steps=6)
        rec.remove()
        stats = h.stats()
    assert record == _observed(rec, contexts, n_blocks)
    assert sum(sum(r) for per in record.values() for r in per.values()) == stats.skipped_blocks > 0


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_force_skips_imposes_the_map_where_a_cache_exists(family):
    pipe = get_pipe(family)
    n_blocks = len(get_adapter(pipe).blocks())
    contexts = _contexts(pipe)
    steps = 6
    # A tiny tolerance: the runtime keeps every block's Δ but its own rule skips nothing.
    policy = make_static_policy(pipe, "int8", 1e-12, warmup=0, cooldown=0, max_skips=1, cache_dtype="float32")
    # Every other block from step 0 on (step 0 has no cache: nothing skipped there); the map stops one step short.
    maps = {c: [[(t + b + k) % 2 == 0 for b in range(n_blocks)] for t in range(steps - 1)]
            for k, c in enumerate(contexts)}
    with apply_policy(pipe, policy) as h:
        plain = run_pipe(pipe, family, steps=steps)
        assert h.stats().skipped_blocks == 0
        record = h.record_skips()
        h.force_skips(maps)
        rec = BlockRecorder(pipe)
        forced = run_pipe(pipe, family, steps=steps)
        rec.remove()
        stats = h.stats()
        observed = _observed(rec, contexts, n_blocks)
        expected = {c: {t: [t >= 1 and t < steps - 1 and maps[c][t][b] for b in range(n_blocks)]
                        for t in range(steps)} for c in contexts}
        assert observed == expected
        assert record == expected
        assert stats.skipped_blocks == sum(sum(r) for per in expected.values() for r in per.values()) > 0
        assert not torch.equal(forced, plain)
        # None clears: the runtime's own decisions again.
        h.force_skips(None)
        assert torch.equal(run_pipe(pipe, family, steps=steps), plain)
        assert h.stats().skipped_blocks == 0


def test_force_skips_unknown_context_names_the_known_ones():
    pipe = get_pipe("wan")
    policy = make_static_policy(pipe, "int8", 1e-12, warmup=0, cooldown=0, max_skips=1)
    with apply_policy(pipe, policy) as h:
        h.force_skips({"cond": [[True, True]], "positive": [[True, True]]})
        with pytest.raises(KeyError, match=r"'uncond'.*\['cond', 'positive'\]"):
            run_pipe(pipe, "wan", steps=3)
        with pytest.raises(TypeError):
            h.force_skips({"cond": "1010"})
        with pytest.raises(TypeError):
            h.force_skips([[True]])
        h.force_skips(None)
        run_pipe(pipe, "wan", steps=3)
        assert h.stats().completed
