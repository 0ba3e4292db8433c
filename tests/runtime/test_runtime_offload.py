"""Model and group CPU offload, in both orders with apply_policy: every pipeline call skips and routes as the policy
says, stats() describes the last call, and remove() leaves the offload working and the policy gone.

On the CPU, diffusers' ``enable_model_cpu_offload(device="cpu")`` installs accelerate's ``cpu_offload_with_hook``
hooks and re-installs them at the end of every pipeline call, exactly as on a GPU; group offload runs with the CPU
as onload device."""

from __future__ import annotations

import pytest
import torch
from rt_helpers import get_pipe, run_pipe

from sixbit_tune.models.adapters import get_adapter
from sixbit_tune.runtime import MixedPrecisionLinear, apply_policy, make_dynamic_policy
from sixbit_tune.runtime.hooks import BLOCK_HOOK, STEP_HOOK

FAMILY = "wan"  # separate CFG: two cache contexts per step


def _policy(pipe):
    names = list(get_adapter(pipe).all_linears())
    predictors = {n: (1.0 + 0.2 * i, 0.0, 0.9, 20) for i, n in enumerate(names)}
    return make_dynamic_policy(pipe, predictors, 0.6, tdc_tolerance=1e9, warmup=1, cooldown=1, max_skips=1,
                               cache_dtype="float32")


def _summary(stats):
    return (stats.num_inference_steps, stats.block_calls, stats.skipped_blocks, dict(stats.layer_calls),
            [(s.context, s.step, s.skipped_blocks, dict(s.layer_calls)) for s in stats.steps])


def _enable(pipe, kind):
    if kind == "model":
        pipe.enable_model_cpu_offload(device="cpu")
    else:
        pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_type="block_level",
                                              num_blocks_per_group=1)


def _disable(pipe, kind):
    if kind == "model":
        pipe.remove_all_hooks()
    else:
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(pipe.transformer).remove_hook("group_offloading", recurse=True)


def _offload_calls(pipe, kind) -> list[str]:
    """Count the offload hook's runs on the transformer: accelerate's CpuOffload ``pre_forward`` (model offload) or
    diffusers' group-offloading ``pre_forward`` on the first block (group offload)."""
    calls: list[str] = []
    if kind == "model":
        hook = pipe.transformer._hf_hook
    else:
        hook = get_adapter(pipe).blocks()[0].module._diffusers_hook.get_hook("group_offloading")
    original = hook.pre_forward

    def counted(module, *args, **kwargs):
        calls.append(type(module).__name__)
        return original(module, *args, **kwargs)

    if kind == "model":
        hook.pre_forward = counted  # accelerate's wrapper looks it up at every call
    else:
        hook.fn_ref.pre_forward = counted  # diffusers' wrapper calls the reference taken at registration
    return calls


def _sixbit_hooks(model) -> list[str]:
    out = []
    for name, m in model.named_modules():
        reg = getattr(m, "_diffusers_hook", None)
        if reg is not None:
            out += [f"{name}:{h}" for h in reg.hooks if h in (STEP_HOOK, BLOCK_HOOK)]
        if m._forward_pre_hooks or m._forward_hooks:
            out.append(f"{name}: torch hooks")
    return out


@pytest.mark.parametrize("kind", ["model", "group"])
@pytest.mark.parametrize("order", ["apply_then_offload", "offload_then_apply"])
def test_offload_every_call_follows_the_policy_and_remove_keeps_offload(order, kind):
    pipe = get_pipe(FAMILY)
    policy = _policy(pipe)
    plain = [run_pipe(pipe, FAMILY, steps=s, seed=s) for s in (5, 6)]
    with apply_policy(pipe, policy) as h:  # reference: the same two calls without offload
        ref_out, ref_stats = [], []
        for s in (5, 6):
            ref_out.append(run_pipe(pipe, FAMILY, steps=s, seed=s))
            ref_stats.append(_summary(h.stats()))
    assert ref_stats[0][2] > 0 and 0 < ref_stats[0][3]["nvfp4"] < ref_stats[0][1] * 8  # skips and both routes

    handle = None
    try:
        if order == "offload_then_apply":
            _enable(pipe, kind)
        handle = apply_policy(pipe, policy)
        if order == "apply_then_offload":
            _enable(pipe, kind)
        for _ in range(2):  # the second round follows two earlier pipeline calls with offload re-set up
            for k, s in enumerate((5, 6)):
                out = run_pipe(pipe, FAMILY, steps=s, seed=s)
                assert torch.equal(out, ref_out[k]), (order, kind, s)
                assert _summary(handle.stats()) == ref_stats[k], (order, kind, s)
                assert handle.stats().completed
        handle.remove()
        assert _sixbit_hooks(pipe.transformer) == []
        offloads = _offload_calls(pipe, kind)
        for k, s in enumerate((5, 6)):
            assert torch.equal(run_pipe(pipe, FAMILY, steps=s, seed=s), plain[k])
        assert len(offloads) > 0  # the offload hook still runs
        assert _sixbit_hooks(pipe.transformer) == []  # and the removed policy did not come back
        assert _summary(handle.stats()) == ref_stats[1]  # nothing ran through the removed handle
    finally:
        if handle is not None:
            handle.remove()
        _disable(pipe, kind)
        pipe.to("cpu")


def test_the_stored_encoding_moves_with_the_module_buffers():
    """Group offload moves a group's parameters and buffers in place (``tensor.data = moved``, no ``.to()``): every
    tensor a quantized layer computes with is one of its buffers, so it moves with them."""
    from sixbit_tune.runtime.linear import _flat_tensors

    pipe = get_pipe(FAMILY)
    with apply_policy(pipe, _policy(pipe)):
        layers = [m for m in pipe.transformer.modules() if isinstance(m, MixedPrecisionLinear)]
        assert layers
        for m in layers:
            used = _flat_tensors(m.qweight)
            assert {id(t) for t in used} <= {id(b) for b in m.buffers(recurse=False)}
            for b in m.buffers(recurse=False):
                b.data = b.data.clone()  # a new storage, as an onload to another device gives
            assert [t.data_ptr() for t in used] == [t.data_ptr() for t in _flat_tensors(m.qweight)]
            assert {t.data_ptr() for t in used} == {b.data_ptr() for b in m.buffers(recurse=False)}
