"""Recording hooks: block statistics and per-layer quantization errors, on the device, beside an unchanged forward.

:func:`instrument` attaches named diffusers ``ModelHook``\\ s (all called :data:`HOOK_NAME`) to

* the transformer (a root hook that notes which ``cache_context`` the call runs in),
* every transformer block (clones the block's input streams before it runs, then computes Γ, ‖Δ‖, and the change
  of Δ against the same block's Δ at the previous step of the same context, from ``sixbit_tune.stats``),
* every ``nn.Linear`` inside the blocks (``act_err``/``out_err`` per route of
  :data:`sixbit_tune.routes.PROFILE_ROUTES`, :mod:`sixbit_tune.profiling.quant`),
* every block's self-attention module (``attn_err`` per attention format, :mod:`sixbit_tune.profiling.attention`).

The hooks never change what a module returns: outputs of an instrumented model are bit-identical to an
uninstrumented one. Statistics stay on the device as small ``[.., B]`` tensors appended to lists; :meth:`flush`
moves everything recorded since the previous flush to the host in one transfer and labels each batch row with its
(prompt, branch) through ``ModelAdapter.row_branches``. Call it once per denoising step (the runner does it from
``callback_on_step_end``).

Per-branch state: the previous Δ of each block lives in a diffusers ``StateManager`` keyed by the cache-context
name, so Wan's ``"cond"``/``"uncond"`` calls keep separate histories and a batched-CFG call keeps per-row history
inside one batch. A call outside any ``cache_context`` uses the context :data:`FALLBACK_CONTEXT` (``"inference"``)
and its rows are labelled as one unguided branch (``"cond"``) unless the family batches CFG.

diffusers' ``StateManager``, ``BaseState`` and ``CacheContext`` are semi-private: they, and every private
attribute of diffusers' hooks, are reached through :mod:`sixbit_tune.compat`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sixbit_tune.compat import (
    BaseState,
    CacheContext,
    ModelHook,
    Registration,
    StatefulHook,
    StateManager,
    current_context,
    get_hook,
    invalidate_child_registries,
    register_hook,
    remove_hook,
    reset_hook_state,
)
from sixbit_tune.errors import NonFiniteError
from sixbit_tune.models.adapters import BlockRef, ModelAdapter, get_adapter
from sixbit_tune.profiling.attention import (
    SDPACapture,
    attention_errors,
    combine_calls,
    fmt_ok,
    self_attention,
    warn_not_captured,
)
from sixbit_tune.profiling.quant import (
    QuantizedWeight,
    nvfp4_gemm_path,
    output_errors,
    quantize_activation,
    quantize_weight,
    routes_for,
)
from sixbit_tune.routes import PROFILE_DEFAULT_ROUTES, PROFILE_ROUTES
from sixbit_tune.stats import Compiled, block_stats, delta_change, stream_delta

__all__ = ["FALLBACK_CONTEXT", "HOOK_NAME", "Instrumentation", "StepRecords", "block_record", "instrument"]

HOOK_NAME = "sixbit_tune.profile"
#: Attention formats recorded unless told otherwise.
DEFAULT_ATTENTION_FORMATS = ("fp8",)
FALLBACK_CONTEXT = "inference"
#: Order of the per-block statistics inside a block record tensor ``[4, B]``.
BLOCK_FIELDS = ("gamma", "delta_change", "delta_cos", "delta_norm")
#: Columns of :attr:`StepRecords.attention` (the store's ``attn_steps`` without run_id).
ATTENTION_COLUMNS = ("prompt_index", "branch", "step", "block_index", "format", "attn_err")


def block_record(
    x_streams: Sequence[torch.Tensor], y_streams: Sequence[torch.Tensor], prev_delta: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block call's statistics: ``([4, B] float32 in BLOCK_FIELDS order, Δ [B, N] float32)``.

    ``delta_change``/``delta_cos`` are NaN when there is no previous Δ of the same shape (first step).
    """
    delta = stream_delta(x_streams, y_streams)
    s = block_stats(x_streams, y_streams, delta=delta)
    if prev_delta is not None and prev_delta.shape == delta.shape:
        change, cos = delta_change(delta, prev_delta)
    else:
        change = cos = torch.full_like(s["gamma"], float("nan"))
    return torch.stack((s["gamma"], change, cos, s["delta_norm"])), delta


class _BlockState(BaseState):
    def __init__(self) -> None:
        self.prev_delta: torch.Tensor | None = None

    def reset(self, *args, **kwargs) -> None:
        self.prev_delta = None


class _ContextState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


def _ensure_context(manager: StateManager) -> bool:
    """Set :data:`FALLBACK_CONTEXT` on a hook's StateManager when no context is active; True if it did (the caller
    clears it again after the call, so a later ``cache_context`` or context-less call is seen as such)."""
    if current_context(manager) is None:
        manager.set_context(CacheContext(FALLBACK_CONTEXT))
        return True
    return False


@dataclass
class _Call:
    """What one transformer call recorded (device tensors until the step's flush)."""

    context: str | None
    blocks: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (block index, [4, B])
    layers: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (layer id, [R, 2, B])
    attention: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (block index, [F, B])


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self.current: _Call | None = None
        self.enabled = True
        self.record_layers = True
        self.record_attention = True
        # (input tensor, its _version, formats key, quantize_activation result) of the last linear call:
        # linears reading the same tensor (attention q/k/v) reuse the quantized activation and its act_err.
        self.act_cache: tuple | None = None


class _RootHook(StatefulHook):

    def __init__(self, recorder: _Recorder):
        super().__init__()
        self.recorder = recorder
        self.state_manager = StateManager(_ContextState)

    def pre_forward(self, module, *args, **kwargs):
        if self.recorder.enabled:
            ctx = current_context(self.state_manager)
            self.recorder.current = _Call(None if ctx is None else ctx.name)
        return args, kwargs

    def post_forward(self, module, output):
        rec = self.recorder
        if rec.current is not None:
            rec.calls.append(rec.current)
            rec.current = None
        rec.act_cache = None
        return output

    def reset_state(self, module):
        self.state_manager.reset()
        return module


class _BlockHook(StatefulHook):

    def __init__(self, recorder: _Recorder, adapter: ModelAdapter, block: BlockRef, fn=block_record):
        super().__init__()
        self.recorder = recorder
        self.adapter = adapter
        self.block = block
        self.fn = fn
        self.state_manager = StateManager(_BlockState)
        self._inputs: tuple[torch.Tensor, ...] | None = None

    def pre_forward(self, module, *args, **kwargs):
        if self.recorder.current is not None:
            streams = self.adapter.streams_in(self.block, args, kwargs)
            self._inputs = tuple(t.detach().clone() for t in streams)
        return args, kwargs

    def post_forward(self, module, output):
        xs, self._inputs = self._inputs, None
        call = self.recorder.current
        if xs is not None and call is not None:
            fallback = _ensure_context(self.state_manager)
            state = self.state_manager.get_state()
            if fallback:
                self.state_manager.set_context(None)
            ys = tuple(t.detach() for t in self.adapter.streams_out(self.block, output))
            rec, state.prev_delta = self.fn(xs, ys, state.prev_delta)
            call.blocks.append((self.block.index, rec))
        return output

    def reset_state(self, module):
        self._inputs = None
        self.state_manager.reset()
        return module


class _LinearHook(ModelHook):
    def __init__(self, recorder: _Recorder, layer_id: int, qw: QuantizedWeight, act_fn=quantize_activation,
                 out_fn=output_errors, hessian: torch.Tensor | None = None):
        super().__init__()
        self.recorder = recorder
        self.layer_id = layer_id
        self.qw = qw
        self.act_fn = act_fn
        self.out_fn = out_fn
        self.key = qw.act_key
        self.act_index = list(qw.act_index)
        #: sum of xᵀx over the input rows of the recorded calls ([K, K]; None: not accumulated)
        self.hessian = hessian
        self.hessian_rows = 0

    def new_forward(self, module, *args, **kwargs):
        out = self.fn_ref.original_forward(*args, **kwargs)
        rec = self.recorder
        if rec.current is None:
            return out
        x = args[0] if args else kwargs["input"]
        if self.hessian is not None:
            rows = x.detach().reshape(-1, x.shape[-1]).to(self.hessian.dtype)
            self.hessian.addmm_(rows.T, rows)
            self.hessian_rows += rows.shape[0]
        if rec.record_layers:
            cache = rec.act_cache
            version = _version(x)
            if cache is not None and cache[0] is x and cache[1] == version and cache[2] == self.key:
                qa = cache[3]
            else:
                qa = self.act_fn(x, *self.key)
                rec.act_cache = (x, version, self.key, qa)
            act, xv, xs, xq, xqs, xf, xfs = qa
            qw = self.qw
            err = self.out_fn(out, qw.bias, xv, xs, qw.nvfp4_v, qw.nvfp4_s, xq, xqs, qw.int8_q, qw.int8_s,
                              xf, xfs, qw.fp8_q, qw.fp8_s)
            rec.current.layers.append((self.layer_id, torch.stack((act[self.act_index], err), dim=1)))
        return out


class _AttentionHook(ModelHook):
    """On a block's self-attention module: records every ``scaled_dot_product_attention`` call it makes and
    appends the block's ``attn_err`` ``[F, B]`` to the current call."""

    def __init__(self, recorder: _Recorder, block: BlockRef, name: str, formats: tuple[str, ...]):
        super().__init__()
        self.recorder = recorder
        self.block = block
        self.name = name
        self.formats = formats
        self.warned = False

    def new_forward(self, module, *args, **kwargs):
        rec = self.recorder
        if rec.current is None or not rec.record_attention:
            return self.fn_ref.original_forward(*args, **kwargs)
        with SDPACapture() as cap:
            out = self.fn_ref.original_forward(*args, **kwargs)
        x = args[0] if args else kwargs.get("hidden_states")
        why = None
        if not cap.calls:
            why = ("its attention made no torch.nn.functional.scaled_dot_product_attention call (an attention "
                   "backend other than diffusers' 'native' one?)")
        else:
            skipped = [c.skip for c in cap.calls if c.skip]
            if skipped:
                why = f"its attention call has {skipped[0]}"
        if why is None:
            parts = [attention_errors(c, self.formats) for c in cap.calls]
            try:
                batch = x.shape[0] if torch.is_tensor(x) else None
                rec.current.attention.append((self.block.index, combine_calls(parts, batch)))
            except ValueError as e:
                why = str(e)
        if why is not None and not self.warned:
            self.warned = True
            warn_not_captured(self.name, why)
        return out


def _version(x: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; None for inference-mode tensors, which have none (for them the
    activation cache relies on identity alone: nothing between a module's q/k/v projections writes their input)."""
    try:
        return x._version
    except RuntimeError:
        return None


@dataclass
class StepRecords:
    """Host-side rows of one flush, column-wise, named as the store's ``block_steps``/``layer_steps``/
    ``attn_steps`` columns.

    ``blocks`` keys: prompt_index, branch, step, timestep, block_index, block, gamma, delta_change, delta_cos,
    delta_norm. ``layers`` keys: prompt_index, branch, step, block_index, layer, format, act_err, out_err.
    ``attention`` keys: prompt_index, branch, step, block_index, format, attn_err.
    NaN statistics that mean "not defined" (Δ change at a block's first step) are None.
    """

    blocks: dict[str, list]
    layers: dict[str, list]
    attention: dict[str, list] = field(default_factory=lambda: {k: [] for k in ATTENTION_COLUMNS})

    @staticmethod
    def empty() -> StepRecords:
        return StepRecords(
            {k: [] for k in ("prompt_index", "branch", "step", "timestep", "block_index", "block", *BLOCK_FIELDS)},
            {k: [] for k in ("prompt_index", "branch", "step", "block_index", "layer", "format", "act_err", "out_err")},
            {k: [] for k in ATTENTION_COLUMNS},
        )

    def extend(self, other: StepRecords) -> None:
        for mine, theirs in ((self.blocks, other.blocks), (self.layers, other.layers),
                             (self.attention, other.attention)):
            for k, v in theirs.items():
                mine[k].extend(v)

    def __len__(self) -> int:
        return len(self.blocks["step"]) + len(self.layers["step"]) + len(self.attention["step"])


class Instrumentation:
    """Recording hooks attached to one transformer. Build with :func:`instrument`; use as a context manager or
    call :meth:`remove`.

    Attributes:
        adapter: the model's :class:`ModelAdapter`.
        formats: the profiled routes (:data:`sixbit_tune.routes.PROFILE_ROUTES` names, in that order).
        layer_names: full module names of the instrumented linears (index = layer id).
        layer_formats: per layer, the routes recorded for it (those over an NVFP4 weight are left out where
            K % 16 != 0).
        attention_formats: the attention formats whose ``attn_err`` is recorded (empty: none).
        attention_modules: ``block index -> full module name`` of each instrumented self-attention.
        hessians: whether each linear whose in_features is a multiple of 16 accumulates ``sum xᵀx`` over the input
            rows of every recorded call (:meth:`nvfp4_hessians`; float64 on the CPU, float32 on a GPU).
    """

    def __init__(
        self,
        model: Any,
        formats: Sequence[str] = PROFILE_DEFAULT_ROUTES,
        layers: bool = True,
        compile_stats: bool | None = None,
        attention_formats: Sequence[str] = DEFAULT_ATTENTION_FORMATS,
        hessians: bool = False,
    ):
        self.adapter = get_adapter(model)
        self.hessians = bool(hessians)
        self.transformer = self.adapter.transformer
        unknown = [f for f in formats if f not in PROFILE_ROUTES]
        if unknown or not formats or len(set(formats)) != len(formats):
            raise ValueError(f"formats must be distinct values of {PROFILE_ROUTES} (at least one), got {list(formats)}")
        self.formats = tuple(f for f in PROFILE_ROUTES if f in formats)
        self.attention_formats = fmt_ok(attention_formats)
        self.attention_modules: dict[int, str] = {}
        self._recorder = _Recorder()
        device = next(self.transformer.parameters()).device
        if compile_stats is None:
            compile_stats = device.type == "cuda"
        self.compile_stats = bool(compile_stats)
        block_fn, act_fn, out_fn = block_record, quantize_activation, output_errors
        self._compiled: list[Compiled] = []
        if self.compile_stats:
            block_fn, act_fn, out_fn = Compiled(block_record), Compiled(quantize_activation), Compiled(output_errors)
            self._compiled = [block_fn, act_fn, out_fn]
        #: how the NVFP4 product of out_err runs (see sixbit_tune.profiling.quant)
        self.nvfp4_gemm = nvfp4_gemm_path(device)
        self._blocks = self.adapter.blocks()
        self.layer_names: list[str] = []
        self.layer_formats: list[tuple[str, ...]] = []
        self._layer_block: list[int] = []
        self._modules: list[torch.nn.Module] = []
        self._linear_hooks: list[_LinearHook] = []
        self._registrations: list[Registration] = []
        self._removed = False
        try:
            self._register(self.transformer, _RootHook(self._recorder))
            for ref in self._blocks:
                self._register(ref.module, _BlockHook(self._recorder, self.adapter, ref, block_fn))
                attn = self_attention(ref.module) if self.attention_formats else None
                if attn is not None:
                    name = f"{ref.name}.{attn[0]}"
                    self.attention_modules[ref.index] = name
                    self._register(attn[1], _AttentionHook(self._recorder, ref, name, self.attention_formats))
                if not layers:
                    continue
                for rel, lin in self.adapter.linears(ref).items():
                    fmts = routes_for(self.formats, lin.in_features)
                    if fmts != self.formats:
                        warnings.warn(
                            f"{ref.name}.{rel}: in_features={lin.in_features} is not a multiple of 16, so no NVFP4 "
                            f"weight; recording {', '.join(fmts) or 'nothing'} only for it",
                            stacklevel=2,
                        )
                    if not fmts:
                        continue
                    layer_id = len(self.layer_names)
                    qw = quantize_weight(lin, fmts)
                    self.layer_names.append(f"{ref.name}.{rel}")
                    self.layer_formats.append(qw.formats)
                    self._layer_block.append(ref.index)
                    hessian = None
                    if self.hessians and lin.in_features % 16 == 0:
                        dtype = torch.float32 if device.type == "cuda" else torch.float64
                        hessian = torch.zeros(lin.in_features, lin.in_features, dtype=dtype, device=device)
                    hook = _LinearHook(self._recorder, layer_id, qw, act_fn, out_fn, hessian)
                    self._linear_hooks.append(hook)
                    self._register(lin, hook)
        except BaseException:
            self.remove()
            raise
        # The root registry caches its child-registry list at the first cache_context(); hooks added after that
        # would never see a context unless the cache is invalidated.
        invalidate_child_registries(self.transformer)

    # ------------------------------------------------------------------------------------------------ control
    def nvfp4_hessians(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Per layer name, ``sum xᵀx`` ``[K, K]`` over the input rows of every call recorded so far (on the CPU),
        and the number of rows; empty unless built with ``hessians=True``. :meth:`reset` does not clear them."""
        hess, rows = {}, {}
        for hook in self._linear_hooks:
            if hook.hessian is not None:
                name = self.layer_names[hook.layer_id]
                hess[name] = hook.hessian.detach().to("cpu", copy=True)
                rows[name] = int(hook.hessian_rows)
        return hess, rows

    @property
    def compile_failures(self) -> list[str]:
        """Why ``torch.compile`` of a statistic function failed (its eager version ran instead); empty if none."""
        return [c.failed for c in self._compiled if c.failed]

    @property
    def enabled(self) -> bool:
        """Whether calls are recorded (hooks stay attached either way; disabled hooks only pass through)."""
        return self._recorder.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._recorder.enabled = bool(value)

    @property
    def record_layers(self) -> bool:
        """Whether the per-layer errors are recorded for the calls to come (block statistics always are while
        :attr:`enabled`). The runner turns it off on steps that ``ProfileConfig.layer_every`` skips."""
        return self._recorder.record_layers

    @record_layers.setter
    def record_layers(self, value: bool) -> None:
        self._recorder.record_layers = bool(value)

    @property
    def record_attention(self) -> bool:
        """Whether ``attn_err`` is recorded for the calls to come (the runner turns it off on steps that
        ``ProfileConfig.attention_every`` skips)."""
        return self._recorder.record_attention

    @record_attention.setter
    def record_attention(self, value: bool) -> None:
        self._recorder.record_attention = bool(value)

    def _register(self, module: torch.nn.Module, hook: ModelHook) -> None:
        self._registrations.append(register_hook(module, hook, HOOK_NAME))
        self._modules.append(module)

    def reset(self) -> None:
        """Drop every unflushed record and every block's previous Δ (start of a new prompt). Only this
        instrumentation's hooks are reset; other stateful hooks on the model keep their state."""
        self._recorder.calls.clear()
        self._recorder.current = None
        self._recorder.act_cache = None
        for module in self._modules:
            reset_hook_state(module, HOOK_NAME)

    def remove(self) -> None:
        """Detach every hook this instrumentation attached and drop its state (previous Δ, quantized weights,
        so their device memory is freed even while this object is still referenced). Idempotent."""
        if self._removed:
            return
        self.reset()
        for reg in reversed(self._registrations):
            hook = get_hook(reg.module, HOOK_NAME)
            if isinstance(hook, _LinearHook):
                hook.qw = None
            remove_hook(reg)
        self._registrations.clear()
        self._modules.clear()
        self._recorder.calls.clear()
        self._recorder.current = None
        self._recorder.act_cache = None
        invalidate_child_registries(self.transformer)
        self._removed = True

    def __enter__(self) -> Instrumentation:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ------------------------------------------------------------------------------------------------ output
    @property
    def pending_calls(self) -> int:
        """Transformer calls recorded since the last flush."""
        return len(self._recorder.calls)

    def flush(self, step: int, prompt_indices: Sequence[int], timestep: float | None = None) -> StepRecords:
        """Move everything recorded since the last flush to the host (one device-to-host copy) as rows.

        Args:
            step: the denoising step the recorded calls belong to.
            prompt_indices: the global prompt index of each prompt row of the calls (``num_prompts`` =
                ``len(prompt_indices)``; row ``r`` of a call belongs to ``prompt_indices[r % num_prompts]``).
            timestep: the scheduler timestep of the step, if known.

        Raises:
            NonFiniteError: a statistic is NaN where it must be defined (non-finite activations or weights),
                naming the block or layer and the step.
            ValueError: a call's batch does not fit ``len(prompt_indices)`` and the family's CFG mode.
        """
        calls, self._recorder.calls = self._recorder.calls, []
        self._recorder.act_cache = None
        out = StepRecords.empty()
        if not calls:
            return out
        n = len(prompt_indices)
        tensors = [t for c in calls for _, t in (*c.blocks, *c.layers, *c.attention)]
        if not tensors:
            return out
        host = torch.cat([t.reshape(-1) for t in tensors]).double().cpu().tolist()
        pos = 0
        ts = None if timestep is None else float(timestep)
        for call in calls:
            batch = next(t.shape[-1] for _, t in (*call.blocks, *call.layers, *call.attention))
            ctx = call.context
            if ctx is None and self.adapter.cfg_mode == "separate":
                ctx = "cond"
            branches = self.adapter.row_branches(batch, n, ctx)
            prompts = [int(prompt_indices[r % n]) for r in range(batch)]
            b = out.blocks
            for block_index, _rec in call.blocks:
                vals = host[pos : pos + 4 * batch]
                pos += 4 * batch
                name = self._blocks[block_index].name
                for r in range(batch):
                    g, ch, cs, nm = (vals[i * batch + r] for i in range(4))
                    if math.isnan(g) or math.isnan(nm):
                        raise NonFiniteError(
                            f"block {name} at step {step} ({branches[r]}, prompt {prompts[r]}) has non-finite "
                            "statistics: its input or output holds NaN"
                        )
                    b["prompt_index"].append(prompts[r])
                    b["branch"].append(branches[r])
                    b["step"].append(step)
                    b["timestep"].append(ts)
                    b["block_index"].append(block_index)
                    b["block"].append(name)
                    b["gamma"].append(g)
                    b["delta_change"].append(None if math.isnan(ch) else ch)
                    b["delta_cos"].append(None if math.isnan(cs) else cs)
                    b["delta_norm"].append(nm)
            lay = out.layers
            for layer_id, t in call.layers:
                fmts = self.layer_formats[layer_id]
                rows = t.shape[-1]
                if rows != batch:
                    raise ValueError(
                        f"{self.layer_names[layer_id]}: input has {rows} rows in dim 0 but the block batch has "
                        f"{batch}; cannot attribute its errors to (prompt, branch) rows"
                    )
                vals = host[pos : pos + len(fmts) * 2 * batch]
                pos += len(fmts) * 2 * batch
                for fi, fmt in enumerate(fmts):
                    for r in range(batch):
                        act = vals[(fi * 2) * batch + r]
                        err = vals[(fi * 2 + 1) * batch + r]
                        if math.isnan(act) or math.isnan(err):
                            raise NonFiniteError(
                                f"layer {self.layer_names[layer_id]} ({fmt}) at step {step} ({branches[r]}, prompt "
                                f"{prompts[r]}) has non-finite errors: its input, output or weight holds NaN/Inf"
                            )
                        lay["prompt_index"].append(prompts[r])
                        lay["branch"].append(branches[r])
                        lay["step"].append(step)
                        lay["block_index"].append(self._layer_block[layer_id])
                        lay["layer"].append(self.layer_names[layer_id])
                        lay["format"].append(fmt)
                        lay["act_err"].append(act)
                        lay["out_err"].append(err)
            att = out.attention
            fmts = self.attention_formats
            for block_index, t in call.attention:
                if t.shape[-1] != batch:
                    raise ValueError(
                        f"{self.attention_modules[block_index]}: attention of {t.shape[-1]} rows but the block batch "
                        f"has {batch}; cannot attribute its errors to (prompt, branch) rows"
                    )
                vals = host[pos : pos + len(fmts) * batch]
                pos += len(fmts) * batch
                for fi, fmt in enumerate(fmts):
                    for r in range(batch):
                        err = vals[fi * batch + r]
                        if not math.isfinite(err):
                            raise NonFiniteError(
                                f"attention {self.attention_modules[block_index]} ({fmt}) at step {step} "
                                f"({branches[r]}, prompt {prompts[r]}) has a non-finite attn_err: its q, k, v or "
                                "output holds NaN/Inf"
                            )
                        att["prompt_index"].append(prompts[r])
                        att["branch"].append(branches[r])
                        att["step"].append(step)
                        att["block_index"].append(block_index)
                        att["format"].append(fmt)
                        att["attn_err"].append(err)
        return out


def instrument(
    model: Any,
    formats: Sequence[str] = PROFILE_DEFAULT_ROUTES,
    layers: bool = True,
    compile_stats: bool | None = None,
    attention_formats: Sequence[str] = DEFAULT_ATTENTION_FORMATS,
    hessians: bool = False,
) -> Instrumentation:
    """Attach recording hooks to a diffusers pipeline's transformer (or a transformer).

    Args:
        model: a pipeline or transformer of a supported family.
        formats: routes whose per-layer errors are recorded (:data:`sixbit_tune.routes.PROFILE_ROUTES` names).
        layers: also instrument the linears (False: block statistics only).
        attention_formats: attention formats (``"fp8"``, ``"int8"``) whose ``attn_err`` each block's
            self-attention records; empty: none.
        compile_stats: ``torch.compile`` the statistic functions (fused device kernels); default: on CUDA only.
            Hooks and model stay eager either way. Measured on the H200 at CogVideoX-2B: the compiled layer
            statistics differ from the eager ones (which match ``sixbit_tune.formats`` to 1e-7) by up to 4.9e-3
            relative, block statistics by 4e-7; the layer difference is not explained yet (suspected: Triton's
            float32 division moving a quantization code across a rounding boundary in small layers).
        hessians: each linear (in_features a multiple of 16) accumulates ``sum xᵀx`` over its recorded inputs, the
            calibration of the ``"gptq"`` NVFP4 weight encoder (:meth:`Instrumentation.nvfp4_hessians`).

    Returns:
        The :class:`Instrumentation` (call ``remove()`` or use it as a context manager).

    Raises:
        UnsupportedModelError: the model is not a supported family.
        NonFiniteError: a weight holds NaN or Inf.
    """
    return Instrumentation(model, formats=formats, layers=layers, compile_stats=compile_stats,
                           attention_formats=attention_formats, hessians=hessians)
