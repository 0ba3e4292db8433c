"""Blocks compile with ``torch.compile`` after a policy is applied (regional compilation, CPU)."""

from __future__ import annotations

import pytest
import torch
from rt_helpers import get_pipe, run_pipe
from torch._dynamo.utils import counters

from sixbit_tune.models.adapters import get_adapter
from sixbit_tune.runtime import apply_policy, make_dynamic_policy


def _policy(pipe):
    names = list(get_adapter(pipe).all_linears())
    return make_dynamic_policy(pipe, {n: (1.0, 0.0, None, None) for n in names[::2]}, 0.5, other_layers="int8",
                               tdc_tolerance=1.0, warmup=0, cooldown=0, cache_dtype="float32")


def _compile_blocks(pipe, backend):
    for ref in get_adapter(pipe).blocks():
        ref.module.compile(backend=backend)


def _uncompile_blocks(pipe):
    for ref in get_adapter(pipe).blocks():
        ref.module.__dict__.pop("_compiled_call_impl", None)


def test_compiled_blocks_give_the_eager_result_and_break_only_at_the_runtime_boundaries():
    torch._dynamo.reset()
    counters.clear()
    pipe = get_pipe("wan")
    plain = run_pipe(pipe, "wan", steps=3)
    try:
        with apply_policy(pipe, _policy(pipe)) as h:
            eager = run_pipe(pipe, "wan", steps=3)
            eager_stats = h.stats()
            _compile_blocks(pipe, "eager")
            compiled = run_pipe(pipe, "wan", steps=3)
            compiled_stats = h.stats()
        assert counters["stats"]["unique_graphs"] > 0, "dynamo compiled nothing"
        assert torch.equal(compiled, eager)
        assert compiled_stats.steps == eager_stats.steps and compiled_stats.skipped_blocks > 0
        reasons = list(counters["graph_break"])
        allowed = ("Controller.block_begin", "Controller.block_end",
                   "Tensor.item()")  # the last: formats' finiteness check on the CPU reference path
        assert all(any(a in r for a in allowed) for r in reasons), reasons
        # Removing the policy under a compiled block restores the plain model's output.
        assert torch.equal(run_pipe(pipe, "wan", steps=3), plain)
    finally:
        _uncompile_blocks(pipe)


@pytest.mark.slow
def test_inductor_compiled_blocks_match_eager():
    torch._dynamo.reset()
    pipe = get_pipe("cogvideox")
    try:
        with apply_policy(pipe, _policy(pipe)) as h:
            eager = run_pipe(pipe, "cogvideox", steps=2)
            eager_stats = h.stats()
            _compile_blocks(pipe, "inductor")
            compiled = run_pipe(pipe, "cogvideox", steps=2)
            compiled_stats = h.stats()
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
        assert compiled_stats.steps == eager_stats.steps
    finally:
        _uncompile_blocks(pipe)


@pytest.mark.parametrize("family", ["wan", "hunyuanvideo"])  # one stream; two (HunyuanVideo's dual-stream blocks)
def test_compiled_statistics_make_the_same_decisions(family):
    """``compile_stats=True`` (inductor fuses Γ, the change of Δ and the cache cast) against the eager statistics:
    same skip and format decisions at every step, same video up to float32 reduction order."""
    torch._dynamo.reset()
    counters.clear()
    pipe = get_pipe(family)
    policy = _policy(pipe)
    with apply_policy(pipe, policy) as h:
        eager = run_pipe(pipe, family, steps=5)
        eager_stats = h.stats()
    with apply_policy(pipe, policy, compile_stats=True) as h:
        fused = run_pipe(pipe, family, steps=5)
        fused_stats = h.stats()
    assert counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    assert eager_stats.skipped_blocks > 0 and 0 < eager_stats.nvfp4_share < 1  # both rules are exercised
    assert not any("torch.compile failed" in n for n in fused_stats.notes), fused_stats.notes
    assert fused_stats.steps == eager_stats.steps
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_compiled_statistics_make_the_same_decisions_on_cuda():
    from sixbit_tune.models.tiny import tiny_pipeline

    torch._dynamo.reset()
    pipe = tiny_pipeline("wan").to("cuda")
    policy = _policy(pipe)
    runs = {}
    for fused in (False, True):
        with apply_policy(pipe, policy, compile_stats=fused) as h:
            runs[fused] = (run_pipe(pipe, "wan", steps=5), h.stats())
    assert not any("torch.compile failed" in n for n in runs[True][1].notes), runs[True][1].notes
    assert runs[False][1].skipped_blocks > 0
    assert runs[True][1].steps == runs[False][1].steps
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-4, atol=1e-5)


def test_a_failed_statistics_compile_falls_back_to_eager_and_says_so(monkeypatch):
    """A compiler that cannot build the fused statistics (simulated: the compiled callable raises) must cost
    nothing but speed: a warning, a note in the run's statistics, and the eager decisions."""
    import sixbit_tune.stats as stats_mod

    def broken_compile(fn):
        def compiled(*args):
            raise RuntimeError("no C++ compiler")
        return compiled

    pipe = get_pipe("wan")
    policy = _policy(pipe)
    with apply_policy(pipe, policy) as h:
        eager = run_pipe(pipe, "wan", steps=4)
        eager_stats = h.stats()
    monkeypatch.setattr(stats_mod.torch, "compile", broken_compile)
    with apply_policy(pipe, policy, compile_stats=True) as h:
        with pytest.warns(UserWarning, match="torch.compile of measure_block failed, using eager"):
            got = run_pipe(pipe, "wan", steps=4)
        st = h.stats()
    assert any("block statistics ran eager: torch.compile failed (RuntimeError: no C++ compiler)" in n
               for n in st.notes), st.notes
    assert st.steps == eager_stats.steps and torch.equal(got, eager)


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _dynamic_block_routes(backend: str, device: str, preference: str) -> None:
    """A block whose in-block linears are quantized layers (dynamic NVFP4-stored: W4A4 fast, W4A8 robust; the others
    static INT8) compiles with ``fullgraph=True``; setting the dynamic layers' routes between calls gives each
    route's eager output and compiles nothing new."""
    from sixbit_tune.models.tiny import tiny_transformer, tiny_transformer_inputs
    from sixbit_tune.runtime._backend import Backend
    from sixbit_tune.runtime.linear import MixedPrecisionLinear

    torch._dynamo.reset()
    counters.clear()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = tiny_transformer("wan").to(device, dtype)
    inputs = tiny_transformer_inputs("wan", batch=2, device=device, dtype=dtype)
    backend_ = Backend(preference)
    blocks = [ref.module for ref in get_adapter(model).blocks()]
    dynamic = []
    for block in blocks:
        linears = [(n, m) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
        for i, (name, lin) in enumerate(linears):
            parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
            if i % 2 == 0 and lin.in_features % 16 == 0:
                layer = MixedPrecisionLinear(lin, "dynamic", backend_, weight="nvfp4")
                dynamic.append(layer)
            else:
                layer = MixedPrecisionLinear(lin, "fast", backend_, weight="int8")
            setattr(parent, name.rpartition(".")[2], layer)
    assert len(dynamic) >= 4

    def run(routes):
        for layer, route in zip(dynamic, routes):
            layer.route = route
        with torch.no_grad():
            return model(**inputs)[0].float()

    settings = [["fast"] * len(dynamic), ["robust"] * len(dynamic),
                ["fast" if i % 3 else "robust" for i in range(len(dynamic))]]
    eager = [run(r) for r in settings]
    assert not torch.equal(eager[0], eager[1])
    between_routes = _rel_rms(eager[0], eager[1])

    def check(got, want):
        if backend == "eager":
            assert torch.equal(got, want)
        elif device == "cpu":
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        else:
            # bf16 on CUDA: inductor's fusions round differently from eager, which moves the odd activation across a
            # quantization boundary (on the H200 one of 4096 outputs differed by 0.022); the compiled output must be
            # far closer to its own routes' eager output than the two routes are to each other.
            assert _rel_rms(got, want) < 0.1 * between_routes, (_rel_rms(got, want), between_routes)

    for block in blocks:
        block.compile(backend=backend, fullgraph=True)
    try:
        for routes, want in zip(settings, eager):
            check(run(routes), want)
        graphs = counters["stats"]["unique_graphs"]
        assert 0 < graphs <= len(blocks), graphs  # blocks of one class may share one compiled graph
        for routes, want in zip(settings[::-1], eager[::-1]):
            check(run(routes), want)
        assert counters["stats"]["unique_graphs"] == graphs  # no recompilation for other routes
        assert not counters["graph_break"]
    finally:
        for block in blocks:
            block.__dict__.pop("_compiled_call_impl", None)
    # The route flag, the host-side predicate, stays on the CPU whatever device the model is on.
    assert all(layer._fast_flag.device.type == "cpu" for layer in dynamic)


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_dynamic_layers_trace_into_one_graph_and_switch_routes_without_recompiling(backend):
    _dynamic_block_routes(backend, "cpu", "reference")


@pytest.mark.gpu
def test_dynamic_layers_trace_into_one_graph_on_cuda():
    _dynamic_block_routes("inductor", "cuda", "auto")
