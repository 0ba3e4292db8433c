"""DMPQ and Temporal Delta Cache at inference: per-step decisions, per-block measurements, per-context state.

Exact rules (their one definition: :mod:`sixbit_tune.rules`), for block ``l`` at denoising step ``t`` of one cache context (guidance branch):

* **DMPQ.** A ``"dynamic"`` layer ``j`` of block ``l`` runs NVFP4 iff ``α_j·Γ_l + β_j ≤ τ`` where ``Γ_l`` is the
  block's Γ at its most recent full computation before step ``t`` (normally step ``t−1``; when the block was
  skipped at ``t−1``, the step it last ran). With no Γ yet (the first step), the layer runs
  ``dmpq.first_step_format``. Static layers (``"nvfp4"``, ``"int8"``) ignore the predictor; ``"none"`` layers
  are never replaced.
* **TDC.** Let ``r_l`` be the block's last measured per-step change: ``delta_change(Δ_t, Δ_s) / (t − s)`` between
  its two most recent full computations ``s < t`` (so a change measured across skipped steps is spread over them).
  Skipping step ``t`` would bring the change accumulated since the last full computation to ``A_l + r_l``. The
  block is skipped iff ``tdc.tolerance > 0``, the block may cache (``tdc.blocks``), ``warmup ≤ t < N − cooldown``,
  it has been skipped fewer than ``max_skips`` times in a row, a cached Δ and ``r_l`` exist, and ``A_l + r_l ≤ δ``.
  Then ``A_l += r_l`` and the block returns ``X + Δ_cached`` for every stream. Any full computation resets
  ``A_l`` to 0, refreshes Δ (stored in ``tdc.cache_dtype``) and ``r_l``. Tolerance 0 never skips; the cap and
  the per-step accumulation rule out skipping forever.
* **The cache.** Δ is kept per stream, only for blocks that may still be skipped later in the run (in
  ``tdc.blocks``, TDC on, a step of the window still ahead); other blocks hold none. ``tdc.cache_dtype`` stores
  it as that dtype, or, for ``"float8_e4m3fn"``, as FP8 E4M3 codes with one float32 scale per token (per slice
  of the last dim; :func:`sixbit_tune.formats.fp8.quantize`), dequantized to float32 on the skip path and for
  the change of Δ. With ``tdc.extrapolate = 1`` the Δ of the full computation before the last is kept too (same
  storage), and a block skipped at step ``t``, last computed at ``s`` and before that at ``s_prev``, returns
  ``X + (Δ_s + (Δ_s − Δ_prev) · (t − s) / (s − s_prev))`` for every stream (:func:`sixbit_tune.rules.tdc_extrapolate`,
  computed in float32 on the dequantized Δs, then cast to X's dtype); where no earlier Δ exists (a forced skip
  after one computation) it returns ``X + Δ_s``. ``RunStats.cache_bytes`` is the peak of the bytes held by the
  cache (codes, scales and both Δs included).
* **Refresh.** With ``tdc.refresh_robust = 1``, a block's first full computation after a skip runs every
  dynamic layer of the block on the robust route (``rules.dmpq_formats(refresh_robust=True)``).
* **Guidance branches and rows.** State is kept per ``cache_context`` name (Wan and HunyuanVideo call the
  transformer once per branch) and, inside a context, per batch row (a row = one (prompt, branch); batched-CFG
  families carry ``[uncond rows; cond rows]``). Γ, Δ, the change, its rate, the accumulated change, the
  consecutive skips and the steps of the last computations are per row (``sixbit_tune.stats``), so nothing is
  averaged across branches. ``tdc.cfg_rows`` says how a call of several rows decides a block:

  - ``"joint"`` (the default): a block is skipped only if *every* row may skip (``rules.tdc_skip``), else it runs
    on every row;
  - ``"per_row"``: each row is decided alone (``rules.tdc_skip_rows``). Where some rows skip and others do not,
    the block runs on the computing rows only (its arguments taken by rows: :mod:`sixbit_tune.runtime.rows`), the
    skipped rows return their ``X + Δ`` (or extrapolation, with each row's own steps), and only the computed rows'
    measurements and cache entries change. Where the call's arguments cannot be taken by rows (a tensor whose
    first dimension could be the batch or the tokens, a stream not ``[rows, ...]``), the block runs on every row,
    as the joint rule does, and the run's notes say why.

  A layer runs NVFP4 only if the prediction of *every* row the block runs on is ``≤ τ``.
  ``RunStats.skipped_blocks`` counts the calls skipped for every row; ``skip_record_rows`` (set it to ``{}``)
  records the per-row decisions.
* **Host synchronisation.** Γ, the change of Δ and a finiteness flag of the output are computed on the device.
  At the start of a transformer call, every value still on the device (from the previous calls of *all*
  contexts; for a bare transformer without step index also the call's timestep) is fetched with one
  ``torch.cat(...).tolist()``. That is one sync per denoising step: with separate CFG the second branch's call
  finds nothing left to fetch. Decisions for every block and layer of the call are then made on the host. NaN
  in a measured Γ or a non-finite output raises :class:`~sixbit_tune.errors.NonFiniteError` there (one step
  late, without extra syncs); the last step's flag is checked when the run ends (a warning).
* **Steps and runs.** ``t`` is the number of calls the context has seen in the current run (or the context's
  ``step_index`` when the pipeline supplies it, as Wan does). ``N`` comes from the context's
  ``num_inference_steps`` (Wan), else from a number the handle was told, else from ``len(scheduler.timesteps)``
  of the pipeline the policy was applied to; with ``N`` unknown and ``cooldown > 0`` no block is skipped (noted
  in the run's statistics). A run ends, and all state is dropped, when diffusers resets stateful hooks at the end
  of a pipeline call, when a transformer call raises, or when a new run is detected at the start of a call: the
  pipeline's scheduler holds a new ``timesteps`` tensor (every pipeline call sets one), the context's
  ``step_index`` went back, or (bare transformer, no ``step_index``) the timestep went up. So a call that failed
  anywhere cannot leak state into the next one. Not detected: with a bare transformer, an exception *outside* the
  transformer during the very first step followed by a run starting at the same timestep; and, with a handle made
  from a pipeline, direct transformer calls outside pipeline calls continue the current run. Call
  ``handle.reset()`` there.
* **What is measured.** Γ only for blocks holding dynamic layers, Δ and its change only for blocks that may still
  be skipped later in the run; a policy without dynamic layers and without TDC measures nothing.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sixbit_tune import routes as _routes
from sixbit_tune import rules as _rules
from sixbit_tune import stats as _stats
from sixbit_tune.compat import BaseState, CacheContext, StateManager, current_context, diffusers_cache_hooks
from sixbit_tune.errors import NonFiniteError, PolicyError
from sixbit_tune.formats import fp8 as _fp8
from sixbit_tune.models.adapters import STREAM_ARGUMENTS, _positional_indices
from sixbit_tune.runtime.linear import MixedPrecisionLinear
from sixbit_tune.runtime.report import RunStats, StepStats
from sixbit_tune.runtime.rows import RowSplitRefused, put_rows, row_runs, split_call, take_rows

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
           "float8_e4m3fn": _fp8.DTYPE}
#: One stream of a cached Δ: a tensor in the cache dtype, or (FP8 codes, float32 scale per token).
CachedStream = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
DEFAULT_CONTEXT = "inference"


@dataclass
class BlockInfo:
    """What the controller knows about one block (built once by ``apply_policy``)."""

    ref: Any  # models.adapters.BlockRef
    dynamic: list[MixedPrecisionLinear]
    alphas: list[float]
    betas: list[float]
    static_calls: dict[str, int]  # per block call, executed static layers by activation format
    cacheable: bool
    # 8-bit attention installed on this block (see PolicyHandle): "8bit" / "bf16" for a fixed mode, "dynamic" for a
    # mode chosen each step from attn_line (alpha, beta) and Γ, as the DMPQ rule chooses a dynamic layer's route.
    attention: str | None = None
    attn_line: tuple[float, float] | None = None
    # Per guidance branch ("cond", "uncond"): the dynamic layers' alphas and betas and the attention line, used by the
    # cache context named after that branch (separate CFG: one transformer call per branch). Other contexts
    # ("cond_uncond" of batched CFG, "inference") find none here: the shared lines above (the decision lines) decide.
    branch_lines: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    branch_attn_lines: dict[str, tuple[float, float]] = field(default_factory=dict)


class ContextState(BaseState):
    """Everything remembered for one cache context during one run (see the module docstring)."""

    def __init__(self, n_blocks: int = 0, name: str | None = None):
        self.n = n_blocks
        # The cache context's name: a separate-CFG pipeline names each branch's context after the branch, so it
        # selects that branch's predictor lines (BlockInfo.branch_lines); other names select none.
        self.branch = name
        self.reset()

    def reset(self, *args, **kwargs) -> None:
        n = self.n
        self.rows: int | None = None
        self.step = 0
        self.last_timestep: float | None = None
        # Per block; the lists inside hold one entry per batch row. A value on the device comes with the rows it
        # was measured for (None: every row) and, for the change of Δ, each row's steps since its computation before.
        self.gamma_dev: list[tuple[torch.Tensor, list[int] | None] | None] = [None] * n
        self.gamma: list[list[float | None] | None] = [None] * n
        self.change_dev: list[tuple[torch.Tensor, list[int] | None, list[int]] | None] = [None] * n
        self.rate: list[list[float | None] | None] = [None] * n
        self.acc: list[list[float]] = [[] for _ in range(n)]
        self.consec: list[list[int]] = [[] for _ in range(n)]
        self.last_compute: list[list[int | None]] = [[] for _ in range(n)]
        self.cache: list[tuple[CachedStream, ...] | None] = [None] * n
        self.cache_prev: list[tuple[CachedStream, ...] | None] = [None] * n  # tdc.extrapolate: the Δ before
        self.prev_compute: list[list[int | None]] = [[] for _ in range(n)]  # per row, the step of cache_prev
        self.skip = [False] * n  # skipped for every row
        # tdc.cfg_rows "per_row": the rows to skip where some rows skip and others do not (None elsewhere), and the
        # skipped rows' new accumulated change; applied, or turned into a full computation, when the block is called.
        self.split: list[list[bool] | None] = [None] * n
        self.split_acc: list[list[float | None] | None] = [None] * n
        self.fmts: list[list[str]] = [[] for _ in range(n)]
        self.attn_modes: list[str] = ["bf16"] * n  # dynamic attention: the mode of the block's next computation
        self.measure_gamma = [False] * n
        self.measure_delta = [False] * n
        self.finite_dev: torch.Tensor | None = None  # isfinite(all) of the last call's output, not yet fetched

    def set_rows(self, rows: int) -> None:
        """Size the per-row lists for calls of ``rows`` rows (the state was reset when the rows changed)."""
        self.rows = rows
        for i in range(self.n):
            if len(self.consec[i]) != rows:
                self.consec[i] = [0] * rows
                self.last_compute[i] = [None] * rows
                self.prev_compute[i] = [None] * rows


@dataclass
class _CallRecord:
    context: str
    step: int
    rows: int
    layer_calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_routes.ACTIVATION_FORMATS, 0))
    block_calls: int = 0
    skipped: int = 0
    attention_calls: dict[str, int] = field(default_factory=dict)


class Controller:
    """Owns the per-context state and makes every DMPQ/TDC decision. One per applied policy."""

    def __init__(self, policy, adapter, blocks: list[BlockInfo], execution: Callable[[], dict[str, str]],
                 weight_bytes: dict[str, int], pipeline: Any = None, num_inference_steps: int | None = None,
                 compile_stats: bool = False):
        self.policy = policy
        self.adapter = adapter
        self.blocks = blocks
        self.pipeline = pipeline
        self.num_inference_steps = num_inference_steps
        self.execution = execution
        self.weight_bytes = weight_bytes
        self.state_manager = StateManager(ContextState, (len(blocks),))
        self.states: dict[str, ContextState] = {}
        self.active: ContextState | None = None
        self._call: _CallRecord | None = None
        self._seen_timesteps: Any = None
        self._scheduler_steps: int | None = None
        tdc = policy.tdc
        self.threshold = float(policy.dmpq.threshold)
        self.first_format = policy.dmpq.first_step_format
        self.tolerance = float(tdc.tolerance)
        self.cache_dtype = _DTYPES[tdc.cache_dtype]
        self.extrapolate = bool(tdc.extrapolate)
        self.refresh_robust = bool(tdc.refresh_robust)
        self.per_row = getattr(tdc, "cfg_rows", "joint") == "per_row"  # the policy checked the value
        att = getattr(policy, "attention", None)
        self.attn_threshold = float(att.threshold) if att is not None else 0.0
        # The installed 8-bit attention (runtime.attention.AttentionHandle), set by PolicyHandle; None: none.
        self.attention: Any = None
        self._param_names: dict[type, tuple[str | None, ...]] = {}
        self.tdc_enabled = tdc.tolerance > 0 and tdc.max_skips > 0 and any(b.cacheable for b in blocks)
        self._cache_bytes = 0
        self._new_run_stats()
        self.last_run: RunStats | None = None
        self._hidden_pos, self._timestep_pos = _arg_positions(adapter.transformer)
        self._measure = _stats.Compiled(measure_block) if compile_stats else measure_block
        # PolicyHandle.record_skips / force_skips: {context: {step: [skip per block]}} and {context: [[skip]]}.
        self.skip_record: dict[str, dict[int, list[bool]]] | None = None
        self.forced_skips: dict[str, list[list[bool | list[bool]]]] | None = None
        # {context: {step: [[skip per row] per block]}}, filled beside skip_record when not None.
        self.skip_record_rows: dict[str, dict[int, list[list[bool]]]] | None = None
        self._call_state: ContextState | None = None
        self._own_context = False
        self._seen: list[bool] = []
        self._bypass_warned = False
        # The transformer and its blocks: where a diffusers cache enabled after apply_policy puts its hooks.
        self._watched = [("", adapter.transformer)] + [(b.ref.name, b.ref.module) for b in blocks]

    # ------------------------------------------------------------------------------------------------ runs
    def _new_run_stats(self) -> None:
        self._records: list[StepStats] = []
        self._notes: list[str] = []
        self._peak_cache = 0
        self._run_steps: int | None = None

    def run_stats(self, completed: bool = False) -> RunStats:
        """Statistics of the run in progress."""
        totals = dict.fromkeys(_routes.ACTIVATION_FORMATS, 0)
        blocks = skipped = 0
        attention: dict[str, int] = {}
        for r in self._records:
            for k, v in r.layer_calls.items():
                totals[k] += v
            blocks += r.block_calls
            skipped += r.skipped_blocks
            for k, v in r.attention_calls.items():
                attention[k] = attention.get(k, 0) + v
        notes = list(self._notes)
        failed = getattr(self._measure, "failed", None)  # compile_stats asked, torch.compile failed
        if failed:
            notes.append(f"block statistics ran eager: torch.compile failed ({failed})")
        return RunStats(
            steps=list(self._records), layer_calls=totals, block_calls=blocks, skipped_blocks=skipped,
            execution=self.execution(), weight_bytes=dict(self.weight_bytes), cache_bytes=self._peak_cache,
            num_inference_steps=self._run_steps, notes=notes, completed=completed, attention_calls=attention,
        )

    def end_run(self, completed: bool) -> None:
        """Close the current run: keep its statistics, drop every context's state and cache.

        ``completed`` is True when diffusers reset the hooks at the end of a pipeline call (then the last step's
        finiteness flag is checked, one sync per run); False after an exception, a detected new run or
        ``PolicyHandle.reset()``.
        """
        flags = [s.finite_dev for s in self.states.values() if s.finite_dev is not None] if completed else []
        if flags and not bool(torch.stack([f.to(flags[0].device) for f in flags]).all()):  # one sync per run
            note = "the transformer output of the last step contains NaN or Inf"
            self._add_note(note)
            warnings.warn(note + " with the policy applied", RuntimeWarning, stacklevel=2)
        if self._records:
            self.last_run = self.run_stats(completed=completed)
        for s in self.states.values():
            s.reset()
        self.states.clear()
        self.active = None
        self._call = None
        self._cache_bytes = 0
        self._new_run_stats()

    def _note_bypassed(self, names: list[str]) -> None:
        note = (
            f"blocks {', '.join(names)} ran without the policy's block hook: their forward was replaced after "
            "apply_policy (e.g. block.forward = torch.compile(...)), so they were neither skipped nor given their "
            "DMPQ formats. Compile with block.compile(), transformer.compile_repeated_blocks() or "
            "torch.compile(transformer) instead, before or after apply_policy"
        )
        self._add_note(note)
        if not self._bypass_warned:
            self._bypass_warned = True
            warnings.warn(note, RuntimeWarning, stacklevel=2)

    def _add_note(self, note: str) -> None:
        if note not in self._notes:
            self._notes.append(note)

    # ------------------------------------------------------------------------------------------------ calls
    def call_begin(self, args: tuple, kwargs: dict) -> None:
        """Start of one transformer call (a torch forward pre-hook): detect a new run, sync once, decide.

        Outside any ``cache_context`` the call runs in the context ``"inference"``. If this raises, the run ends
        (state dropped) and the call's :meth:`call_end` does nothing.
        """
        sm = self.state_manager
        self._own_context = current_context(sm) is None
        if self._own_context:
            sm.set_context(CacheContext(DEFAULT_CONTEXT))
        try:
            self._check_foreign_caches()
            self._call_state = self._begin_call(current_context(sm), args, kwargs)
            self._seen = [False] * len(self.blocks)
        except BaseException:
            self._finish_call()
            self.end_run(completed=False)
            raise

    def call_end(self, output: Any, failed: bool) -> None:
        """End of one transformer call (an always-called torch forward hook): record it, or end the run if the
        call raised."""
        state = self._call_state
        if state is None:  # call_begin raised (and cleaned up) or was never reached
            return
        try:
            if failed:
                self.end_run(completed=False)
            else:
                self._end_call(state, output)
        finally:
            self._finish_call()

    def _finish_call(self) -> None:
        self._call_state = None
        self.active = None
        self._call = None
        if self._own_context:
            self.state_manager.set_context(None)
            self._own_context = False

    def _check_foreign_caches(self) -> None:
        """Refuse to run beside a diffusers cache technique enabled after the policy (both would skip blocks, and
        neither would count the other's skips)."""
        found = diffusers_cache_hooks(self.adapter.transformer, self._watched)
        if found or getattr(self.adapter.transformer, "is_cache_enabled", False):
            raise PolicyError(
                foreign_cache_message(found) + " was enabled after apply_policy. The policy's Temporal Delta Cache "
                "and diffusers' caches do not compose: disable the diffusers cache (transformer.disable_cache()) or "
                "take the policy out (handle.remove()) before running",
                key="tdc",
            )

    def _state(self, name: str) -> ContextState:
        if name not in self.states:
            self.states[name] = ContextState(len(self.blocks), name)
        return self.states[name]

    def _begin_call(self, ctx: CacheContext, args: tuple, kwargs: dict) -> ContextState:
        # New run: the pipeline set new timesteps.
        if self.pipeline is not None:
            ts = getattr(getattr(self.pipeline, "scheduler", None), "timesteps", None)
            if ts is not None and ts is not self._seen_timesteps:
                self.end_run(completed=False)
                self._seen_timesteps = ts
                self._scheduler_steps = len(ts)
        state = self._state(ctx.name)
        # New run: the context's step index went back.
        if ctx.step_index is not None and ctx.step_index < state.step:
            self.end_run(completed=False)
            state = self._state(ctx.name)
        # New run (bare transformer without step_index): the timestep went up (denoising timesteps never increase
        # within a run). With a pipeline, its scheduler's timesteps tensor tells new runs apart instead, and the
        # timestep is not read at all.
        by_timestep = self.pipeline is None and ctx.step_index is None
        timestep = _arg(args, kwargs, "timestep", self._timestep_pos) if by_timestep else None
        t_value = self._sync(state, timestep)
        if by_timestep and t_value is not None and state.last_timestep is not None and t_value > state.last_timestep:
            self.end_run(completed=False)
            state = self._state(ctx.name)
        state.last_timestep = t_value
        hidden = _arg(args, kwargs, "hidden_states", self._hidden_pos)
        rows = int(hidden.shape[0]) if isinstance(hidden, torch.Tensor) else 1
        if state.rows is not None and rows != state.rows:  # another batch in the same context: start over
            self._drop_cache(state)
            state.reset()
        state.set_rows(rows)
        if ctx.step_index is not None:
            state.step = ctx.step_index
        self._decide(state, ctx)
        self.active = state
        self._call = _CallRecord(ctx.name, state.step, rows)
        return state

    def _end_call(self, state: ContextState, out: Any) -> None:
        if not all(self._seen):
            self._note_bypassed([self.blocks[i].ref.name for i, seen in enumerate(self._seen) if not seen])
        sample = _first_tensor(out)
        if sample is not None and sample.is_floating_point():
            state.finite_dev = torch.isfinite(sample.detach()).all()
        rec = self._call
        if rec is not None:
            self._records.append(
                StepStats(rec.context, rec.step, rec.rows, dict(rec.layer_calls), rec.block_calls, rec.skipped,
                          dict(rec.attention_calls))
            )
        state.step += 1

    # ------------------------------------------------------------------------------------------------ sync
    def _sync(self, state: ContextState, timestep: Any) -> float | None:
        """If ``state`` (the calling context) has values on the device, fetch them and those of *every* other
        context (and the timestep, if given) in one host transfer.

        Values of another context (Wan's "uncond" measured at step t−1, fetched at "cond" of step t) go to that
        context's state; at "uncond" of step t nothing of its own is pending, so it does not sync: a separate-CFG
        step costs one sync, not one per branch.
        """
        parts: list[tuple[str, ContextState, str, int, torch.Tensor]] = []
        for name, st in self.states.items():
            for i in range(len(self.blocks)):
                if st.gamma_dev[i] is not None:
                    parts.append(("g", st, name, i, st.gamma_dev[i][0]))
                if st.change_dev[i] is not None:
                    parts.append(("c", st, name, i, st.change_dev[i][0]))
            if st.finite_dev is not None:
                parts.append(("f", st, name, -1, st.finite_dev.reshape(1)))
        t_value = float(timestep) if isinstance(timestep, int | float) else None
        if isinstance(timestep, torch.Tensor):
            parts.append(("t", state, "", -1, timestep.detach().reshape(-1)[:1]))
        if not any(p[1] is state for p in parts):
            return t_value
        # One transfer per device: the model's device (the one host sync of the step) and, when the pipeline
        # passes a CPU timestep, the CPU (no device sync).
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for *_, tensor in parts:
            by_device.setdefault(tensor.device, []).append(tensor.detach().reshape(-1).to(torch.float32))
        fetched = {d: torch.cat(ts).tolist() for d, ts in by_device.items()}
        offsets = dict.fromkeys(fetched, 0)
        for kind, st, name, i, tensor in parts:
            d, n = tensor.device, tensor.numel()
            vals = fetched[d][offsets[d] : offsets[d] + n]
            offsets[d] += n
            if kind == "g":
                st.gamma[i] = _scatter_rows(st.gamma[i], vals, st.gamma_dev[i][1], st.rows)
                st.gamma_dev[i] = None
                if any(math.isnan(v) for v in vals):
                    raise NonFiniteError(
                        f"block {self.blocks[i].ref.name} produced NaN at step {st.step - 1} (context {name!r}) "
                        "with the policy applied"
                    )
            elif kind == "c":
                _, rows, gaps = st.change_dev[i]
                rates = [_rules.tdc_rate([v], gap)[0] for v, gap in zip(vals, gaps)]
                st.rate[i] = _scatter_rows(st.rate[i], rates, rows, st.rows)
                st.change_dev[i] = None
            elif kind == "f":
                st.finite_dev = None
                if vals[0] != 1.0:
                    raise NonFiniteError(
                        f"the transformer's output at step {st.step - 1} (context {name!r}) contains NaN or Inf "
                        "with the policy applied"
                    )
            else:
                t_value = vals[0]
        return t_value

    # ------------------------------------------------------------------------------------------------ decisions
    def _steps_known(self, ctx: CacheContext) -> int | None:
        if ctx.num_inference_steps:
            return int(ctx.num_inference_steps)
        if self.num_inference_steps:
            return int(self.num_inference_steps)
        return self._scheduler_steps

    def _decide(self, state: ContextState, ctx: CacheContext) -> None:
        t = state.step
        rows = state.rows or 1
        tdc = self.policy.tdc
        tdc_on = self.tdc_enabled
        n_steps = self._steps_known(ctx)
        if n_steps is not None:
            self._run_steps = n_steps
        if tdc_on and n_steps is None and tdc.cooldown > 0:
            tdc_on = False
            self._add_note(
                "TDC skipped nothing: the number of denoising steps is unknown (no num_inference_steps in the "
                "cache context, none given to the handle, no pipeline scheduler) and cooldown > 0"
            )
        in_window = tdc_on and _rules.tdc_in_window(t, tdc.warmup, tdc.cooldown, n_steps)
        future_window = tdc_on and _rules.tdc_may_skip_later(t, tdc.cooldown, n_steps)
        per_row = self.per_row and rows > 1
        forced = self._forced_rows(ctx.name, t, state) if self.forced_skips is not None else None
        for i, info in enumerate(self.blocks):
            has_cache = state.cache[i] is not None and cached_rows(state.cache[i]) == rows
            # The runtime's own decision: per row, the new accumulated change if the row is skipped, else None.
            if per_row:
                decided = _rules.tdc_skip_rows(state.acc[i], state.rate[i], state.consec[i],
                                               tolerance=self.tolerance, max_skips=tdc.max_skips,
                                               in_window=in_window, has_cache=has_cache, cacheable=info.cacheable)
            else:
                rate = state.rate[i]
                joint = _rules.tdc_skip(state.acc[i], None if rate is None or None in rate else rate,
                                        max(state.consec[i]), tolerance=self.tolerance, max_skips=tdc.max_skips,
                                        in_window=in_window, has_cache=has_cache, cacheable=info.cacheable, rows=rows)
                decided = list(joint) if joint is not None else [None] * rows
            skips = [a is not None for a in decided]
            if forced is not None:
                skips = forced[i] if per_row or len(set(forced[i])) == 1 else [False] * rows
            if all(skips) or not any(skips):
                self._commit(state, i, skips, decided)
                state.split[i] = state.split_acc[i] = None
            else:  # some rows skip, others do not: decided when the block is called (its arguments must split)
                state.skip[i] = False
                state.split[i], state.split_acc[i] = skips, decided
            state.measure_gamma[i] = bool(info.dynamic) or info.attn_line is not None
            keep_cache = future_window and info.cacheable
            state.measure_delta[i] = keep_cache
            if not keep_cache and state.cache[i] is not None and not any(skips):
                self._set_cache(state, i, None, None)
        if self.skip_record is not None:
            self.skip_record.setdefault(ctx.name, {})[t] = list(state.skip)
        if self.skip_record_rows is not None:
            self.skip_record_rows.setdefault(ctx.name, {})[t] = [
                list(state.split[i]) if state.split[i] is not None else [state.skip[i]] * rows
                for i in range(len(self.blocks))
            ]

    def _commit(self, state: ContextState, i: int, skips: list[bool], decided: list[float | None]) -> None:
        """Take the decision for block ``i``: per row, skipped (``skips[r]``; its accumulated change becomes
        ``decided[r]``, or, for a forced skip, grows by its measured rate) or computed (accumulated change and
        consecutive skips back to 0); the DMPQ formats of a computation come from the computed rows' Γ."""
        info = self.blocks[i]
        rows = len(skips)
        acc = state.acc[i] if len(state.acc[i]) == rows else [0.0] * rows
        rate = state.rate[i] if state.rate[i] is not None and len(state.rate[i]) == rows else [None] * rows
        new_acc, computed, refresh = [], [], False
        for r in range(rows):
            if skips[r]:
                a = decided[r]
                if a is None:  # forced: accumulate the measured change where there is one
                    a = acc[r] + (rate[r] if rate[r] is not None else 0.0)
                new_acc.append(a)
                state.consec[i][r] += 1
            else:
                refresh = refresh or (self.refresh_robust and state.consec[i][r] > 0)  # first computation after a skip
                new_acc.append(0.0)
                state.consec[i][r] = 0
                computed.append(r)
        state.acc[i] = new_acc
        state.skip[i] = not computed
        if computed and (info.dynamic or info.attn_line is not None):
            g = state.gamma[i]
            g = [g[r] for r in computed] if g is not None and len(g) == rows else None
            g = None if g is None or None in g else g
            branch = state.branch
            if info.dynamic:
                alphas, betas = info.branch_lines.get(branch, (info.alphas, info.betas))
                state.fmts[i] = _rules.dmpq_formats(alphas, betas, g, self.threshold, self.first_format,
                                                    refresh_robust=refresh)
            if info.attn_line is not None:  # the DMPQ rule with the attention's own line and threshold
                line = info.branch_attn_lines.get(branch, info.attn_line)
                state.attn_modes[i] = "bf16" if refresh else _rules.dmpq_format(
                    *line, g, self.attn_threshold, "bf16", fast="8bit", robust="bf16")

    def _forced_rows(self, name: str, step: int, state: ContextState) -> list[list[bool]]:
        """The forced skips of context ``name`` at ``step`` (see ``PolicyHandle.force_skips``), per block and row:
        a map's entry for a block is one bool for every row, or one bool per row; a row is skipped iff the entry
        says so and the block holds a cached Δ for this call's rows."""
        maps = self.forced_skips
        if name not in maps:
            raise KeyError(f"force_skips has no skip map for cache context {name!r}; it has {sorted(maps)}")
        steps = maps[name]
        row = steps[step] if step < len(steps) else ()
        rows = state.rows or 1
        out = []
        for i in range(len(self.blocks)):
            cache = state.cache[i]
            has = cache is not None and cached_rows(cache) == rows
            entry = row[i] if i < len(row) else False
            if isinstance(entry, list | tuple):
                if len(entry) != rows:
                    raise ValueError(f"force_skips[{name!r}][{step}][{i}] holds {len(entry)} rows; the call has "
                                     f"{rows}")
                out.append([has and bool(v) for v in entry])
            else:
                out.append([has and bool(entry)] * rows)
        return out

    # ------------------------------------------------------------------------------------------------ blocks
    def _set_cache(self, state: ContextState, i: int, value: tuple[CachedStream, ...] | None,
                   prev: tuple[CachedStream, ...] | None) -> None:
        """Hold ``value`` as block ``i``'s last Δ and ``prev`` as the one before (None: none), counting bytes."""
        self._cache_bytes += cached_bytes(value) + cached_bytes(prev) - cached_bytes(state.cache[i]) \
            - cached_bytes(state.cache_prev[i])
        state.cache[i] = value
        state.cache_prev[i] = prev
        if prev is None:
            state.prev_compute[i] = [None] * len(state.prev_compute[i])
        self._peak_cache = max(self._peak_cache, self._cache_bytes)

    def _drop_cache(self, state: ContextState) -> None:
        for i in range(len(self.blocks)):
            if state.cache[i] is not None or state.cache_prev[i] is not None:
                self._set_cache(state, i, None, None)

    def _extrapolation(self, state: ContextState, index: int, row: int) -> tuple[int, int] | None:
        """``(t − s, s − s_prev)`` of row ``row`` of block ``index`` where its skip extrapolates, else None."""
        if not self.extrapolate or state.cache_prev[index] is None or state.prev_compute[index][row] is None:
            return None
        s = state.last_compute[index][row]
        return state.step - s, s - state.prev_compute[index][row]

    def _cached_output(self, state: ContextState, index: int, xs: tuple[torch.Tensor, ...],
                       runs: list[tuple[int, int]] | None = None) -> tuple[torch.Tensor, ...]:
        """The streams a skipped block returns: X + Δ_last, or X + the extrapolation (module docstring). ``xs`` are
        the rows ``runs`` of the input streams (None: every row)."""
        n = cached_rows(state.cache[index])
        runs = runs or [(0, n)]
        rows = [r for a, b in runs for r in range(a, b)]
        factors = {self._extrapolation(state, index, r) for r in rows}
        if len(factors) > 1:  # rows last computed at different steps: one row at a time
            outs = [self._cached_output(state, index, tuple(x[k : k + 1] for x in xs), [(r, r + 1)])
                    for k, r in enumerate(rows)]
            return tuple(torch.cat([o[j] for o in outs]) for j in range(len(xs)))
        whole = runs == [(0, n)]
        last = state.cache[index] if whole else tuple(take_stream_rows(d, runs) for d in state.cache[index])
        factor = factors.pop()
        if factor is None:
            return tuple(x + decode_stream(d, x.dtype) for x, d in zip(xs, last))
        prev = state.cache_prev[index] if whole else tuple(take_stream_rows(p, runs) for p in state.cache_prev[index])
        return tuple(
            x + _rules.tdc_extrapolate(decode_stream(d, torch.float32), decode_stream(p, torch.float32),
                                       *factor).to(x.dtype)
            for x, d, p in zip(xs, last, prev)
        )

    def _arg_names(self, info: BlockInfo) -> tuple[tuple[str | None, ...], tuple[str, ...]]:
        """The names of the block's positional parameters by position, and its stream arguments."""
        cls = type(info.ref.module)
        if cls not in self._param_names:
            pos = _positional_indices(cls)
            names: list[str | None] = [None] * (max(pos.values()) + 1 if pos else 0)
            for name, k in pos.items():
                names[k] = name
            self._param_names[cls] = tuple(names)
        return self._param_names[cls], tuple(STREAM_ARGUMENTS[s] for s in info.ref.streams)

    def _plan_split(self, state: ContextState, index: int, args: tuple, kwargs: dict) -> RowSplit | None:
        """Apply the per-row decision planned for block ``index`` (``state.split``): the block's call restricted
        to the computed rows and the skipped rows' outputs, or, where the call's arguments do not split
        (:class:`~sixbit_tune.runtime.rows.RowSplitRefused`, reason noted), None after deciding a full
        computation (the joint rule)."""
        info = self.blocks[index]
        skips, decided = state.split[index], state.split_acc[index]
        state.split[index] = state.split_acc[index] = None
        rows = len(skips)
        run_rows = [r for r in range(rows) if not skips[r]]
        run_runs, skip_runs = row_runs(run_rows), row_runs([r for r in range(rows) if skips[r]])
        names, streams = self._arg_names(info)
        try:
            sub_args, sub_kwargs = split_call(names, streams, args, kwargs, rows, run_runs)
        except RowSplitRefused as e:
            self._add_note(f"tdc.cfg_rows 'per_row' fell back to the joint rule (the block ran on every row) where "
                           f"the rows of a block call differed: {e.reason}")
            self._commit(state, index, [False] * rows, [None] * rows)
            if self.skip_record_rows is not None:
                self.skip_record_rows[self._call.context][state.step][index] = [False] * rows
            return None
        self._commit(state, index, skips, decided)
        xs = self.adapter.streams_in(info.ref, args, kwargs)
        outs = self._cached_output(state, index, tuple(take_rows(x, skip_runs) for x in xs), skip_runs)
        measured = None
        if state.measure_gamma[index] or state.measure_delta[index]:
            measured = tuple(take_rows(x, run_runs).detach().clone() for x in xs)
        return RowSplit(sub_args, sub_kwargs, rows, run_rows, run_runs, skip_runs, outs, measured)

    @torch.compiler.disable
    def block_begin(self, index: int, args: tuple, kwargs: dict) -> tuple[bool, Any]:
        """Before block ``index`` runs: ``(True, output)`` to skip it; ``(False, RowSplit)`` to run it on some rows
        only (then the hook calls :meth:`block_end_rows`); else ``(False, cloned input streams|None)``."""
        info = self.blocks[index]
        state = self.active
        if state is None:  # a block called outside a transformer call: plain run, first-step formats
            for layer in info.dynamic:
                layer.fmt = self.first_format
            if info.attn_line is not None and self.attention is not None:
                self.attention.set_modes({index: "bf16"})
            return False, None
        rec = self._call
        rec.block_calls += 1
        self._seen[index] = True
        split = self._plan_split(state, index, args, kwargs) if state.split[index] is not None else None
        if state.skip[index]:
            rec.skipped += 1
            xs = self.adapter.streams_in(info.ref, args, kwargs)
            outs = self._cached_output(state, index, tuple(xs))
            return True, self.adapter.output_from_streams(info.ref, outs)
        for layer, fmt in zip(info.dynamic, state.fmts[index]):
            layer.fmt = fmt
            rec.layer_calls[layer.activation] += 1
        for k, v in info.static_calls.items():
            rec.layer_calls[k] += v
        if info.attention is not None and self.attention is not None:
            mode = info.attention
            if info.attn_line is not None:
                mode = state.attn_modes[index]
                self.attention.set_modes({index: mode})
            rec.attention_calls[mode] = rec.attention_calls.get(mode, 0) + 1
        if split is not None:
            return False, split
        if state.measure_gamma[index] or state.measure_delta[index]:
            xs = tuple(x.detach().clone() for x in self.adapter.streams_in(info.ref, args, kwargs))
            return False, xs
        return False, None

    @torch.compiler.disable
    def block_end(self, index: int, xs: tuple[torch.Tensor, ...], output: Any) -> None:
        """After block ``index`` ran fully: measure Γ and the change of Δ on the device; refresh the cache."""
        state = self.active
        if state is None:
            return
        info = self.blocks[index]
        ys = tuple(y.detach() for y in self.adapter.streams_out(info.ref, output))
        self._measure_rows(state, index, xs, ys, None)

    @torch.compiler.disable
    def block_end_rows(self, index: int, split: RowSplit, output: Any) -> Any:
        """After block ``index`` ran on the rows ``split.run_rows`` only: measure them (Γ, change of Δ, their rows
        of the cache) and return the block's output for every row (computed rows and skipped rows' X + Δ)."""
        info = self.blocks[index]
        ys = self.adapter.streams_out(info.ref, output)
        if split.measured is not None:
            self._measure_rows(self.active, index, split.measured, tuple(y.detach() for y in ys), split)
        full = tuple(put_rows(split.rows, [(split.run_runs, y), (split.skip_runs, o)])
                     for y, o in zip(ys, split.skipped_out))
        return self.adapter.output_from_streams(info.ref, full, like_output=output)

    def _measure_rows(self, state: ContextState, index: int, xs: tuple[torch.Tensor, ...],
                      ys: tuple[torch.Tensor, ...], split: RowSplit | None) -> None:
        """Γ and the change of Δ on the device and the cache's refresh, for every row (``split`` None) or for the
        computed rows of a split call."""
        want_delta = state.measure_delta[index]
        old = state.cache[index]
        runs = split.run_runs if split is not None else None
        rows = split.run_rows if split is not None else list(range(xs[0].shape[0]))
        n = split.rows if split is not None else xs[0].shape[0]
        prev = None
        if want_delta and old is not None and cached_rows(old) == n:
            prev = old if runs is None else tuple(take_stream_rows(d, runs) for d in old)
        gamma, change, parts = self._measure(xs, ys, prev, state.measure_gamma[index], want_delta, self.cache_dtype)
        tag = None if split is None else list(rows)
        if gamma is not None:
            state.gamma_dev[index] = (gamma, tag)
        if change is not None:
            state.change_dev[index] = (change, tag, [state.step - state.last_compute[index][r] for r in rows])
        if parts is None:
            return
        before = list(state.last_compute[index])
        if split is None:
            keep_prev = self.extrapolate and prev is not None
            self._set_cache(state, index, parts, prev if keep_prev else None)
            if keep_prev:
                state.prev_compute[index] = before
        elif old is None or cached_rows(old) != n:
            raise RuntimeError(f"block {self.blocks[index].ref.name} ran on some rows without a cached Δ of every row")
        else:  # the computed rows' entries of the cache (and of the Δ before, with tdc.extrapolate) are replaced
            prev_all = state.cache_prev[index]
            if self.extrapolate:
                if prev_all is None:
                    prev_all = tuple(clone_stream(d) for d in old)
                else:
                    for p, d in zip(prev_all, old):
                        write_stream_rows(p, runs, take_stream_rows(d, runs))
                for r in rows:
                    state.prev_compute[index][r] = before[r]
            for d, part in zip(old, parts):
                write_stream_rows(d, runs, part)
            self._set_cache(state, index, old, prev_all)
        for r in rows:
            state.last_compute[index][r] = state.step


@dataclass
class RowSplit:
    """A block call run on some batch rows only (``tdc.cfg_rows = "per_row"``).

    Attributes:
        args, kwargs: the call's arguments restricted to the computed rows.
        rows: the call's batch rows.
        run_rows, run_runs: the computed rows, and as contiguous runs; skip_runs: the skipped rows' runs.
        skipped_out: the skipped rows' output streams (X + Δ), in row order.
        measured: the computed rows' input streams, cloned before the block ran (None: nothing is measured).
    """

    args: tuple
    kwargs: dict
    rows: int
    run_rows: list[int]
    run_runs: list[tuple[int, int]]
    skip_runs: list[tuple[int, int]]
    skipped_out: tuple[torch.Tensor, ...]
    measured: tuple[torch.Tensor, ...] | None


def foreign_cache_message(found: list[str]) -> str:
    """How a refusal names the diffusers cache hooks it found (``"<module>: <hook>"`` each)."""
    shown = ", ".join(found[:4]) + (f", … ({len(found)} hooks)" if len(found) > 4 else "")
    return f"a diffusers cache ({shown})" if found else "a diffusers cache (transformer.is_cache_enabled)"


def measure_block(
    xs: tuple[torch.Tensor, ...],
    ys: tuple[torch.Tensor, ...],
    prev: tuple[torch.Tensor, ...] | None,
    want_gamma: bool,
    want_delta: bool,
    cache_dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None, tuple[torch.Tensor, ...] | None]:
    """What ``block_end`` measures after a full block computation, as one pure function (``torch.compile`` fuses it
    into a few kernels when the policy is applied with ``compile_stats``).

    Returns ``(gamma, change, cache)``: Γ per row (``want_gamma``), the change of Δ against the cached ``prev`` per
    row (``want_delta`` and a ``prev``, dequantized: ``stats.rel_l2_rows``, which is ``stats.delta_change``'s
    change), and Δ split back into the input streams' shapes and stored in ``cache_dtype`` (``want_delta``;
    :func:`encode_stream`); None where not wanted.
    """
    delta = _stats.stream_delta(xs, ys)
    gamma = _stats.block_stats(xs, ys, delta=delta)["gamma"] if want_gamma else None
    change = cache = None
    if want_delta:
        if prev is not None:
            dec = [decode_stream(c, torch.float32) if isinstance(c, tuple) else c for c in prev]
            flat = torch.cat([c.reshape(c.shape[0], -1) for c in dec], dim=1) if len(dec) > 1 \
                else dec[0].reshape(dec[0].shape[0], -1)
            change = _stats.rel_l2_rows(delta, flat)
        parts, offset = [], 0
        for x in xs:
            n = x[0].numel()
            parts.append(encode_stream(delta[:, offset : offset + n].reshape(x.shape), cache_dtype))
            offset += n
        cache = tuple(parts)
    return gamma, change, cache


def encode_stream(delta: torch.Tensor, cache_dtype: torch.dtype) -> CachedStream:
    """One stream's Δ as the cache holds it: ``delta`` in ``cache_dtype``, or for FP8 E4M3 the pair (codes, float32
    scale per token) of :func:`sixbit_tune.formats.fp8.quantize` along the last dim (no finiteness scan: the
    runtime checks the step's output once instead)."""
    if cache_dtype == _fp8.DTYPE:
        return _fp8.quantize(delta, -1, check=False)
    return delta.to(cache_dtype)


def decode_stream(stream: CachedStream, dtype: torch.dtype) -> torch.Tensor:
    """The cached stream as a ``dtype`` tensor (FP8: ``fp8.dequantize``, codes times their token's scale)."""
    if isinstance(stream, tuple):
        return _fp8.dequantize(stream[0], stream[1], -1, dtype)
    return stream.to(dtype)


def cached_bytes(entry: tuple[CachedStream, ...] | None) -> int:
    """Bytes held by one cached Δ (every stream; FP8 codes and their scales)."""
    if entry is None:
        return 0
    tensors = [t for s in entry for t in (s if isinstance(s, tuple) else (s,))]
    return sum(t.numel() * t.element_size() for t in tensors)


def cached_rows(entry: tuple[CachedStream, ...]) -> int:
    """The batch rows a cached Δ was measured for."""
    first = entry[0]
    return int((first[0] if isinstance(first, tuple) else first).shape[0])


def _arg_positions(transformer: torch.nn.Module) -> tuple[int | None, int | None]:
    """Positional indices of ``hidden_states`` and ``timestep`` in the transformer's forward (resolved once)."""
    try:
        params = list(inspect.signature(type(transformer).forward).parameters)[1:]
    except (TypeError, ValueError):
        return 0, None
    pos = {name: i for i, name in enumerate(params)}
    return pos.get("hidden_states", 0), pos.get("timestep")


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    sample = getattr(out, "sample", None)
    return sample if isinstance(sample, torch.Tensor) else None


def _arg(args: tuple, kwargs: dict, name: str, pos: int | None) -> Any:
    if name in kwargs:
        return kwargs[name]
    if pos is not None and pos < len(args):
        return args[pos]
    return None


def _scatter_rows(old: list | None, vals: list, rows: list[int] | None, n: int | None) -> list:
    """Per-row values: ``vals`` for every row (``rows`` None), or ``old`` with the entries of ``rows`` replaced
    (None where ``old`` has no entry)."""
    if rows is None:
        return list(vals)
    out = list(old) if old is not None and len(old) == n else [None] * (n or len(rows))
    for r, v in zip(rows, vals):
        out[r] = v
    return out


def take_stream_rows(stream: CachedStream, runs: list[tuple[int, int]]) -> CachedStream:
    """The rows ``runs`` of one cached stream (FP8: of its codes and its scales)."""
    if isinstance(stream, tuple):
        return tuple(take_rows(t, runs) for t in stream)
    return take_rows(stream, runs)


def write_stream_rows(stream: CachedStream, runs: list[tuple[int, int]], part: CachedStream) -> None:
    """Overwrite the rows ``runs`` of a cached stream, in place, with ``part`` (the same format, those rows)."""
    pairs = zip(stream, part) if isinstance(stream, tuple) else [(stream, part)]
    for t, p in pairs:
        k = 0
        for a, b in runs:
            t[a:b] = p[k : k + b - a]
            k += b - a


def clone_stream(stream: CachedStream) -> CachedStream:
    """A copy of one cached stream."""
    return tuple(t.clone() for t in stream) if isinstance(stream, tuple) else stream.clone()
