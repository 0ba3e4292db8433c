"""Recording hooks on the tiny diffusers models: outputs unchanged, statistics equal to direct computations,
CFG rows labelled with the right branch, clean removal."""

from __future__ import annotations

import math

import pytest
import torch

from sixbit_tune import formats
from sixbit_tune.models.adapters import get_adapter
from sixbit_tune.models.tiny import (
    tiny_pipeline,
    tiny_pipeline_call_kwargs,
    tiny_transformer,
    tiny_transformer_inputs,
)
from sixbit_tune.profiling.hooks import HOOK_NAME, instrument
from sixbit_tune.routes import PROFILE_DEFAULT_ROUTES, PROFILE_ROUTES, profile_route

FAMILIES = ["cogvideox", "wan", "hunyuanvideo", "ltx", "mochi"]


def _run(model, family, batch=2, seed=0, context="cond_uncond"):
    kwargs = tiny_transformer_inputs(family, batch=batch, seed=seed)
    with torch.no_grad():
        if context is None:
            return model(**kwargs)[0]
        with model.cache_context(context):
            return model(**kwargs)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_transformer_output_bit_identical_while_recording_and_after_removal(family):
    model = tiny_transformer(family)
    context = "cond_uncond" if get_adapter(model).cfg_mode == "batched" else "cond"
    batch = 2 if context == "cond_uncond" else 1
    plain = _run(model, family, batch, context=context)
    inst = instrument(model)
    recorded = _run(model, family, batch, context=context)
    recs = inst.flush(0, [0])
    inst.remove()
    after = _run(model, family, batch, context=context)
    assert torch.equal(plain, recorded) and torch.equal(plain, after)
    n_blocks = len(get_adapter(model).blocks())
    assert len(recs.blocks["step"]) == n_blocks * batch
    assert len(recs.layers["step"]) == len(inst.layer_names) * len(PROFILE_DEFAULT_ROUTES) * batch
    # Removal leaves no hook of ours anywhere in the model.
    assert not any(HOOK_NAME in m._diffusers_hook.hooks
                   for m in model.modules() if hasattr(m, "_diffusers_hook"))


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_pipeline_output_bit_identical(family):
    pipe = tiny_pipeline(family)
    plain = pipe(**tiny_pipeline_call_kwargs(family, "a cat runs", steps=2, seed=3)).frames
    inst = instrument(pipe)
    flushed = []

    def cb(_p, i, t, _kw):
        flushed.append(inst.flush(i, [0], float(t)))
        return {}

    recorded = pipe(**tiny_pipeline_call_kwargs(family, "a cat runs", steps=2, seed=3), callback_on_step_end=cb).frames
    inst.remove()
    after = pipe(**tiny_pipeline_call_kwargs(family, "a cat runs", steps=2, seed=3)).frames
    assert torch.equal(plain, recorded) and torch.equal(plain, after)
    assert [sorted(set(f.blocks["step"])) for f in flushed] == [[0], [1]]
    assert inst.pending_calls == 0


class _Capture:
    """Plain torch hooks (not diffusers') that clone a module's real inputs and outputs on every call."""

    def __init__(self, module, clone_kwargs=("hidden_states", "encoder_hidden_states")):
        self.inputs, self.outputs = [], []
        self._h = [
            module.register_forward_pre_hook(self._pre, with_kwargs=True),
            module.register_forward_hook(self._post),
        ]
        self.keys = clone_kwargs

    def _pre(self, module, args, kwargs):
        self.inputs.append(([a.clone() if torch.is_tensor(a) else a for a in args],
                            {k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()}))

    def _post(self, module, args, output):
        self.outputs.append(tuple(o.clone() for o in output) if isinstance(output, tuple) else output.clone())

    def remove(self):
        for h in self._h:
            h.remove()


def _direct_block(xs, ys, row):
    num = sum((y[row].double() - x[row].double()).abs().sum() for x, y in zip(xs, ys)).item()
    den = sum(x[row].double().abs().sum() for x in xs).item()
    d = torch.cat([(y[row].double() - x[row].double()).flatten() for x, y in zip(xs, ys)])
    return num / den, d


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_statistics_equal_direct_computation(family):
    """Γ, ‖Δ‖, Δ change/cos of one block and act/out errors of one linear, against a recomputation from the
    block's and the linear's real inputs and outputs captured by plain torch hooks over two steps."""
    model = tiny_transformer(family)
    adapter = get_adapter(model)
    block = adapter.blocks()[1]
    linears = adapter.linears(block)  # every linear of the block: q/k/v share one quantized input
    inst = instrument(model, formats=PROFILE_ROUTES)
    cap_b = _Capture(block.module)
    caps = {rel: _Capture(lin) for rel, lin in linears.items()}
    context = "cond_uncond" if adapter.cfg_mode == "batched" else "cond"
    batch = 2 if context == "cond_uncond" else 1
    steps = []
    for step in range(2):
        _run(model, family, batch, seed=10 + step, context=context)
        steps.append(inst.flush(step, [0]))
    inst.remove()
    cap_b.remove()
    for c in caps.values():
        c.remove()
    prev = [None] * batch
    for step, recs in enumerate(steps):
        args, kwargs = cap_b.inputs[step]
        xs = adapter.streams_in(block, tuple(args), kwargs)
        ys = adapter.streams_out(block, cap_b.outputs[step])
        for r in range(batch):
            gamma, d = _direct_block(xs, ys, r)
            i = [k for k in range(len(recs.blocks["step"]))
                 if recs.blocks["block_index"][k] == block.index][r]
            assert recs.blocks["gamma"][i] == pytest.approx(gamma, rel=1e-5)
            assert recs.blocks["delta_norm"][i] == pytest.approx(d.norm().item(), rel=1e-5)
            if prev[r] is None:
                assert recs.blocks["delta_change"][i] is None and recs.blocks["delta_cos"][i] is None
            else:
                change = ((d - prev[r]).norm() / prev[r].norm()).item()
                cos = (d @ prev[r] / (d.norm() * prev[r].norm())).item()
                assert recs.blocks["delta_change"][i] == pytest.approx(change, rel=1e-4)
                assert recs.blocks["delta_cos"][i] == pytest.approx(cos, rel=1e-5)
            prev[r] = d
        # each linear: x from its captured input, reference product x·Wᵀ in float64
        for rel, lin in linears.items():
            (x,), _ = caps[rel].inputs[step]
            ref = x.double() @ lin.weight.double().t()
            name = f"{block.name}.{rel}"
            assert inst.layer_formats[inst.layer_names.index(name)] == PROFILE_ROUTES
            for fmt in PROFILE_ROUTES:
                yq = _route_reference(x, lin.weight, fmt).double()
                xq = formats.fake_quant(x, profile_route(fmt).activation).double()
                for r in range(batch):
                    i = [k for k in range(len(recs.layers["step"]))
                         if recs.layers["layer"][k] == name and recs.layers["format"][k] == fmt][r]
                    out = ((yq[r] - ref[r]).norm() / ref[r].norm()).item()
                    act = ((xq[r] - x[r].double()).norm() / x[r].double().norm()).item()
                    assert recs.layers["out_err"][i] == pytest.approx(out, rel=1e-4), (name, fmt, r)
                    assert recs.layers["act_err"][i] == pytest.approx(act, rel=1e-5), (name, fmt, r)


def test_batched_cfg_rows_labelled_uncond_then_cond():
    """CogVideoX: one call with batch [uncond; cond]; row 0's statistics must be labelled uncond."""
    pipe = tiny_pipeline("cogvideox")
    adapter = get_adapter(pipe)
    block = adapter.blocks()[0]
    cap = _Capture(block.module)
    inst = instrument(pipe)
    got = []
    pipe(**tiny_pipeline_call_kwargs("cogvideox", "a red car", steps=2, seed=1),
         callback_on_step_end=lambda _p, i, t, _k: (got.append(inst.flush(i, [5], float(t))), {})[1])
    inst.remove()
    cap.remove()
    assert len(cap.inputs) == 2  # one call per step
    args, kwargs = cap.inputs[0]
    xs = adapter.streams_in(block, tuple(args), kwargs)
    ys = adapter.streams_out(block, cap.outputs[0])
    b = got[0].blocks
    rows = [k for k in range(len(b["step"])) if b["block_index"][k] == block.index]
    assert [b["branch"][k] for k in rows] == ["uncond", "cond"]
    assert {b["prompt_index"][k] for k in rows} == {5}
    for r, k in enumerate(rows):
        assert b["gamma"][k] == pytest.approx(_direct_block(xs, ys, r)[0], rel=1e-5)
    assert b["gamma"][rows[0]] != b["gamma"][rows[1]]  # the rows differ, so the labels are checked


def test_separate_cfg_contexts_labelled_and_kept_apart():
    """Wan: a 'cond' call then an 'uncond' call per step; each keeps its own Δ history."""
    pipe = tiny_pipeline("wan")
    adapter = get_adapter(pipe)
    block = adapter.blocks()[0]
    cap = _Capture(block.module)
    inst = instrument(pipe)
    got = []
    pipe(**tiny_pipeline_call_kwargs("wan", "a blue dog", steps=2, seed=2),
         callback_on_step_end=lambda _p, i, t, _k: (got.append(inst.flush(i, [0], float(t))), {})[1])
    inst.remove()
    cap.remove()
    assert len(cap.inputs) == 4  # cond, uncond per step
    deltas = []
    for call in range(4):
        args, kwargs = cap.inputs[call]
        xs = adapter.streams_in(block, tuple(args), kwargs)
        deltas.append(_direct_block(xs, adapter.streams_out(block, cap.outputs[call]), 0))
    for step in range(2):
        b = got[step].blocks
        rows = {b["branch"][k]: k for k in range(len(b["step"])) if b["block_index"][k] == block.index}
        assert set(rows) == {"cond", "uncond"}
        assert b["gamma"][rows["cond"]] == pytest.approx(deltas[2 * step][0], rel=1e-5)
        assert b["gamma"][rows["uncond"]] == pytest.approx(deltas[2 * step + 1][0], rel=1e-5)
    b = got[1].blocks
    rows = {b["branch"][k]: k for k in range(len(b["step"])) if b["block_index"][k] == block.index}
    for branch, now, before in (("cond", 2, 0), ("uncond", 3, 1)):
        d, p = deltas[now][1], deltas[before][1]
        assert b["delta_change"][rows[branch]] == pytest.approx(((d - p).norm() / p.norm()).item(), rel=1e-4)


def test_no_cache_context_uses_fallback_and_child_cache_is_invalidated():
    model = tiny_transformer("wan")
    # An earlier plain call inside a context builds the root registry's child-registry cache: hooks added later
    # see no cache context until the cache is invalidated.
    _run(model, "wan", 1, context="cond")
    inst = instrument(model)
    _run(model, "wan", 1, context="cond")
    recs = inst.flush(0, [0])
    assert len(recs.blocks["step"]) == 2 and set(recs.blocks["branch"]) == {"cond"}
    _run(model, "wan", 1, context=None)  # no context: fallback "inference", one unguided branch
    _run(model, "wan", 1, context=None)
    recs = inst.flush(1, [0])
    assert set(recs.blocks["branch"]) == {"cond"}
    # the second fallback call continued the first one's Δ history (same context)
    assert recs.blocks["delta_change"][0] is None and recs.blocks["delta_change"][2] is not None
    inst.remove()
    inst2 = instrument(model)  # instrumenting again after removal works (no duplicate hook names)
    _run(model, "wan", 1, context="uncond")
    assert set(inst2.flush(0, [3]).blocks["branch"]) == {"uncond"}
    inst2.remove()


def test_reset_clears_history_and_disabled_records_nothing():
    model = tiny_transformer("cogvideox")
    with instrument(model) as inst:
        _run(model, "cogvideox")
        inst.flush(0, [0])
        inst.reset()
        _run(model, "cogvideox")
        assert all(v is None for v in inst.flush(1, [0]).blocks["delta_change"])
        inst.enabled = False
        _run(model, "cogvideox")
        assert inst.pending_calls == 0
    assert not hasattr(model.transformer_blocks[0], "_diffusers_hook") or \
        HOOK_NAME not in model.transformer_blocks[0]._diffusers_hook.hooks


def test_nan_activation_raises_naming_the_block():
    from sixbit_tune.errors import NonFiniteError

    model = tiny_transformer("wan")
    with instrument(model) as inst:
        kwargs = tiny_transformer_inputs("wan")
        kwargs["hidden_states"][0, 0, 0, 0, 0] = math.nan
        with torch.no_grad(), model.cache_context("cond"):
            model(**kwargs)
        with pytest.raises(NonFiniteError, match="blocks.0 at step 4"):
            inst.flush(4, [0])


def test_mismatched_prompt_count_is_a_clear_error():
    model = tiny_transformer("cogvideox")
    with instrument(model) as inst:
        _run(model, "cogvideox", batch=2)
        with pytest.raises(ValueError, match="batch of 2 rows"):
            inst.flush(0, [0, 1, 2])


def test_remove_frees_history_and_quantized_weights_while_referenced():
    import weakref

    model = tiny_transformer("cogvideox")
    inst = instrument(model)
    _run(model, "cogvideox")
    lin_hook = model.transformer_blocks[0].attn1.to_q._diffusers_hook.hooks[HOOK_NAME]
    block_hook = model.transformer_blocks[0]._diffusers_hook.hooks[HOOK_NAME]
    w_ref = weakref.ref(lin_hook.qw.int8_q)
    d_ref = weakref.ref(block_hook.state_manager._state_cache["cond_uncond"].prev_delta)
    inst.flush(0, [0])
    inst.remove()
    # freed although `inst` and the hook objects themselves are still referenced (as a compiled-function cache
    # or a user variable may hold them)
    assert w_ref() is None and d_ref() is None
    assert lin_hook.qw is None and block_hook.state_manager._state_cache == {}
    assert inst.pending_calls == 0


def _route_reference(x: torch.Tensor, w: torch.Tensor, fmt: str) -> torch.Tensor:
    """formats.quantized_linear_reference of route ``fmt``: over the dequantized NVFP4 weight for a derived route."""
    route = profile_route(fmt)
    if route.weight != route.activation:
        w = formats.nvfp4.quantize(w).dequantize(torch.float32)
    return formats.quantized_linear_reference(x, w, None, route.activation)


def test_routes_over_nvfp4_weights_are_left_out_where_k_is_not_a_multiple_of_16():
    """A real Wan transformer whose feed-forward output projection has K = 40: that layer records the INT8 and FP8
    W8A8 routes only (with a warning naming them), every other layer all routes; the values are the references'."""
    import diffusers

    from sixbit_tune.models.tiny import TINY_TRANSFORMER_KWARGS

    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**{**TINY_TRANSFORMER_KWARGS["wan"], "ffn_dim": 40}).eval()
    adapter = get_adapter(model)
    odd = {n for n, lin in adapter.all_linears().items() if lin.in_features % 16}
    assert odd == {f"{b.name}.ffn.net.2" for b in adapter.blocks()}
    with pytest.warns(UserWarning, match=r"in_features=40 is not a multiple of 16, so no NVFP4 weight; recording "
                                         r"int8, fp8 only"):
        inst = instrument(model, formats=PROFILE_ROUTES)
    for name, fmts in zip(inst.layer_names, inst.layer_formats):
        assert fmts == (("int8", "fp8") if name in odd else PROFILE_ROUTES), name
    name = sorted(odd)[0]
    lin = adapter.all_linears()[name]
    cap = _Capture(lin)
    _run(model, "wan", 1, seed=3, context="cond")
    recs = inst.flush(0, [0])
    inst.remove()
    cap.remove()
    got = {f: (a, o) for n, f, a, o in zip(recs.layers["layer"], recs.layers["format"], recs.layers["act_err"],
                                           recs.layers["out_err"]) if n == name}
    assert sorted(got) == ["fp8", "int8"]
    (x,), _ = cap.inputs[0]
    ref = x.double() @ lin.weight.double().t()
    for fmt, (act, out) in got.items():
        yq = _route_reference(x, lin.weight, fmt).double()
        xq = formats.fake_quant(x, fmt).double()
        assert out == pytest.approx(((yq - ref).norm() / ref.norm()).item(), rel=1e-4), fmt
        assert act == pytest.approx(((xq - x.double()).norm() / x.double().norm()).item(), rel=1e-5), fmt
    n_full = len(inst.layer_names) - len(odd)
    assert len(recs.layers["format"]) == n_full * len(PROFILE_ROUTES) + len(odd) * 2


def test_unknown_routes_are_refused():
    model = tiny_transformer("wan")
    for bad in (("fp4",), (), ("int8", "int8"), ("int8/int8",)):
        with pytest.raises(ValueError, match="formats must be distinct values of"):
            instrument(model, formats=bad)
