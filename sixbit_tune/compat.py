"""The one module that touches private parts of diffusers, accelerate and torch's compiled-module wrapper.

Everything sixbit-tune needs from them that is not public API is read or written here, so an upgrade that moves
them changes this file only. ``tests/test_compat.py`` checks each behaviour relied on:

* diffusers' hook machinery (``HookRegistry``, ``ModelHook``, ``StateManager``, ``BaseState``, ``CacheContext``;
  diffusers 0.42): a module's registry is its ``_diffusers_hook`` attribute; ``register_hook`` replaces the
  module's ``forward`` by an instance attribute wrapping the forward it found; ``remove_hook(name)`` puts the
  wrapped forward back *as the module's forward* when the hook is the outermost one, whatever the module's forward
  is by then; when the hook is not the outermost, it points the next hook's ``forward`` past it, which bypasses a
  next hook that replaces the forward (``new_forward``: it calls ``original_forward``); a hook whose class sets
  ``_is_stateful`` receives the ``cache_context`` through the ``StateManager`` s among its attributes (its
  ``_context``) and is reset at the end of every pipeline call; a root registry caches the list of its
  descendants' registries at the first ``cache_context``, so hooks added later need
  ``invalidate_child_registries_cache``; diffusers' cache techniques (FirstBlockCache, MagCache, …) are hooks of
  known names.
* accelerate (1.x) ``add_hook_to_module``: replaces ``module.forward`` by a wrapper that calls
  ``module._old_forward`` (the forward it found); ``remove_hook_from_module`` puts ``_old_forward`` back as the
  module's forward. Model CPU offload in diffusers removes and re-adds these hooks at the end of every pipeline
  call, so whatever wrapped the forward after accelerate did is dropped then.
* diffusers' attention dispatch (``diffusers.models.attention_dispatch``, 0.42): a processor that dispatches
  holds its backend as ``_attention_backend`` (None: the registry's active backend, which the
  ``attention_backend`` context and the ``DIFFUSERS_ATTN_BACKEND`` variable set, in
  ``_AttentionBackendRegistry._active_backend``).
* torch: ``torch.compile(module)`` returns an ``OptimizedModule`` holding the module as ``_orig_mod``.

Imports torch, diffusers and accelerate only (``import sixbit_tune.runtime`` stays light).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager

__all__ = [
    "BaseState",
    "CacheContext",
    "HookRegistry",
    "ModelHook",
    "Registration",
    "StateManager",
    "StatefulHook",
    "attention_backend_name",
    "cache_hook_names",
    "current_context",
    "diffusers_cache_hooks",
    "get_hook",
    "has_registry",
    "invalidate_child_registries",
    "register_hook",
    "remove_hook",
    "reset_hook_state",
    "unwrap_compiled",
]

_REGISTRY_ATTR = "_diffusers_hook"
_MISSING = object()

# diffusers' cache techniques and the modules defining their hook names (checked by name: a hook of any of them on
# the transformer or one of its descendants means a diffusers cache is active).
_CACHE_HOOK_CONSTANTS = {
    "diffusers.hooks.first_block_cache": ("_FBC_LEADER_BLOCK_HOOK", "_FBC_BLOCK_HOOK"),
    "diffusers.hooks.mag_cache": ("_MAG_CACHE_LEADER_BLOCK_HOOK", "_MAG_CACHE_BLOCK_HOOK"),
    "diffusers.hooks.faster_cache": ("_FASTER_CACHE_DENOISER_HOOK", "_FASTER_CACHE_BLOCK_HOOK"),
    "diffusers.hooks.pyramid_attention_broadcast": ("_PYRAMID_ATTENTION_BROADCAST_HOOK",),
    "diffusers.hooks.taylorseer_cache": ("_TAYLORSEER_CACHE_HOOK",),
    "diffusers.hooks.sea_cache": ("_SEA_CACHE_ROOT_HOOK", "_SEA_CACHE_LEADER_BLOCK_HOOK", "_SEA_CACHE_BLOCK_HOOK",
                                  "_SEA_CACHE_POST_NORM_HOOK"),
    "diffusers.hooks.text_kv_cache": ("_TEXT_KV_CACHE_TRANSFORMER_HOOK", "_TEXT_KV_CACHE_BLOCK_HOOK"),
}
_cache_names: frozenset[str] | None = None


def cache_hook_names() -> frozenset[str]:
    """Names of every diffusers cache-technique hook this diffusers defines."""
    global _cache_names
    if _cache_names is None:
        names = set()
        for module_name, constants in _CACHE_HOOK_CONSTANTS.items():
            try:
                mod = importlib.import_module(module_name)
            except ImportError:
                continue
            names.update(getattr(mod, c) for c in constants if isinstance(getattr(mod, c, None), str))
        _cache_names = frozenset(names)
    return _cache_names


class StatefulHook(ModelHook):
    """A diffusers hook that keeps per-context state: diffusers hands it the ``cache_context`` through the
    ``StateManager`` s among its attributes and calls its ``reset_state`` at the end of every pipeline call."""

    _is_stateful = True


# ------------------------------------------------------------------------------------------------ registries
def has_registry(module: torch.nn.Module) -> bool:
    """Whether ``module`` carries a diffusers hook registry."""
    return getattr(module, _REGISTRY_ATTR, None) is not None


def get_hook(module: torch.nn.Module, name: str) -> ModelHook | None:
    """The diffusers hook ``name`` on ``module`` (None if there is none)."""
    registry = getattr(module, _REGISTRY_ATTR, None)
    return None if registry is None else registry.get_hook(name)


def hook_names(module: torch.nn.Module) -> list[str]:
    """Names of the diffusers hooks on ``module``, innermost first."""
    registry = getattr(module, _REGISTRY_ATTR, None)
    return [] if registry is None else list(registry._hook_order)


def invalidate_child_registries(module: torch.nn.Module) -> None:
    """Make every registry in ``module``'s tree rebuild its cached list of descendant registries, so
    ``cache_context`` reaches hooks added or removed since (creates no registry)."""
    for sub in module.modules():
        registry = getattr(sub, _REGISTRY_ATTR, None)
        if registry is not None:
            registry._child_registries_cache = None


def current_context(manager: StateManager) -> CacheContext | None:
    """The cache context a ``StateManager`` holds now (None outside any ``cache_context``)."""
    return manager._context


def reset_hook_state(module: torch.nn.Module, name: str) -> None:
    """Reset the state of hook ``name`` on ``module`` if it is a stateful hook (others are left alone)."""
    hook = get_hook(module, name)
    if hook is not None and hook._is_stateful:
        hook.reset_state(module)


def diffusers_cache_hooks(root: torch.nn.Module, modules=None) -> list[str]:
    """``"<module name>: <hook name>"`` for every diffusers cache-technique hook on ``root`` or below it (or, with
    ``modules`` — an iterable of ``(name, module)`` — on those modules only, which is cheaper)."""
    names = cache_hook_names()
    found = []
    for mod_name, module in (root.named_modules() if modules is None else modules):
        registry = getattr(module, _REGISTRY_ATTR, None)
        if registry is not None and registry.hooks:
            found.extend(f"{mod_name or type(root).__name__}: {h}" for h in registry._hook_order if h in names)
    return found


@dataclass
class Registration:
    """What :func:`register_hook` changed on a module, for :func:`remove_hook` to undo exactly that."""

    module: torch.nn.Module
    name: str
    created_registry: bool
    wrapper: Any  # the forward the registry installed


def register_hook(module: torch.nn.Module, hook: ModelHook, name: str) -> Registration:
    """Register ``hook`` as ``name`` on ``module``'s diffusers registry (created if needed)."""
    created = not has_registry(module)
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    return Registration(module, name, created, module.__dict__.get("forward"))


def remove_hook(reg: Registration) -> None:
    """Take hook ``reg.name`` off ``reg.module`` through the registry's ``remove_hook``, leaving every other hook —
    diffusers', accelerate's, anyone's forward replacement — working as before.

    Corrections around diffusers' ``remove_hook``: a next hook that replaces the forward keeps calling its own
    ``new_forward``, now on top of the forward below the removed hook; a module forward that was wrapped or replaced
    after the registration (accelerate's offload hook, a user's compiled forward) stays the module's forward, and
    an accelerate wrapper that called the removed hook calls what the hook wrapped. When the module is left with
    its class's own forward, the ``forward`` instance attribute is dropped, and a registry this registration
    created is deleted once empty.
    """
    module, name = reg.module, reg.name
    registry = getattr(module, _REGISTRY_ATTR, None)
    if registry is None or name not in registry.hooks:
        return
    order = registry._hook_order
    index = order.index(name)
    fn_ref = registry._fn_refs[index]
    below = fn_ref.original_forward if fn_ref.original_forward is not None else fn_ref.forward
    outer = registry._fn_refs[index + 1] if index + 1 < len(order) else None
    outer_saved = None if outer is None else (outer.forward, outer.original_forward)
    current = module.__dict__.get("forward", _MISSING)
    registry.remove_hook(name, recurse=False)
    if outer is not None and outer_saved[1] is not None:
        # The next hook replaces the forward: keep its new_forward, on top of what the removed hook wrapped.
        outer.forward = outer_saved[0]
        outer.original_forward = below
    if outer is None and current is not reg.wrapper:
        # Wrapped or replaced after the registration: that forward stays; an accelerate wrapper that called ours
        # now calls what ours wrapped.
        if current is _MISSING:
            module.__dict__.pop("forward", None)
        else:
            module.__dict__["forward"] = current
        if module.__dict__.get("_old_forward", None) is reg.wrapper:
            module._old_forward = below
    if _is_class_forward(module, module.__dict__.get("forward", _MISSING)):
        del module.__dict__["forward"]
    if not registry.hooks and reg.created_registry and getattr(module, _REGISTRY_ATTR, None) is registry:
        delattr(module, _REGISTRY_ATTR)


def _is_class_forward(module: torch.nn.Module, fn: Any) -> bool:
    """Whether ``fn`` is ``module``'s class ``forward`` bound to ``module`` (what the attribute lookup gives anyway)."""
    return getattr(fn, "__self__", None) is module and getattr(fn, "__func__", None) is type(module).forward


def attention_backend_name(processor: Any) -> str:
    """The diffusers attention backend an attention processor dispatches to (its own, else the active one), as a
    string; ``"none (the processor calls SDPA itself)"`` for a processor without one."""
    if not hasattr(processor, "_attention_backend"):
        return "none (the processor calls SDPA itself)"
    backend = processor._attention_backend
    if backend is None:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        backend = _AttentionBackendRegistry._active_backend
    return str(getattr(backend, "value", backend))


def unwrap_compiled(module: Any) -> Any:
    """The module a ``torch.compile(module)`` wrapper holds (``module`` itself if it is not one)."""
    while isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
        module = module._orig_mod
    return module
