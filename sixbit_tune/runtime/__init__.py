"""Deployable half of sixbit-tune: load a policy JSON and run DMPQ + Temporal Delta Cache inside a diffusers model.

Must stay light: importing it pulls in no optuna, duckdb, streamlit or plotly (a test guards this).

Usage::

    from sixbit_tune.runtime import apply_policy, load_policy

    handle = apply_policy(pipe, load_policy("policies/wan-h200.json"))   # or pipe.transformer
    video = pipe(prompt, num_inference_steps=50).frames[0]
    print(handle.stats().summary())                                      # NVFP4 share, skipped blocks, ...
    handle.remove()                                                      # the original model, bit for bit

Rules of DMPQ and the Temporal Delta Cache, per-branch state, host synchronisation and run boundaries:
:mod:`sixbit_tune.runtime.controller`. The quantized layer: :mod:`sixbit_tune.runtime.linear`. 8-bit attention on
the attention processors: :mod:`sixbit_tune.runtime.attention`.

``torch.compile`` (checked on CPU with tiny models, ``tests/runtime/test_runtime_compile*.py``), before or after
applying a policy: regional compilation (``block.compile()``, ``transformer.compile_repeated_blocks()``) is the
recommended way; ``torch.compile(transformer)`` / ``transformer.compile()`` works too. What compiles and what
breaks the graph:

* compiles: the block's attention (8-bit attention included: a torch custom op), norms, MLP and elementwise code,
  and its quantized layers: static ones (modes ``"fast"``/``"robust"``) as one call each, *dynamic* ones as a
  ``torch.cond`` over both routes whose predicate is a CPU tensor the runtime sets per step (no recompilation
  and no graph break when routes change); outputs equal eager bit for bit with the ``eager`` backend and to 1e-5
  with inductor; the TDC/DMPQ decisions are the same;
* graph breaks (``torch.compiler.disable``): the runtime's bookkeeping before the block (skip decision, formats,
  input clone) and after it (Γ/Δ measurement, cache update);
* graph breaks outside the runtime: on the CPU/reference path, every activation quantizer checks finiteness with
  ``bool(tensor)`` (``sixbit_tune.formats``), which breaks the graph at each quantized layer. The CUDA kernel
  path is called with ``check_finite=False`` (the runtime checks once per step instead); whether the Triton
  kernels trace without breaks is the kernels' business and is not checked here;
* the step logic (torch forward hooks on the transformer) is compiler-disabled: with the whole transformer
  compiled, its submodules and blocks compile and the transformer's own forward code between them runs eager;
* a compiled function assigned to ``block.forward`` after ``apply_policy`` replaces the policy's block hook: such
  blocks run without the policy (a warning, once, and a note in the statistics).
"""

from sixbit_tune.runtime.apply import (
    GPUMismatchWarning,
    PolicyHandle,
    apply_policy,
    check_policy_fits,
    device_menu,
    device_target,
    load_policy,
)
from sixbit_tune.runtime.attention import AttentionHandle, AttentionStats, install_attention
from sixbit_tune.runtime.build import make_dynamic_policy, make_static_policy
from sixbit_tune.runtime.linear import MixedPrecisionLinear
from sixbit_tune.runtime.report import RunStats, StepStats

__all__ = [
    "AttentionHandle",
    "AttentionStats",
    "GPUMismatchWarning",
    "MixedPrecisionLinear",
    "PolicyHandle",
    "RunStats",
    "StepStats",
    "apply_policy",
    "check_policy_fits",
    "device_menu",
    "device_target",
    "install_attention",
    "load_policy",
    "make_dynamic_policy",
    "make_static_policy",
]
