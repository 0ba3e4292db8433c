"""Profiling: recording hooks on a real pipeline, and the run that writes their statistics into a store.

Public API (imported lazily so that ``sixbit-tune --help`` does not import torch)::

    from sixbit_tune.profiling import ProfileConfig, profile, instrument

    run_id = profile(ProfileConfig(model="tiny:wan", prompts=["a cat"], store="runs/cpu", steps=4))

    with instrument(pipe) as inst:          # hooks on blocks and in-block linears
        pipe(..., callback_on_step_end=lambda p, i, t, kw: (rows.extend(inst.flush(i, [0], float(t))), {})[1])
"""

from __future__ import annotations

from typing import Any

__all__ = ["Instrumentation", "ProfileConfig", "StepRecords", "instrument", "load_prompts", "profile"]

_LAZY = {
    "ProfileConfig": "sixbit_tune.profiling.config",
    "load_prompts": "sixbit_tune.profiling.config",
    "profile": "sixbit_tune.profiling.runner",
    "instrument": "sixbit_tune.profiling.hooks",
    "Instrumentation": "sixbit_tune.profiling.hooks",
    "StepRecords": "sixbit_tune.profiling.hooks",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sixbit_tune.profiling' has no attribute {name!r}")
