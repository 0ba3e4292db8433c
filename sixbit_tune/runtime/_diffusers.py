"""The one place the runtime imports diffusers' hook machinery.

``HookRegistry``, ``ModelHook``, ``StateManager``, ``BaseState`` and ``CacheContext`` are semi-private and
undocumented in diffusers 0.42 (FACTS a4); the project pins diffusers ``>=0.42,<0.43``. If an upgrade moves them,
this module is the only one to change.
"""

from __future__ import annotations

from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager

__all__ = ["BaseState", "CacheContext", "HookRegistry", "ModelHook", "StateManager"]
