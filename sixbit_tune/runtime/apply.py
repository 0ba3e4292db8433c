"""``load_policy`` / ``apply_policy`` / ``PolicyHandle``: install a policy into a diffusers model and take it out."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sixbit_tune import compat
from sixbit_tune import formats as _formats
from sixbit_tune import policy as _policy
from sixbit_tune import routes as _routes
from sixbit_tune.errors import PolicyError
from sixbit_tune.models.adapters import ModelAdapter, get_adapter
from sixbit_tune.runtime._backend import KERNEL_PREFERENCES, Backend
from sixbit_tune.runtime.controller import BlockInfo, Controller, foreign_cache_message
from sixbit_tune.runtime.hooks import BLOCK_HOOK, STEP_HOOK, BlockHook, StepHook, install_call_hooks
from sixbit_tune.runtime.linear import MixedPrecisionLinear
from sixbit_tune.runtime.report import RunStats

__all__ = [
    "GPUMismatchWarning",
    "PolicyHandle",
    "apply_policy",
    "check_policy_fits",
    "device_target",
    "load_policy",
    "nvfp4_target_path",
]

_HANDLE_ATTR = "_sixbit_tune_policy_handle"




class GPUMismatchWarning(UserWarning):
    """The policy was tuned on another GPU (or another implementation of a route it uses) than the one it is
    applied on."""


def load_policy(path_or_dict) -> _policy.Policy:
    """Load and validate a policy (a path, a JSON string, a dict or a ``Policy``); see :func:`sixbit_tune.policy.load`.

    Raises:
        PolicyError: malformed or of a newer schema; the message names the key.
    """
    return _policy.load(path_or_dict)


def check_policy_fits(policy: _policy.Policy, adapter: ModelAdapter) -> list[str]:
    """Every difference between the model a policy was made for and ``adapter``'s model (empty if it fits)."""
    problems: list[str] = []
    m = policy.model
    cls = type(adapter.transformer).__name__
    if m.cls != cls:
        problems.append(f"model.class: policy is for {m.cls}, model is {cls}")
    if m.family != adapter.family.name:
        problems.append(f"model.family: policy is for {m.family!r}, model is {adapter.family.name!r}")
    n_blocks = len(adapter.blocks())
    if m.blocks != n_blocks:
        problems.append(f"model.blocks: policy has {m.blocks} blocks, model has {n_blocks}")
    config_hash = adapter.config_hash()
    if m.config_hash != config_hash:
        problems.append(
            f"model.config_hash: policy {m.config_hash[:12]}…, model {config_hash[:12]}… (another configuration)"
        )
    linears = adapter.all_linears()
    layers = policy.dmpq.layers
    for name in layers:
        if name not in linears:
            problems.append(f"dmpq.layers.{name}: no such in-block linear in the model")
    for name, lin in linears.items():
        lp = layers.get(name)
        if lp is None:
            problems.append(f"dmpq.layers.{name}: model linear [{lin.out_features}x{lin.in_features}] has no entry")
            continue
        if (lp.in_features, lp.out_features) != (lin.in_features, lin.out_features):
            problems.append(
                f"dmpq.layers.{name}: policy shape in={lp.in_features} out={lp.out_features}, model in="
                f"{lin.in_features} out={lin.out_features}"
            )
    return problems


def device_menu(device: torch.device | str, backend: Backend | None = None) -> dict[str, _policy.MenuEntry]:
    """Every quantized route and the execution path its GEMM takes on ``device`` (``kernels.kernel_path`` of the
    route's operand format; a route that cannot run there is left out). Speeds are not measured here."""
    device = torch.device(device)
    backend = backend or Backend("auto")
    menu = {}
    for weight, acts in _routes.ROUTES.items():
        for act in acts:
            if weight == "none":
                continue
            try:
                path = backend.path(_routes.operand_format(weight, act), device)
            except RuntimeError:  # kernel preference "triton" where no kernel runs
                continue
            menu[_routes.Route(weight, act).key] = _policy.MenuEntry(path)
    return menu


def device_target(device: torch.device | str, backend: Backend | None = None) -> _policy.Target:
    """The ``Target`` describing ``device``: GPU name, compute capability and the menu of routes there
    (:func:`device_menu`)."""
    device = torch.device(device)
    menu = device_menu(device, backend)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return _policy.Target(torch.cuda.get_device_name(device), f"{major}.{minor}", menu)
    return _policy.Target(None, None, menu)


def nvfp4_target_path(kernel_path: str) -> str:
    """The policy's ``target.nvfp4_path`` name of a ``sixbit_tune.kernels.kernel_path`` for NVFP4."""
    names = {"triton-nvfp4-emulated": "emulated", "native-nvfp4": "native", "reference": "reference"}
    if kernel_path not in names:
        raise ValueError(f"unknown NVFP4 kernel path {kernel_path!r}; known: {sorted(names)}")
    return names[kernel_path]


def _model_device(transformer: nn.Module) -> torch.device:
    for p in transformer.parameters():
        return p.device
    return torch.device("cpu")


def _check_target(policy: _policy.Policy, here: _policy.Target, strict: bool) -> None:
    t = policy.target
    diffs = []
    if (t.gpu or None) != (here.gpu or None):
        diffs.append(f"GPU: tuned on {t.gpu or 'CPU'}, running on {here.gpu or 'CPU'}")
    elif t.compute_capability != here.compute_capability:
        diffs.append(f"compute capability: tuned on {t.compute_capability}, running on {here.compute_capability}")
    used = sorted({r.key for lp in policy.dmpq.layers.values() if lp.weight != "none" for r in lp.routes})
    for key in used:
        tuned, running = t.menu.get(key), here.menu.get(key)
        if tuned is not None and running is not None and tuned.implementation != running.implementation:
            diffs.append(f"route {key}: tuned with {tuned.implementation!r}, running with {running.implementation!r}")
    if not diffs:
        return
    msg = (
        "policy was tuned for another target (" + "; ".join(diffs) + "). The numerics are the same, but the "
        "latency/memory trade-off it was chosen for may not hold here"
    )
    if strict:
        raise PolicyError(msg + " (strict_gpu=True)", key="target")
    warnings.warn(msg, GPUMismatchWarning, stacklevel=3)


def apply_policy(
    pipe_or_transformer: Any,
    policy,
    *,
    strict_gpu: bool = False,
    kernel_preference: str = "auto",
    num_inference_steps: int | None = None,
    original_weights: str = "cpu",
    compile_stats: bool = False,
    nvfp4_hessians: Mapping[str, torch.Tensor] | None = None,
) -> PolicyHandle:
    """Install a policy into a diffusers pipeline or its transformer.

    Validates that the policy was made for this model (class, family, configuration hash, block count, every
    in-block layer name and shape), then quantizes each in-block linear's weight once into its one stored format
    and swaps in :class:`MixedPrecisionLinear` (weight ``"none"`` keeps the original), and installs the step
    and block hooks that run DMPQ and the Temporal Delta Cache (rules: :mod:`sixbit_tune.runtime.controller`).
    Version-1 policies are migrated on load. Where the policy's ``attention`` section quantizes a block's attention,
    8-bit attention is installed on it (:func:`sixbit_tune.runtime.attention.install_attention`, on the attention
    processors): ``"8bit"`` blocks run it at every computation, ``"dynamic"`` blocks when their predictor line and
    the block's Γ at its previous computation stay under ``attention.threshold`` (bf16 at the first step and at a
    robust refresh); ``stats().attention_calls`` counts what ran. ``remove()`` puts the processors back.

    Args:
        pipe_or_transformer: a diffusers pipeline with a supported ``transformer``, or the transformer.
        policy: a ``Policy``, a path, a JSON string or a dict.
        strict_gpu: raise instead of warning when the GPU, compute capability or the implementation of a route the
            policy uses differ from the policy's ``target``.
        kernel_preference: ``"auto"`` (``sixbit_tune.kernels`` dispatch) or ``"reference"`` (the plain-PyTorch
            specification; bit-identical to ``formats.quantized_linear_reference``).
        num_inference_steps: steps per pipeline call, for the TDC cooldown window when neither the cache context
            nor a pipeline's scheduler tells it (bare transformers except Wan). Can be set later on the handle.
        original_weights: ``"cpu"`` parks the replaced layers' original weights in host memory while the policy is
            applied (device memory then holds only the quantized encodings); ``"keep"`` leaves them in place.
            :meth:`PolicyHandle.remove` brings them back either way.
        compile_stats: fuse what each fully computed block measures (Γ, the change of Δ, the cached Δ) with
            ``torch.compile`` (a few kernels instead of about fifteen eager ones per block; same numbers, eager
            fallback with a warning if compilation fails). Worth it where the host is the bottleneck (small models,
            compiled blocks); costs compile time at the first call.
        nvfp4_hessians: per layer name (as in ``policy.dmpq.layers``), the sum of ``xᵀx`` over calibration inputs
            ``[K, K]``: needed by the ``"gptq"`` NVFP4 weight encoder (``policy.dmpq.nvfp4_weight_encoder``, or a
            layer's own ``encoder``) for every NVFP4 layer it encodes; the other encoders need none.

    Works with (checked on CPU with tiny pipelines, in either order with ``apply_policy``):

    * model and group CPU offload (``enable_model_cpu_offload``, ``enable_group_offload``); ``remove()`` leaves
      the offload working;
    * compilation: ``torch.compile(transformer)`` / ``transformer.compile()`` (blocks and submodules compile; the
      transformer's own forward code between them and the runtime's bookkeeping run eager), ``block.compile()``
      and ``transformer.compile_repeated_blocks()`` (regional compilation, the recommended way). Do not assign a
      compiled function to ``block.forward`` after ``apply_policy``: such blocks bypass the policy (warned once,
      noted in the statistics);
    * not with diffusers' cache techniques (FirstBlockCache, MagCache, …): refused with a ``PolicyError``, here or
      at the first call after ``enable_cache``; ``remove()`` never disturbs them.

    Returns:
        A :class:`PolicyHandle` (``remove()``, ``stats()``, ``reset()``, ``record_skips()``, ``force_skips()``).

    Raises:
        PolicyError: the policy is malformed, made for another model (the message lists every mismatch), already
            applied, (``strict_gpu``) made for another GPU, or a diffusers cache is enabled on the model.
        UnsupportedModelError: the model is not a supported family.
    """
    if kernel_preference not in KERNEL_PREFERENCES:
        raise ValueError(f"kernel_preference must be one of {KERNEL_PREFERENCES}, got {kernel_preference!r}")
    policy = load_policy(policy)
    adapter = get_adapter(pipe_or_transformer)
    transformer = adapter.transformer
    pipeline = None if isinstance(pipe_or_transformer, nn.Module) else pipe_or_transformer
    if getattr(transformer, _HANDLE_ATTR, None) is not None:
        raise PolicyError("a policy is already applied to this model; call handle.remove() first", key="model")
    found = compat.diffusers_cache_hooks(transformer)
    if found or getattr(transformer, "is_cache_enabled", False):
        raise PolicyError(
            foreign_cache_message(found) + " is enabled on this model. The policy's Temporal Delta Cache and "
            "diffusers' caches do not compose (both skip blocks, neither counts the other's skips): disable it "
            "(transformer.disable_cache()) before apply_policy",
            key="tdc",
        )
    problems = check_policy_fits(policy, adapter)
    if problems:
        raise PolicyError(
            f"policy does not fit this model ({len(problems)} mismatch{'es' if len(problems) > 1 else ''}):\n  "
            + "\n  ".join(problems),
            key="model",
        )
    backend = Backend(kernel_preference)
    device = _model_device(transformer)
    _check_target(policy, device_target(device, backend), strict_gpu)
    handle = PolicyHandle(transformer, policy, pipeline)
    try:
        handle._install(adapter, backend, device, num_inference_steps, original_weights, compile_stats,
                        nvfp4_hessians or {})
    except BaseException:
        handle.remove()
        raise
    return handle


def _branch_lines(layers: Sequence[_policy.LayerPolicy]) -> dict[str, tuple[list[float], list[float]]]:
    """Per guidance branch that some layer has a line for: every layer's (alpha, beta) for that branch (its own
    line, else its pooled one, else its decision line), in the order of ``layers``."""
    branches = sorted({b for lp in layers for b in (lp.predictor or {}) if b != "pooled"})
    out = {}
    for b in branches:
        lines = [lp.line(b) or lp.decision_line for lp in layers]
        out[b] = ([float(ln.alpha) for ln in lines], [float(ln.beta) for ln in lines])
    return out


class PolicyHandle:
    """An applied policy. ``remove()`` restores the model exactly; ``stats()`` reports the last run."""

    def __init__(self, transformer: nn.Module, policy: _policy.Policy, pipeline: Any):
        self.transformer = transformer
        self.policy = policy
        self.pipeline = pipeline
        self.controller: Controller | None = None
        self._swapped: list[tuple[nn.Module, str, nn.Module, MixedPrecisionLinear]] = []
        self._hooked: list[compat.Registration] = []
        self._torch_hooks: list = []
        self._removed = False
        self.backend: Backend | None = None
        self._scratch_bytes: dict[str, int] = {}
        self.attention_installed = False
        self._attention = None  # runtime.attention.AttentionHandle

    # ------------------------------------------------------------------------------------------------ install
    def _install(self, adapter: ModelAdapter, backend: Backend, device, num_steps, original_weights,
                 compile_stats: bool = False, nvfp4_hessians: Mapping[str, torch.Tensor] | None = None) -> None:
        policy = self.policy
        dmpq = policy.dmpq
        nvfp4_hessians = nvfp4_hessians or {}
        missing = [name for name, lp in dmpq.layers.items()
                   if lp.weight == "nvfp4" and dmpq.encoder_of(name) == "gptq" and name not in nvfp4_hessians]
        if missing:
            key = (f"dmpq.layers.{missing[0]}.encoder" if dmpq.layers[missing[0]].encoder == "gptq"
                   else "dmpq.nvfp4_weight_encoder")
            raise PolicyError(
                f"the gptq NVFP4 weight encoder needs a calibration Hessian per NVFP4 layer it encodes "
                f"(apply_policy(..., nvfp4_hessians={{name: sum of x.T @ x}})); {len(missing)} missing, e.g. "
                f"{missing[0]!r}", key=key)
        setattr(self.transformer, _HANDLE_ATTR, self)
        self.backend = backend
        first = dmpq.first_step_format
        cache_blocks = set(range(len(adapter.blocks()))) if policy.tdc.blocks is None else set(policy.tdc.blocks)
        weight_bytes = {f: 0 for f in _routes.WEIGHT_FORMATS}
        used_formats: set[str] = set()
        scratch: set[tuple[str, int, int]] = set()
        infos: list[BlockInfo] = []
        for ref in adapter.blocks():
            dynamic, alphas, betas, dynamic_lps = [], [], [], []
            # Executed static layers by activation format, in the names the controller counts.
            static = dict.fromkeys(_routes.ACTIVATION_FORMATS, 0)
            for rel, lin in adapter.linears(ref).items():
                name = f"{ref.name}.{rel}"
                lp = dmpq.layers[name]
                if lp.weight == "none":
                    static["none"] += 1
                    weight_bytes["none"] += lin.weight.numel() * lin.weight.element_size()
                    continue
                new = MixedPrecisionLinear(
                    lin, lp.mode, backend, first, "cpu" if original_weights == "cpu" else "keep",
                    dmpq.encoder_of(name), nvfp4_hessians.get(name), weight=lp.weight, fast=lp.fast,
                    robust=lp.robust)
                parent_name, _, attr = rel.rpartition(".")
                parent = ref.module.get_submodule(parent_name) if parent_name else ref.module
                setattr(parent, attr, new)
                self._swapped.append((parent, attr, lin, new))
                for f, b in new.weight_bytes().items():
                    weight_bytes[f] += b
                used_formats.update(new.formats)
                scratch |= new.scratch_shapes()
                if lp.mode == "dynamic":
                    dynamic.append(new)
                    dynamic_lps.append(lp)
                    alphas.append(float(lp.alpha))
                    betas.append(float(lp.beta))
                else:
                    static[new.activation] += 1
            attention, attn_line = self._attention_of(ref.index)
            infos.append(BlockInfo(ref, dynamic, alphas, betas, static, ref.index in cache_blocks, attention,
                                   attn_line, _branch_lines(dynamic_lps), self._attention_branch_lines(ref.index)))
        self._scratch_bytes = {}
        for f, n, k in scratch:
            self._scratch_bytes[f] = self._scratch_bytes.get(f, 0) + _formats.weight_bytes(f, n, k)
        self._install_attention(infos, backend)
        formats = sorted(used_formats)
        transformer = self.transformer

        def execution() -> dict[str, str]:  # the path for the device the model is on now
            here = _model_device(transformer)
            return {f: backend.path(f, here) for f in formats}

        self.controller = Controller(
            policy, adapter, infos, execution, weight_bytes, pipeline=self.pipeline, num_inference_steps=num_steps,
            compile_stats=compile_stats,
        )
        self.controller.attention = self._attention
        self._register(self.transformer, STEP_HOOK, StepHook(self.controller))
        self._torch_hooks = install_call_hooks(self.transformer, self.controller)
        for info in infos:
            self._register(info.ref.module, BLOCK_HOOK, BlockHook(self.controller, info.ref.index))
        compat.invalidate_child_registries(self.transformer)

    def _register(self, module: nn.Module, name: str, hook) -> None:
        self._hooked.append(compat.register_hook(module, hook, name))

    # ------------------------------------------------------------------------------------------------ public
    @property
    def num_inference_steps(self) -> int | None:
        """Steps per run for the TDC cooldown window when the pipeline does not say (see :func:`apply_policy`)."""
        return self.controller.num_inference_steps if self.controller else None

    @num_inference_steps.setter
    def num_inference_steps(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"num_inference_steps must be a positive int or None, got {value!r}")
        if self.controller is not None:
            self.controller.num_inference_steps = value

    def stats(self) -> RunStats | None:
        """Statistics of the run in progress if it has made any call, else of the last finished run (None if
        there was none). ``scratch_bytes`` holds the derived weight operands' buffers (not in ``weight_bytes``);
        ``notes`` say where the policy asked for what this runtime did not do (8-bit attention)."""
        c = self.controller
        if c is None:
            return None
        stats = c.run_stats(completed=False) if c._records else c.last_run
        if stats is None:
            return None
        notes = list(stats.notes)
        return dataclasses.replace(stats, scratch_bytes=dict(self._scratch_bytes), notes=notes,
                                   attention_installed=self.attention_installed)

    @property
    def attention(self) -> _policy.Attention | None:
        """The policy's attention section (None: the model's own attention everywhere)."""
        return self.policy.attention

    # ------------------------------------------------------------------------------------------------ attention
    def _attention_of(self, index: int) -> tuple[str | None, tuple[float, float] | None]:
        """Block ``index``'s attention under the policy: ``(None, None)`` for the model's own, ``("8bit", None)``,
        or ``("dynamic", (alpha, beta))`` with the line the rule decides with (``policy.decision_line``)."""
        att = self.policy.attention
        mode = "bf16" if att is None else att.mode_of(index)
        if mode == "bf16":
            return None, None
        if mode == "8bit":
            return "8bit", None
        line = _policy.decision_line(att.blocks[str(index)].predictor)
        return "dynamic", (float(line.alpha), float(line.beta))

    def _attention_branch_lines(self, index: int) -> dict[str, tuple[float, float]]:
        """Block ``index``'s attention line per guidance branch, where its predictor has branch lines."""
        att = self.policy.attention
        if att is None or att.mode_of(index) != "dynamic":
            return {}
        predictor = att.blocks[str(index)].predictor or {}
        return {b: (float(ln.alpha), float(ln.beta)) for b, ln in predictor.items() if b != "pooled"}

    def _install_attention(self, infos: Sequence[BlockInfo], backend: Backend) -> None:
        """Install 8-bit attention (:mod:`sixbit_tune.runtime.attention`) on the blocks whose attention the policy
        quantizes: fixed ``"8bit"`` blocks run it at every computation; ``"dynamic"`` blocks start in bf16 (no Γ
        yet) and the controller sets their mode before each computation."""
        blocks = {info.ref.index: info.attention for info in infos if info.attention is not None}
        if not blocks:
            return
        from sixbit_tune.runtime.attention import install_attention

        modes = {i: "8bit" if m == "8bit" else "bf16" for i, m in blocks.items()}
        self._attention = install_attention(self.transformer, fmt=self.policy.attention.format, blocks=sorted(blocks),
                                            modes=modes, preference=backend.preference)
        self.attention_installed = True

    def record_skips(self) -> dict[str, dict[int, list[bool]]]:
        """Start recording the Temporal Delta Cache's skip decisions; returns the live record.

        The record is ``{cache-context name: {step: [skipped? per block]}}``, filled after the decision of every
        transformer call (the final one, :meth:`force_skips` included); a later run overwrites the steps it
        repeats. Each call starts a new, empty record (the previous one is no longer filled).
        """
        if self.controller is None:
            raise PolicyError("this handle holds no applied policy", key="model")
        self.controller.skip_record = {}
        return self.controller.skip_record

    def force_skips(self, skip_maps: Mapping[str, Sequence[Sequence[bool]]] | None) -> None:
        """Override which blocks are skipped (benchmarks replaying another run's skip pattern); None clears it.

        After the runtime's own decision at each transformer call, block ``i`` of cache context ``c`` at step ``t``
        is skipped iff ``skip_maps[c][t][i]`` is true and the block holds a cached Δ (so the policy's tolerance
        must let the runtime keep caches, e.g. a tiny positive one). Steps past the end of a map, and blocks past
        the end of its row, skip nothing. A block the map does not skip runs fully with its DMPQ formats. An entry
        may also be a sequence of bools, one per batch row: with ``tdc.cfg_rows = "per_row"`` the rows it marks are
        skipped and the block runs on the others (under the joint rule only an entry that skips every row skips).

        Raises:
            KeyError: at a transformer call whose cache context has no map (the message names the known ones).
            TypeError: ``skip_maps`` is not a mapping of sequences of sequences.
        """
        if self.controller is None:
            raise PolicyError("this handle holds no applied policy", key="model")
        if skip_maps is None:
            self.controller.forced_skips = None
            return
        if not isinstance(skip_maps, Mapping):
            raise TypeError(f"skip_maps must map cache-context names to steps x blocks, got {type(skip_maps).__name__}")
        forced: dict[str, list[list[bool]]] = {}
        for name, steps in skip_maps.items():
            if isinstance(steps, str | bytes) or not isinstance(steps, Sequence) or any(
                    isinstance(row, str | bytes) or not isinstance(row, Sequence) for row in steps):
                raise TypeError(f"skip_maps[{name!r}] must be a sequence of steps, each a sequence of bools")
            forced[str(name)] = [[[bool(r) for r in v] if isinstance(v, Sequence) and not isinstance(v, str | bytes)
                                  else bool(v) for v in row] for row in steps]
        self.controller.forced_skips = forced

    def record_row_skips(self) -> dict[str, dict[int, list[list[bool]]]]:
        """As :meth:`record_skips`, per batch row: ``{context: {step: [[skipped? per row] per block]}}``."""
        if self.controller is None:
            raise PolicyError("this handle holds no applied policy", key="model")
        self.controller.skip_record_rows = {}
        return self.controller.skip_record_rows

    def reset(self) -> None:
        """Drop all per-run state now (the next call starts a new run)."""
        if self.controller is not None:
            self.controller.end_run(completed=False)

    def remove(self) -> None:
        """Take the policy out: original linears (same objects, weights back on their device) and no hooks.

        Idempotent. After it the model's modules, parameters and outputs are those from before ``apply_policy``.
        """
        if self._removed:
            return
        self._removed = True
        if self.controller is not None:
            self.controller.end_run(completed=False)
        for h in self._torch_hooks:
            h.remove()
        self._torch_hooks.clear()
        for reg in reversed(self._hooked):
            compat.remove_hook(reg)
        self._hooked.clear()
        compat.invalidate_child_registries(self.transformer)
        for parent, attr, original, new in reversed(self._swapped):
            new.restore()
            setattr(parent, attr, original)
        self._swapped.clear()
        if self._attention is not None:
            self._attention.remove()
        if self.backend is not None:
            self.backend.release_scratch()
        if getattr(self.transformer, _HANDLE_ATTR, None) is self:
            delattr(self.transformer, _HANDLE_ATTR)

    def __enter__(self) -> PolicyHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "applied"
        return f"PolicyHandle({type(self.transformer).__name__}, {len(self._swapped)} quantized linears, {state})"

