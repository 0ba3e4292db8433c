"""Adapters against real tiny diffusers transformers of all five families."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch
from torch import nn

from sixbit_tune.errors import UnsupportedModelError
from sixbit_tune.models.adapters import FAMILIES, get_adapter, supported_classes
from sixbit_tune.models.tiny import TINY_TRANSFORMER_KWARGS, tiny_transformer, tiny_transformer_inputs

ALL = sorted(FAMILIES)

# The nn.Linear modules inside one block of each family (diffusers' block classes), written out; sets because
# registration order is not part of the contract.
_COG = {"norm1.linear", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "norm2.linear"}
_COG |= {"ff.net.0.proj", "ff.net.2"}
_SELF_CROSS = {f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")}
_WAN = _SELF_CROSS | {"ffn.net.0.proj", "ffn.net.2"}
_LTX = _SELF_CROSS | {"ff.net.0.proj", "ff.net.2"}
_JOINT = {"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"}
_HUNYUAN_DUAL = {f"attn.{p}" for p in _JOINT} | {"norm1.linear", "norm1_context.linear"}
_HUNYUAN_DUAL |= {"ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"}
_HUNYUAN_SINGLE = {"attn.to_q", "attn.to_k", "attn.to_v", "norm.linear", "proj_mlp", "proj_out"}
_MOCHI = {f"attn1.{p}" for p in _JOINT} | {"norm1.linear", "norm1_context.linear"}
_MOCHI |= {"ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"}
# context_pre_only: no context output projection, no context feed-forward, context norm is norm1_context.linear_1
_MOCHI_LAST = (_MOCHI - {"attn1.to_add_out", "ff_context.net.0.proj", "ff_context.net.2", "norm1_context.linear"}) | {
    "norm1_context.linear_1"
}

EXPECTED_BLOCKS = {
    "cogvideox": [("transformer_blocks.0", _COG), ("transformer_blocks.1", _COG)],
    "wan": [("blocks.0", _WAN), ("blocks.1", _WAN)],
    "hunyuanvideo": [("transformer_blocks.0", _HUNYUAN_DUAL), ("single_transformer_blocks.0", _HUNYUAN_SINGLE)],
    "ltx": [("transformer_blocks.0", _LTX), ("transformer_blocks.1", _LTX)],
    "mochi": [("transformer_blocks.0", _MOCHI), ("transformer_blocks.1", _MOCHI_LAST)],
}
EXPECTED_STREAMS = {
    "cogvideox": ("hidden", "encoder"),
    "wan": ("hidden",),
    "hunyuanvideo": ("hidden", "encoder"),
    "ltx": ("hidden",),
    "mochi": ("hidden", "encoder"),
}


@pytest.fixture(scope="module")
def models():
    return {family: tiny_transformer(family) for family in ALL}


def _forward(model, family, hooks=()):
    handles = [m.register_forward_hook(h, with_kwargs=True) for m, h in hooks]
    try:
        with torch.no_grad():
            return model(**tiny_transformer_inputs(family))[0]
    finally:
        for h in handles:
            h.remove()


def _record_calls(model, adapter, family):
    """Real block calls: (block, args, kwargs, input streams cloned before the call, output) in call order."""
    calls = []
    pre_handles = []
    for ref in adapter.blocks():

        def pre(mod, args, kwargs, ref=ref):
            calls.append([ref, args, kwargs, tuple(s.clone() for s in adapter.streams_in(ref, args, kwargs)), None])

        pre_handles.append(ref.module.register_forward_pre_hook(pre, with_kwargs=True))

    def post(mod, args, kwargs, out):
        calls[-1][4] = out

    try:
        _forward(model, family, [(ref.module, post) for ref in adapter.blocks()])
    finally:
        for h in pre_handles:
            h.remove()
    return calls


@pytest.mark.parametrize("family", ALL)
def test_blocks_linears_and_order(models, family):
    model = models[family]
    adapter = get_adapter(model)
    assert adapter.family.name == family
    blocks = adapter.blocks()
    assert [(b.index, b.name) for b in blocks] == [(i, n) for i, (n, _) in enumerate(EXPECTED_BLOCKS[family])]
    modules = dict(model.named_modules())
    for ref, (_, expected) in zip(blocks, EXPECTED_BLOCKS[family]):
        assert ref.module is modules[ref.name]
        assert ref.streams == EXPECTED_STREAMS[family]
        linears = adapter.linears(ref)
        assert set(linears) == expected
        for rel, lin in linears.items():
            assert lin is modules[f"{ref.name}.{rel}"]
            assert lin.in_features % 32 == 0 and lin.out_features % 32 == 0, (rel, lin)
    full = adapter.all_linears()
    assert list(full) == [f"{b.name}.{rel}" for b in blocks for rel in adapter.linears(b)]
    # Execution order: the order in which a real forward calls the blocks.
    calls = _record_calls(model, adapter, family)
    assert [c[0].index for c in calls] == list(range(len(blocks)))


def test_hunyuan_token_refiner_is_not_a_block(models):
    adapter = get_adapter(models["hunyuanvideo"])
    refiner = [n for n, _ in models["hunyuanvideo"].named_modules() if "token_refiner.refiner_blocks." in n]
    assert refiner, "the tiny HunyuanVideo model should have a token refiner"
    assert not any("token_refiner" in name for name in adapter.all_linears())
    assert not any("token_refiner" in b.name for b in adapter.blocks())


@pytest.mark.parametrize("family", ALL)
def test_streams_on_real_forward(models, family):
    model = models[family]
    adapter = get_adapter(model)
    calls = _record_calls(model, adapter, family)
    for i, (ref, args, kwargs, streams_in, out) in enumerate(calls):
        streams_out = adapter.streams_out(ref, out)
        assert len(streams_in) == len(streams_out) == len(ref.streams)
        for x, y in zip(streams_in, streams_out):
            assert x.shape == y.shape and x.dtype == y.dtype
        # the hidden stream is what the block was called with as hidden_states
        hidden_arg = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        assert adapter.streams_in(ref, args, kwargs)[0] is hidden_arg
        # a block's input streams are the previous block's output streams (same tensors, same order)
        if i > 0:
            prev_ref, prev_out = calls[i - 1][0], calls[i - 1][4]
            prev = adapter.streams_out(prev_ref, prev_out)
            for x, y in zip(streams_in, prev[: len(streams_in)]):
                assert torch.equal(x, y)
        rebuilt = adapter.output_from_streams(ref, streams_out, out)
        assert type(rebuilt) is type(out)
        if isinstance(out, tuple):
            assert len(rebuilt) == len(out) and all(a is b for a, b in zip(rebuilt, out))
        else:
            assert rebuilt is out


@pytest.mark.parametrize("family", ALL)
def test_output_from_streams_drives_the_model(models, family):
    """Replacing each block's output by output_from_streams(streams_out(...)) leaves the model output bit-identical;
    perturbing a stream through the same path changes it (so the replacement really takes effect)."""
    model = models[family]
    adapter = get_adapter(model)
    baseline = _forward(model, family)

    def rebuild(scale):
        def hook(mod, args, kwargs, out, ref):
            streams = adapter.streams_out(ref, out)
            return adapter.output_from_streams(ref, tuple(s * scale for s in streams), out)

        return [(r.module, lambda m, a, k, o, r=r: hook(m, a, k, o, r)) for r in adapter.blocks()]

    assert torch.equal(_forward(model, family, rebuild(1.0)), baseline)
    assert not torch.allclose(_forward(model, family, rebuild(0.5)), baseline)


@pytest.mark.parametrize("family", ALL)
def test_streams_in_positional_or_keyword(models, family):
    model = models[family]
    adapter = get_adapter(model)
    for ref, args, kwargs, _, _ in _record_calls(model, adapter, family):
        bound = inspect.signature(ref.module.forward).bind(*args, **kwargs)
        params = list(inspect.signature(ref.module.forward).parameters.values())
        positional_names = [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        all_pos = tuple(bound.arguments[n] for n in positional_names if n in bound.arguments)
        all_kw = {n: bound.arguments[n] for n in positional_names if n in bound.arguments}
        by_pos = adapter.streams_in(ref, all_pos, {})
        by_kw = adapter.streams_in(ref, (), all_kw)
        mixed = adapter.streams_in(ref, all_pos[:1], {k: v for k, v in all_kw.items() if k != "hidden_states"})
        for a, b, c in zip(by_pos, by_kw, mixed):
            assert a is b is c
        with pytest.raises(ValueError, match="hidden_states"):
            adapter.streams_in(ref, (), {})


def test_streams_in_traces_without_graph_breaks(models):
    """No per-call inspect: streams_in compiles with fullgraph=True (inspect.signature inside a compiled function
    would break the graph)."""
    adapter = get_adapter(models["cogvideox"])
    ref = adapter.blocks()[0]

    def fn(h, e):
        x, y = adapter.streams_in(ref, (h,), {"encoder_hidden_states": e, "temb": None})
        return adapter.output_from_streams(ref, (x * 2, y + 1), None)

    h, e = torch.randn(1, 4, 32), torch.randn(1, 3, 32)
    out = torch.compile(fn, fullgraph=True, backend="eager")(h, e)
    assert torch.equal(out[0], h * 2) and torch.equal(out[1], e + 1)


def test_config_hash_stable_and_distinct(models):
    hashes = {family: get_adapter(models[family]).config_hash() for family in ALL}
    assert len(set(hashes.values())) == len(ALL)
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in hashes.values())
    # weights do not matter, architecture does
    assert get_adapter(tiny_transformer("wan", seed=7)).config_hash() == hashes["wan"]
    import diffusers

    deeper = diffusers.WanTransformer3DModel(**{**TINY_TRANSFORMER_KWARGS["wan"], "num_layers": 3})
    assert get_adapter(deeper).config_hash() != hashes["wan"]
    # another process (hash() salting, dict order) computes the same value
    code = (
        "from sixbit_tune.models.tiny import tiny_transformer\n"
        "from sixbit_tune.models.adapters import get_adapter\n"
        "print(get_adapter(tiny_transformer('mochi')).config_hash())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == hashes["mochi"]


def test_pipeline_and_compiled_module_resolve_to_transformer(models):
    model = models["ltx"]

    class Holder:  # a pipeline is any non-Module object with a .transformer
        transformer = model

    assert get_adapter(Holder()).transformer is model
    compiled = torch.compile(model, backend="eager")
    assert get_adapter(compiled).transformer is model


def test_unsupported_models_are_refused():
    with pytest.raises(UnsupportedModelError) as err:
        get_adapter(nn.Linear(4, 4))
    for cls in supported_classes():
        assert cls in str(err.value)
    with pytest.raises(UnsupportedModelError, match="not a diffusers pipeline or transformer"):
        get_adapter(object())

    class NoTransformer:
        transformer = None

    with pytest.raises(UnsupportedModelError, match="NoTransformer without a transformer"):
        get_adapter(NoTransformer())


@pytest.mark.parametrize("family", ALL)
def test_row_branches_rules(models, family):
    adapter = get_adapter(models[family])
    if adapter.cfg_mode == "batched":
        assert adapter.row_branches(4, 2, "cond_uncond") == ["uncond", "uncond", "cond", "cond"]
        assert adapter.row_branches(2, 2, "cond_uncond") == ["cond", "cond"]
        assert adapter.row_branches(2, 1, None) == ["uncond", "cond"]
        for bad in [(3, 2, "cond_uncond"), (4, 2, "cond"), (0, 1, None), (2, 0, None)]:
            with pytest.raises(ValueError):
                adapter.row_branches(*bad)
    else:
        assert adapter.row_branches(2, 2, "cond") == ["cond", "cond"]
        assert adapter.row_branches(3, 3, "uncond") == ["uncond"] * 3
        for bad in [(4, 2, "cond"), (2, 2, "cond_uncond"), (2, 2, None), (1, 1, "inference")]:
            with pytest.raises(ValueError):
                adapter.row_branches(*bad)
