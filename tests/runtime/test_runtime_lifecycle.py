"""apply/remove, validation against the model and the GPU, run boundaries (consecutive calls, exceptions), all
five families through their pipelines, lean import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from rt_helpers import FAMILIES, call_kwargs, get_pipe, run_pipe, transformer_and_inputs

from sixbit_tune import policy as P
from sixbit_tune.errors import NonFiniteError, PolicyError
from sixbit_tune.formats import weight_bytes
from sixbit_tune.models.adapters import get_adapter
from sixbit_tune.runtime import (
    GPUMismatchWarning,
    MixedPrecisionLinear,
    apply_policy,
    load_policy,
    make_dynamic_policy,
    make_static_policy,
)


def _mixed_policy(pipe, tol=1.0, **tdc):
    """Dynamic on half the layers, INT8/NVFP4/none on the others, TDC on: exercises every code path."""
    names = list(get_adapter(pipe).all_linears())
    predictors = {n: (1.0 + 0.1 * i, 0.0, 0.9, 20) for i, n in enumerate(names) if i % 2 == 0}
    tdc = {"warmup": 1, "cooldown": 1, "max_skips": 2, **tdc}
    policy = make_dynamic_policy(pipe, predictors, 0.5, tdc_tolerance=tol, **tdc)
    layers = dict(policy.dmpq.layers)
    static = [n for n in names if n not in predictors]
    for n, mode in zip(static, ["int8", "nvfp4", "none"] * len(static)):
        old = layers[n]
        layers[n] = P.LayerPolicy(mode, old.in_features, old.out_features)
    return policy.replace(dmpq=P.DMPQ(policy.dmpq.threshold, layers, policy.dmpq.first_step_format))


def _snapshot(model):
    return (
        [(n, id(m)) for n, m in model.named_modules()],
        [(n, id(p), p.detach().clone()) for n, p in model.named_parameters()],
        {n: dict(m.__dict__.get("_forward_hooks", {})) for n, m in model.named_modules()},
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_pipeline_runs_and_remove_restores_exactly(family):
    pipe = get_pipe(family)
    before = run_pipe(pipe, family, steps=5)
    modules, params, _ = _snapshot(pipe.transformer)
    had_forward = {n: "forward" in m.__dict__ for n, m in pipe.transformer.named_modules()}
    handle = apply_policy(pipe, _mixed_policy(pipe))
    got = run_pipe(pipe, family, steps=5)
    stats = handle.stats()
    assert torch.isfinite(got).all() and not torch.equal(got, before)
    assert 0 < stats.nvfp4_share < 1 and stats.skip_share > 0 and stats.cache_bytes > 0
    assert stats.layer_calls["none"] > 0 and stats.layer_calls["int8"] > 0
    assert stats.completed and stats.num_inference_steps == 5
    handle.remove()
    handle.remove()  # idempotent
    after = run_pipe(pipe, family, steps=5)
    assert torch.equal(after, before)
    modules2, params2, _ = _snapshot(pipe.transformer)
    assert modules2 == modules
    assert [(n, i) for n, i, _ in params2] == [(n, i) for n, i, _ in params]
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(params, params2))
    assert {n: "forward" in m.__dict__ for n, m in pipe.transformer.named_modules()} == had_forward
    assert not any(isinstance(m, MixedPrecisionLinear) for m in pipe.transformer.modules())


def test_weight_bytes_and_layer_modes_in_stats():
    pipe = get_pipe("wan")
    policy = _mixed_policy(pipe)
    linears = get_adapter(pipe).all_linears()
    # One stored weight per layer: a dynamic NVFP4-stored layer counts once, in nvfp4; its robust route's INT8
    # operand lives in a scratch buffer shared by the layers of one shape, reported apart from the weights.
    expected = {"nvfp4": 0, "int8": 0, "fp8": 0, "none": 0}
    scratch_shapes = set()
    for name, lp in policy.dmpq.layers.items():
        lin = linears[name]
        f = lp.weight
        expected[f] += lin.weight.numel() * 4 if f == "none" else weight_bytes(f, lin.out_features, lin.in_features)
        if lp.mode == "dynamic":
            scratch_shapes.add((lin.out_features, lin.in_features))
    assert scratch_shapes, "the mixed policy has dynamic layers"
    with apply_policy(pipe, policy) as h:
        run_pipe(pipe, "wan", steps=2)
        stats = h.stats()
    assert stats.weight_bytes == expected
    assert stats.scratch_bytes == {"int8": sum(weight_bytes("int8", n, k) for n, k in scratch_shapes)}
    assert stats.execution == {"int8": "reference", "nvfp4": "reference"}
    d = stats.to_dict()
    json.dumps(d)
    assert d["steps"][0]["nvfp4_share"] == stats.steps[0].nvfp4_share
    assert "NVFP4 layer-calls" in stats.summary()


def test_policy_for_another_model_lists_every_mismatch():
    pipe = get_pipe("wan")
    wan_policy = make_static_policy(pipe, "int8")
    cog = get_pipe("cogvideox")
    with pytest.raises(PolicyError) as e:
        apply_policy(cog, wan_policy)
    msg = str(e.value)
    assert "model.class: policy is for WanTransformer3DModel, model is CogVideoXTransformer3DModel" in msg
    assert "model.family" in msg and "model.config_hash" in msg
    assert "dmpq.layers.blocks.0.attn1.to_q: no such in-block linear" in msg
    assert "dmpq.layers.transformer_blocks.0.ff.net.2: model linear" in msg
    # Same class, one more block: blocks, hash and the new block's layers are reported.
    from sixbit_tune.models.tiny import TINY_TRANSFORMER_KWARGS

    kwargs = dict(TINY_TRANSFORMER_KWARGS["wan"], num_layers=3)
    from diffusers import WanTransformer3DModel

    bigger = WanTransformer3DModel(**kwargs)
    with pytest.raises(PolicyError) as e:
        apply_policy(bigger, wan_policy)
    msg = str(e.value)
    assert "model.blocks: policy has 2 blocks, model has 3" in msg
    assert "dmpq.layers.blocks.2.ffn.net.2: model linear" in msg
    # A changed layer shape.
    layers = dict(wan_policy.dmpq.layers)
    lp = layers["blocks.1.ffn.net.0.proj"]
    layers["blocks.1.ffn.net.0.proj"] = P.LayerPolicy("int8", lp.in_features, lp.out_features * 2)
    with pytest.raises(PolicyError, match=r"blocks.1.ffn.net.0.proj: policy shape in=32 out=128, model in=32 out=64"):
        apply_policy(pipe, wan_policy.replace(dmpq=P.DMPQ(0.0, layers)))
    assert getattr(pipe.transformer, "_sixbit_tune_policy_handle", None) is None


def test_gpu_mismatch_warns_or_raises_when_strict():
    pipe = get_pipe("ltx")
    policy = make_static_policy(pipe, "nvfp4")
    h200 = policy.replace(target=P.Target("NVIDIA H200", "9.0", "emulated"))
    with pytest.warns(GPUMismatchWarning, match="tuned on NVIDIA H200, running on CPU"):
        handle = apply_policy(pipe, h200)
    handle.remove()
    with pytest.raises(PolicyError, match="strict_gpu"):
        apply_policy(pipe, h200, strict_gpu=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_policy(pipe, policy, strict_gpu=True).remove()  # made here: no warning


def test_applying_twice_is_refused_and_json_round_trip(tmp_path):
    pipe = get_pipe("mochi")
    policy = _mixed_policy(pipe)
    path = tmp_path / "p.json"
    P.save(policy, path)
    loaded = load_policy(path)
    assert loaded == policy
    assert load_policy(json.loads(path.read_text())) == policy
    with apply_policy(pipe, str(path)):
        with pytest.raises(PolicyError, match="already applied"):
            apply_policy(pipe.transformer, policy)
    with pytest.raises(PolicyError, match="predictors for layers the model does not have"):
        make_dynamic_policy(pipe, {"nope.layer": (1.0, 0.0, None, None)}, 0.1)


def test_pipeline_and_bare_transformer_give_the_same_run():
    pipe = get_pipe("wan")  # Wan's cache context carries num_inference_steps: TDC works on the bare transformer
    policy = _mixed_policy(pipe)
    with apply_policy(pipe, policy) as h:
        a = run_pipe(pipe, "wan", steps=5)
        sa = h.stats()
    with apply_policy(pipe.transformer, policy) as h:
        b = run_pipe(pipe, "wan", steps=5)
        sb = h.stats()
    assert torch.equal(a, b)
    assert sa.steps == sb.steps and sa.skipped_blocks > 0


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_consecutive_calls_do_not_share_state(family):
    pipe = get_pipe(family)
    with apply_policy(pipe, _mixed_policy(pipe)) as h:
        a = run_pipe(pipe, family, steps=5)
        sa = h.stats()
        run_pipe(pipe, family, steps=3, prompts="a dog on the beach")
        b = run_pipe(pipe, family, steps=5)
        sb = h.stats()
        assert h.controller.states == {}  # reset at the end of each call
    assert torch.equal(a, b)
    assert sa.steps == sb.steps


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_guidance_branches_keep_separate_state(family):
    """Separate CFG: one state per cache context; batched CFG: one state whose Γ and accumulators are per row."""
    pipe = get_pipe(family)
    seen = {}
    with apply_policy(pipe, _mixed_policy(pipe, warmup=0, cooldown=0)) as h:

        def look(p, i, t, kw):
            if i == 1:
                for name, st in h.controller.states.items():
                    seen[name] = (st.step, st.rows, [g for g in st.gamma if g is not None],
                                  [c for c in st.cache if c is not None])
            return kw

        run_pipe(pipe, family, steps=3, callback_on_step_end=look)
    if family == "wan":
        assert set(seen) == {"cond", "uncond"}
        (sc, rc, gc, cc), (su, ru, gu, cu) = seen["cond"], seen["uncond"]
        assert sc == su == 2 and rc == ru == 1
        assert gc and gc != gu  # Γ measured per branch
        assert cc and all(not torch.equal(a[0], b[0]) for a, b in zip(cc, cu))  # one Δ cache per branch
    else:
        assert set(seen) == {"cond_uncond"}
        step, rows, gammas, caches = seen["cond_uncond"]
        assert step == 2 and rows == 2
        assert all(len(g) == 2 and g[0] != g[1] for g in gammas)  # uncond and cond rows kept apart
        assert all(c[0].shape[0] == 2 for c in caches)


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("target", ["pipe", "transformer"])
@pytest.mark.parametrize("where", ["callback", "block"])
def test_an_exception_mid_call_does_not_leak_into_the_next_call(where, target):
    family = "cogvideox"
    pipe = get_pipe(family)
    model = pipe if target == "pipe" else pipe.transformer
    policy = _mixed_policy(pipe)
    with apply_policy(model, policy) as h:
        if target == "transformer":
            h.num_inference_steps = 6
        clean = run_pipe(pipe, family, steps=6)
        clean_stats = h.stats()
        if where == "callback":
            def fail(p, i, t, kw):
                if i == 3:
                    raise _Boom
                return kw

            with pytest.raises(_Boom):
                run_pipe(pipe, family, steps=6, callback_on_step_end=fail)
        else:
            block = get_adapter(pipe).blocks()[1].module
            calls = []

            def pre(module, args):
                calls.append(1)
                if len(calls) == 4:
                    raise _Boom

            handle = block.register_forward_pre_hook(pre)
            try:
                with pytest.raises(_Boom):
                    run_pipe(pipe, family, steps=6)
            finally:
                handle.remove()
        again = run_pipe(pipe, family, steps=6)
        again_stats = h.stats()
    assert torch.equal(again, clean)
    assert again_stats.steps == clean_stats.steps


def test_block_called_outside_a_transformer_call_runs_plainly():
    """A block called directly (no transformer call, so no step) runs with the first-step format, unmeasured."""
    model, inputs = transformer_and_inputs("wan")
    reference, _ = transformer_and_inputs("wan")
    captured = {}
    block = get_adapter(model).blocks()[1].module
    hook = block.register_forward_pre_hook(lambda m, a, k: captured.update(args=a, kwargs=k), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    policy = make_dynamic_policy(model, {n: (1.0, 0.0, None, None) for n in get_adapter(model).all_linears()}, 1.0)
    with torch.no_grad(), apply_policy(model, policy) as h:
        out = block(*captured["args"], **captured["kwargs"])
        assert h.stats() is None
    # The first-step route of a dynamic layer is its robust one: INT8 activations on the stored NVFP4 weight.
    with torch.no_grad(), apply_policy(reference, make_static_policy(reference, "nvfp4", mode="robust")):
        expected = get_adapter(reference).blocks()[1].module(*captured["args"], **captured["kwargs"])
    assert torch.equal(out, expected)


def test_runtime_import_stays_light():
    code = (
        "import sys, sixbit_tune.runtime, sixbit_tune.commands.generate\n"
        "heavy = [m for m in ('optuna', 'duckdb', 'streamlit', 'plotly') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_call_kwargs_helper_requests_latents():
    assert call_kwargs("wan")["output_type"] == "latent"


def test_moving_the_model_under_a_policy_keeps_encodings_and_restores_consistently():
    model, inputs = transformer_and_inputs("wan")
    policy = _mixed_policy(model)
    handle = apply_policy(model, policy)
    q = next(m for m in model.modules() if isinstance(m, MixedPrecisionLinear) and m.mode == "dynamic")
    dtypes = {f: [t.dtype for t in ((qw.data, qw.block_scales, qw.global_scale) if f == "nvfp4" else qw)]
              for f, qw in q.qweights.items()}
    model.to(torch.bfloat16)
    assert {f: [t.dtype for t in ((qw.data, qw.block_scales, qw.global_scale) if f == "nvfp4" else qw)]
            for f, qw in q.qweights.items()} == dtypes
    with torch.no_grad():
        out = model(**{k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
                       for k, v in inputs.items()})[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    handle.remove()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.gpu
def test_on_cuda_original_weights_are_parked_on_the_cpu_and_come_back():
    model, inputs = transformer_and_inputs("wan")
    model.to("cuda")
    lin = get_adapter(model).all_linears()["blocks.0.attn1.to_q"]
    weight = lin.weight
    before = weight.detach().clone()
    with torch.no_grad():
        plain = model(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs.items()})[0]
    handle = apply_policy(model, make_static_policy(model, "int8"))
    assert weight.device.type == "cpu"
    with torch.no_grad():
        out = model(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs.items()})[0]
    assert torch.isfinite(out).all()
    assert handle.stats().execution["int8"].startswith("triton")
    handle.remove()
    assert lin.weight is weight and weight.device.type == "cuda" and torch.equal(weight, before)
    with torch.no_grad():
        again = model(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs.items()})[0]
    assert torch.equal(again, plain)


class _HostReads(torch.overrides.TorchFunctionMode):
    """Counts tensor-to-host reads (tolist/item/bool/float/int) made by sixbit_tune.runtime code itself."""

    NAMES = ("tolist", "item", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            frame = sys._getframe(1)
            while frame is not None and "/torch/" in frame.f_code.co_filename:
                frame = frame.f_back
            if frame is not None and "sixbit_tune/runtime/" in frame.f_code.co_filename:
                self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_one_host_read_per_denoising_step(family):
    """The runtime reads device values once per step (none at the first; separate CFG: not once per branch),
    plus once when the run ends (the last step's finiteness flag)."""
    pipe = get_pipe(family)
    steps = 5
    with apply_policy(pipe, _mixed_policy(pipe)) as h:
        reads = _HostReads()
        with reads:
            run_pipe(pipe, family, steps=steps)
        assert h.stats().skipped_blocks > 0 and 0 < h.stats().nvfp4_share < 1
    assert reads.count == (steps - 1) + 1


def test_a_failed_apply_leaves_the_model_untouched():
    model, inputs = transformer_and_inputs("ltx")
    adapter = get_adapter(model)
    names = list(adapter.all_linears())
    with torch.no_grad():
        plain = model(**inputs)[0]
        adapter.all_linears()[names[-1]].weight[0, 0] = float("nan")  # the last layer fails to quantize
    modules = [(n, id(m)) for n, m in model.named_modules()]
    with pytest.raises(NonFiniteError):
        apply_policy(model, make_static_policy(model, "int8"))
    assert [(n, id(m)) for n, m in model.named_modules()] == modules
    assert getattr(model, "_sixbit_tune_policy_handle", None) is None
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        adapter.all_linears()[names[-1]].weight[0, 0] = 0.0
        again = model(**inputs)[0]
    assert torch.isfinite(again).all() and again.shape == plain.shape


def test_non_finite_output_is_reported_at_the_next_step_without_extra_syncs():
    model, inputs = transformer_and_inputs("wan")
    policy = make_static_policy(model, "none", 1.0, warmup=0, cooldown=0)
    bad = dict(inputs, hidden_states=inputs["hidden_states"].clone())
    bad["hidden_states"][0, 0, 0, 0, 0] = float("nan")
    with torch.no_grad(), apply_policy(model, policy) as h:
        model(**bad)
        with pytest.raises(NonFiniteError, match=r"output at step 0 \(context 'inference'\) contains NaN"):
            model(**inputs)
        assert h.controller.states == {}
        out = model(**inputs)[0]  # a new run after the error
    assert torch.isfinite(out).all()


def test_nvfp4_kernel_paths_map_to_policy_target_names():
    from sixbit_tune.kernels import PATHS

    from sixbit_tune.runtime.apply import nvfp4_target_path

    names = {p: nvfp4_target_path(p) for p in PATHS if p not in ("triton-int8", "scaled-mm-fp8")}  # other formats
    assert names == {"triton-nvfp4-emulated": "emulated", "native-nvfp4": "native", "reference": "reference"}
    assert set(names.values()) == set(P.NVFP4_PATHS)
    with pytest.raises(ValueError, match="unknown NVFP4 kernel path"):
        nvfp4_target_path("triton-int8")
