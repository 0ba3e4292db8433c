"""The ways users compile, before or after apply_policy: torch.compile(transformer), transformer.compile(),
block.compile(), diffusers' compile_repeated_blocks() all compile and keep the policy's decisions; a block forward
replaced by a compiled function after apply_policy bypasses the policy and is warned about once."""

from __future__ import annotations

import warnings

import pytest
import torch
from rt_helpers import get_pipe, run_pipe

from sixbit_tune.models.adapters import get_adapter
from sixbit_tune.runtime import apply_policy, make_dynamic_policy

FAMILY = "wan"


def _policy(pipe):
    names = list(get_adapter(pipe).all_linears())
    return make_dynamic_policy(pipe, {n: (1.0, 0.0, None, None) for n in names[::2]}, 0.5, other_layers="int8",
                               tdc_tolerance=1.0, warmup=0, cooldown=0, cache_dtype="float32")


class _Backend:
    """A torch.compile backend that runs the captured graphs as they are and keeps them."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def targets(self) -> list[str]:
        return [str(n.target) for g in self.graphs for n in g.graph.nodes if n.op.startswith("call_")]


def _compile(pipe, way, backend):
    t = pipe.transformer
    blocks = [r.module for r in get_adapter(t).blocks()]
    if way == "torch.compile(transformer)":
        pipe.transformer = torch.compile(t, backend=backend)
    elif way == "transformer.compile()":
        t.compile(backend=backend)
    elif way == "block.compile()":
        for b in blocks:
            b.compile(backend=backend)
    elif way == "compile_repeated_blocks()":
        t.compile_repeated_blocks(backend=backend)
    else:  # a compiled function assigned as the block's forward
        for b in blocks:
            b.forward = torch.compile(type(b).forward.__get__(b), backend=backend)


def _uncompile(pipe, transformer):
    pipe.transformer = transformer
    for m in transformer.modules():
        m.__dict__.pop("_compiled_call_impl", None)
    for r in get_adapter(transformer).blocks():
        r.module.__dict__.pop("forward", None)
    torch._dynamo.reset()


WAYS = ["torch.compile(transformer)", "transformer.compile()", "block.compile()", "compile_repeated_blocks()"]


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("way", WAYS)
def test_supported_compilation_in_either_order_compiles_and_keeps_the_policy(way, order):
    pipe = get_pipe(FAMILY)
    transformer = pipe.transformer
    policy = _policy(pipe)
    with apply_policy(pipe, policy) as h:
        eager = [run_pipe(pipe, FAMILY, steps=3, seed=s) for s in (0, 1)]
        eager_stats = h.stats()
    torch._dynamo.reset()
    backend = _Backend()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no bypass warning
            if order == "before":
                _compile(pipe, way, backend)
            h = apply_policy(pipe, policy)
            if order == "after":
                _compile(pipe, way, backend)
            got = [run_pipe(pipe, FAMILY, steps=3, seed=s) for s in (0, 1)]
        stats = h.stats()
        h.remove()
        assert all(torch.equal(a, b) for a, b in zip(got, eager))
        assert stats.steps == eager_stats.steps and stats.skipped_blocks > 0
        targets = backend.targets()
        assert any("linear" in t for t in targets), "no block code was compiled"
        if "transformer" in way:  # submodules outside the blocks compile too: the rotary embedding's sin/cos
            assert any("sin" in t for t in targets) and any("cos" in t for t in targets), targets
    finally:
        _uncompile(pipe, transformer)


def test_block_forward_replaced_after_apply_bypasses_the_policy_and_warns_once():
    pipe = get_pipe(FAMILY)
    transformer = pipe.transformer
    try:
        with apply_policy(pipe, _policy(pipe)) as h:
            _compile(pipe, "block.forward = torch.compile(...)", _Backend())
            with pytest.warns(RuntimeWarning, match=r"blocks blocks\.0, blocks\.1 ran without the policy") as rec:
                run_pipe(pipe, FAMILY, steps=3)
                run_pipe(pipe, FAMILY, steps=3)
            assert sum("ran without the policy" in str(w.message) for w in rec) == 1
            stats = h.stats()
            assert stats.block_calls == 0 and any("block.compile()" in n for n in stats.notes)
    finally:
        _uncompile(pipe, transformer)
