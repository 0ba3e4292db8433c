"""One test per diffusers / accelerate / torch behaviour that sixbit_tune.compat relies on, and compat's own
corrections around them (real diffusers hooks on real modules; no GPU)."""

from __future__ import annotations

import subprocess
import sys

import torch
from accelerate.hooks import ModelHook as AccelerateHook
from accelerate.hooks import add_hook_to_module, remove_hook_from_module
from diffusers.hooks import FirstBlockCacheConfig

from sixbit_tune import compat
from sixbit_tune.models.tiny import tiny_transformer


class _Add(compat.ModelHook):
    """Replaces the forward (``new_forward``): adds ``k`` to the output."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def new_forward(self, module, *args, **kwargs):
        return self.fn_ref.original_forward(*args, **kwargs) + self.k


class _Passthrough(compat.StatefulHook):
    def __init__(self):
        super().__init__()
        self.state_manager = compat.StateManager(_State)
        self.resets = 0

    def reset_state(self, module):
        self.resets += 1
        return module


class _State(compat.BaseState):
    def reset(self, *args, **kwargs):
        pass


class _Count(AccelerateHook):
    def __init__(self):
        self.calls = []

    def pre_forward(self, module, *args, **kwargs):
        self.calls.append(1)
        return args, kwargs


def _lin():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 4)


def test_registry_lives_on_the_module_and_wraps_forward_as_instance_attribute():
    lin, x = _lin(), torch.randn(2, 4)
    y = lin(x)
    assert not compat.has_registry(lin)
    reg = compat.register_hook(lin, _Add(1.0), "a")
    assert compat.has_registry(lin) and compat.get_hook(lin, "a") is not None
    assert lin.__dict__["forward"] is reg.wrapper
    assert torch.equal(lin(x), y + 1)
    compat.remove_hook(reg)
    assert not compat.has_registry(lin) and "forward" not in lin.__dict__
    assert torch.equal(lin(x), y)


def test_diffusers_remove_hook_bypasses_a_next_forward_replacing_hook_and_compat_does_not():
    x = torch.randn(2, 4)
    # diffusers' own remove_hook of an inner hook points the next hook's forward past it: the next hook's
    # new_forward is no longer called (compat.remove_hook corrects this).
    lin = _lin()
    y = lin(x)
    compat.register_hook(lin, _Add(1.0), "inner")
    compat.register_hook(lin, _Add(10.0), "outer")
    assert torch.equal(lin(x), y + 11)
    lin._diffusers_hook.remove_hook("inner", recurse=False)
    assert torch.equal(lin(x), y)  # "outer" silently lost
    lin = _lin()
    inner = compat.register_hook(lin, _Add(1.0), "inner")
    compat.register_hook(lin, _Add(10.0), "outer")
    compat.remove_hook(inner)
    assert torch.equal(lin(x), y + 10)
    assert compat.hook_names(lin) == ["outer"]


def test_diffusers_remove_hook_of_the_outermost_overwrites_a_later_wrapper_and_compat_keeps_it():
    x = torch.randn(2, 4)
    for use_compat in (False, True):
        lin = _lin()
        y = lin(x)
        reg = compat.register_hook(lin, _Add(1.0), "ours")
        count = _Count()
        add_hook_to_module(lin, count)  # accelerate wraps the registry's forward
        if use_compat:
            compat.remove_hook(reg)
        else:
            lin._diffusers_hook.remove_hook("ours", recurse=False)
        out = lin(x)
        assert torch.equal(out, y)
        assert len(count.calls) == (1 if use_compat else 0)  # diffusers' remove_hook dropped accelerate's wrapper
        # accelerate's own removal puts back what it wrapped: with compat, the plain forward, not the removed hook.
        remove_hook_from_module(lin)
        assert torch.equal(lin(x), y if use_compat else y + 1)


def test_accelerate_re_adding_its_hook_drops_a_wrapper_installed_after_it():
    """What diffusers' model CPU offload does at the end of every pipeline call: remove_hook_from_module puts back
    the forward accelerate wrapped, dropping any wrapper added after it; torch module hooks survive."""
    lin, x = _lin(), torch.randn(2, 4)
    y = lin(x)
    add_hook_to_module(lin, AccelerateHook())
    compat.register_hook(lin, _Add(1.0), "later")
    seen = []
    lin.register_forward_pre_hook(lambda m, a: seen.append(1))
    assert torch.equal(lin(x), y + 1)
    remove_hook_from_module(lin)
    add_hook_to_module(lin, AccelerateHook())
    assert torch.equal(lin(x), y)  # the registry's wrapper is gone, its hook still registered
    assert compat.get_hook(lin, "later") is not None
    assert len(seen) == 2


def test_stateful_hooks_receive_the_cache_context_and_the_pipeline_reset():
    model = tiny_transformer("wan")
    hook = _Passthrough()
    reg = compat.register_hook(model, hook, "probe")
    compat.invalidate_child_registries(model)
    assert compat.current_context(hook.state_manager) is None
    with model.cache_context("cond", step_index=3):
        ctx = compat.current_context(hook.state_manager)
        assert ctx.name == "cond" and ctx.step_index == 3
    assert compat.current_context(hook.state_manager) is None
    model._reset_stateful_cache()  # what a pipeline call does at its end
    assert hook.resets == 1
    compat.reset_hook_state(model, "probe")
    assert hook.resets == 2
    compat.remove_hook(reg)


def test_child_registries_are_cached_until_invalidated():
    model = tiny_transformer("wan")
    root = compat.register_hook(model, _Passthrough(), "root")
    with model.cache_context("a"):
        pass  # the root caches its (empty) list of descendant registries here
    block = model.blocks[0]
    hook = _Passthrough()
    reg = compat.register_hook(block, hook, "late")
    with model.cache_context("b"):
        assert compat.current_context(hook.state_manager) is None  # not reached: stale cache
    compat.invalidate_child_registries(model)
    with model.cache_context("c"):
        assert compat.current_context(hook.state_manager).name == "c"
    compat.remove_hook(reg)
    compat.remove_hook(root)


def test_diffusers_caches_are_found_by_hook_name():
    model = tiny_transformer("wan")
    assert compat.diffusers_cache_hooks(model) == []
    model.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    found = compat.diffusers_cache_hooks(model)
    assert "blocks.0: fbc_leader_block_hook" in found and "blocks.1: fbc_block_hook" in found
    assert set(compat.cache_hook_names()) >= {"fbc_leader_block_hook", "fbc_block_hook", "mag_cache_block_hook"}
    model.disable_cache()
    assert compat.diffusers_cache_hooks(model) == []


def test_torch_compile_wrapper_holds_the_module():
    lin = _lin()
    assert compat.unwrap_compiled(torch.compile(lin, backend="eager")) is lin
    assert compat.unwrap_compiled(lin) is lin


def test_compat_and_runtime_import_no_heavy_dependencies():
    code = ("import sys, sixbit_tune.compat, sixbit_tune.runtime; "
            "print(sorted(m for m in ('optuna', 'duckdb', 'streamlit', 'plotly') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
