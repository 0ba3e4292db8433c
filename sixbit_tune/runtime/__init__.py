"""Deployable half of sixbit-tune: load a policy JSON and run DMPQ + Temporal Delta Cache inside a diffusers model.

Must stay light: importing it pulls in no optuna, duckdb, streamlit or plotly (a test guards this).

Usage::

    from sixbit_tune.runtime import apply_policy, load_policy

    handle = apply_policy(pipe, load_policy("policies/wan-h200.json"))   # or pipe.transformer
    video = pipe(prompt, num_inference_steps=50).frames[0]
    print(handle.stats().summary())                                      # NVFP4 share, skipped blocks, ...
    handle.remove()                                                      # the original model, bit for bit

Rules of DMPQ and the Temporal Delta Cache, per-branch state, host synchronisation and run boundaries:
:mod:`sixbit_tune.runtime.controller`. The quantized layer: :mod:`sixbit_tune.runtime.linear`.

``torch.compile`` (checked on CPU, tiny models; :mod:`sixbit_tune.runtime.hooks`): compile *blocks* after applying
a policy (``block.compile()`` / ``torch.compile(block)``; regional compilation). A block graph-breaks at the
runtime's host bookkeeping before and after it (skip decision, Γ/Δ measurement) and around each *dynamic* layer
(its format changes from step to step; tracing it would recompile for every format combination). The block's
attention, norms, MLP and its *static* quantized layers compile. The transformer-level step hook is
compiler-disabled: compiling the whole transformer compiles nothing outside the blocks.
"""

from sixbit_tune.runtime.apply import (
    GPUMismatchWarning,
    PolicyHandle,
    apply_policy,
    check_policy_fits,
    device_target,
    load_policy,
)
from sixbit_tune.runtime.build import make_dynamic_policy, make_static_policy
from sixbit_tune.runtime.linear import MixedPrecisionLinear
from sixbit_tune.runtime.report import RunStats, StepStats

__all__ = [
    "GPUMismatchWarning",
    "MixedPrecisionLinear",
    "PolicyHandle",
    "RunStats",
    "StepStats",
    "apply_policy",
    "check_policy_fits",
    "device_target",
    "load_policy",
    "make_dynamic_policy",
    "make_static_policy",
]
