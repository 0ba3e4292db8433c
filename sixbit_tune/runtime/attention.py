"""8-bit attention inside a diffusers transformer, chosen per block and per step, removable bit for bit.

Mechanism: each attention module of the chosen blocks gets a wrapping processor (``set_processor``, diffusers' own
way to change how a module attends; ``MochiAttention`` has no setter and gets its ``processor`` attribute set).
The wrapper calls the module's own processor unchanged. While its block's mode is ``"bf16"`` that is all it does,
so the module computes exactly what it computed before. While the mode is ``"8bit"`` it runs the processor under a
``TorchFunctionMode`` that answers every ``torch.nn.functional.scaled_dot_product_attention`` call with the 8-bit
attention of :mod:`sixbit_tune.formats.attention` (the Triton kernel ``sixbit::attention_8bit`` on CUDA, the
reference numerics as the operator ``sixbit::attention_8bit_reference`` elsewhere). That one interception covers
both kinds of processor of the five families: those that call SDPA themselves (CogVideoX, Mochi) and those that go
through ``diffusers.models.attention_dispatch.dispatch_attention_fn`` (Wan, HunyuanVideo, LTX-Video), whose
``native`` backend is SDPA. A dispatch backend of its own was not used: diffusers' backends are members of a fixed
enum, and CogVideoX's and Mochi's processors do not dispatch.

What the 8-bit path takes, and what it leaves to SDPA (the call then runs the model's own SDPA, bit for bit, and
the reason is counted in :meth:`AttentionHandle.stats`; nothing is approximated silently):

* taken: non-causal attention of ``(batch, heads, tokens, head_dim)`` bfloat16/float16/float32 tensors, head_dim
  16, 32, 64, 128 or 256 (what the kernel takes; checked on every device so the CPU behaves as the GPU), any
  key count (cross-attention included), SDPA's ``scale``;
* taken: a boolean *key-padding* mask (one row of keys per batch row, the same for every head and query:
  HunyuanVideo's text padding). Masked keys get zero weight in SDPA; the 8-bit path drops them instead, one batch
  row at a time, so K smoothing averages the kept keys only. An all-True mask is dropped. This costs one host
  synchronisation per call and breaks a compiled graph there;
* left to SDPA: any other mask (additive float masks, as LTX-Video's cross-attention passes; masks that differ
  between queries or heads), a batch row whose keys are all masked, ``is_causal``, dropout, grouped-query
  attention, other head dims or dtypes, and calls that need gradients (the 8-bit path has no backward);
* left entirely: a module whose attention does not reach SDPA (another diffusers attention backend, set by
  ``set_attention_backend`` or the ``attention_backend`` context): counted as ``"no SDPA call (attention backend
  …)"``.

Which attention kinds are installed: ``kinds`` (default ``("self", "joint")``: the attention over video tokens that
costs most of a step; cross-attention to the ~512 text tokens is cheap and may be added with ``"cross"``).

``torch.compile``: the wrapper, the mode check and the interception trace into the graph (the custom operators are
single nodes). The block's mode is a Python attribute, so a compiled block is specialised on it: at most one graph
per mode, shared by the blocks of one class. Masked calls (HunyuanVideo) break the graph at the mask check.

Usage::

    handle = install_attention(pipe.transformer, fmt="int8")   # every self/joint attention in 8 bit
    handle.set_modes({0: "bf16", 5: "bf16"})                    # per step, before the transformer call
    handle.stats().calls                                          # {"8bit": ..., "bf16": ...}
    handle.remove()                                               # the original processors, bit for bit
"""

from __future__ import annotations

import inspect
import logging
import math
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from sixbit_tune import compat
from sixbit_tune.errors import PolicyError
from sixbit_tune.formats.attention import QK_FORMATS
from sixbit_tune.kernels import KernelPreference
from sixbit_tune.kernels import ops as _ops
from sixbit_tune.kernels._triton_support import triton_usable_on
from sixbit_tune.models.adapters import ATTENTION_KINDS, get_adapter

__all__ = [
    "ATTENTION_MODES",
    "AttentionHandle",
    "AttentionStats",
    "attention_8bit",
    "attention_path",
    "install_attention",
]

log = logging.getLogger("sixbit_tune.runtime")

#: Modes of a block's attention: the 8-bit path, or the model's own attention (whatever dtype the model runs in).
ATTENTION_MODES = ("8bit", "bf16")
#: Head dims the 8-bit kernel takes.
KERNEL_HEAD_DIMS = _ops.ATTENTION_HEAD_DIMS
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_WRAPPED_ATTR = "_sixbit_attention_site"


# ------------------------------------------------------------------------------------------------ 8-bit attention
def attention_path(device, preference: KernelPreference | str = "auto") -> str:
    """``"triton"`` (the kernel) or ``"reference"`` for attention on ``device``, as the linears choose: ``auto``
    uses the kernel on CUDA with Triton and the reference elsewhere, ``triton`` uses the kernel or raises (on the
    CPU it runs in Triton's interpreter under ``TRITON_INTERPRET=1``), ``reference`` never uses it."""
    pref = KernelPreference(str(preference))
    device = torch.device(device)
    if pref is KernelPreference.REFERENCE:
        return "reference"
    if triton_usable_on(device) and (device.type == "cuda" or pref is KernelPreference.TRITON):
        return "triton"
    if pref is KernelPreference.TRITON:
        raise RuntimeError(f"kernel preference TRITON, but the 8-bit attention kernel cannot run on {device} "
                           "(CPU needs TRITON_INTERPRET=1 set before the kernels are imported, and Triton)")
    return "reference"


def attention_8bit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   qk_format: str = "int8", preference: KernelPreference | str = "auto") -> torch.Tensor:
    """Non-causal 8-bit attention of ``(B, H, S, D)`` tensors through the custom operator of
    :func:`attention_path`; ``(B, H, S_q, D)`` in ``q``'s dtype."""
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if attention_path(q.device, preference) == "triton":
        from sixbit_tune.kernels.attention import attention_8bit_op

        return attention_8bit_op(q, k, v, sm_scale, qk_format)
    return _ops.attention_8bit_reference(q, k, v, sm_scale, qk_format)


def _sdpa_arguments(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


def _unsupported(q, k, v, dropout_p, is_causal, enable_gqa) -> str | None:
    """Why the 8-bit path does not take these SDPA arguments (None: it does), masks aside."""
    tensors = (q, k, v)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return "inputs are not tensors"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "gradients are required (the 8-bit attention has no backward)"
    if is_causal:
        return "causal attention"
    if dropout_p:
        return "attention dropout"
    if any(t.dim() != 4 for t in tensors):
        return "inputs are not (batch, heads, tokens, head_dim)"
    if enable_gqa or q.shape[1] != k.shape[1] or k.shape != v.shape or q.shape[0] != k.shape[0]:
        return "grouped-query attention or unequal shapes"
    if q.shape[-1] not in KERNEL_HEAD_DIMS or k.shape[-1] != q.shape[-1]:
        return f"head_dim {q.shape[-1]} (the 8-bit kernel takes {', '.join(map(str, KERNEL_HEAD_DIMS))})"
    if any(t.dtype not in _DTYPES or t.dtype != q.dtype for t in tensors):
        return f"dtype {q.dtype}/{k.dtype}/{v.dtype}"
    return None


def _key_padding(mask: torch.Tensor, batch: int, keys: int) -> torch.Tensor | None:
    """``mask`` as ``(batch, keys)`` booleans when it is a key-padding mask (SDPA broadcasting: the same keys for
    every head and query of a batch row); None otherwise."""
    if mask.dtype != torch.bool or mask.dim() > 4:
        return None
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    if shape[1] != 1 or shape[2] != 1 or shape[3] != keys or shape[0] not in (1, batch):
        return None
    return mask.reshape(shape[0], keys).expand(batch, keys)


# ------------------------------------------------------------------------------------------------ per module
@dataclass
class _Slot:
    """The mode of one block, shared by its attention modules."""

    block: int
    mode: str


class _Site:
    """One wrapped attention module: its original processor, its block's slot, its counters."""

    def __init__(self, name: str, kind: str, module: torch.nn.Module, inner, slot: _Slot, fmt: str,
                 preference: KernelPreference):
        self.name, self.kind, self.module, self.inner, self.slot = name, kind, module, inner, slot
        self.fmt, self.preference = fmt, preference
        self.calls = {"8bit": 0, "bf16": 0}
        self.fallbacks: dict[str, int] = {}
        self.paths: dict[str, int] = {}
        self.pending_8bit = 0
        self.pending_other = 0
        self.wrapper = None

    def fallback(self, reason: str) -> None:
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1
        self.pending_other += 1
        if self.fallbacks[reason] == 1 and not torch.compiler.is_compiling():
            log.warning("8-bit attention of %s: %s; this call runs the model's own attention", self.name, reason)

    def attend(self, *args, **kwargs) -> torch.Tensor:
        """One SDPA call made while the block's mode is ``"8bit"``."""
        q, k, v, mask, dropout_p, is_causal, scale, enable_gqa = _sdpa_arguments(*args, **kwargs)
        reason = _unsupported(q, k, v, dropout_p, is_causal, enable_gqa)
        rows = None
        if reason is None and mask is not None:
            keep = _key_padding(mask, q.shape[0], k.shape[-2])
            if keep is None:
                reason = ("additive (float) attention mask" if mask.dtype != torch.bool
                          else "attention mask that is not a key-padding mask")
            elif not bool(keep.all()):
                rows = [torch.nonzero(keep[b]).flatten() for b in range(q.shape[0])]
                if any(r.numel() == 0 for r in rows):
                    reason = "a batch row with every key masked"
        if reason is not None:
            self.fallback(reason)
            return F.scaled_dot_product_attention(*args, **kwargs)
        path = attention_path(q.device, self.preference)
        self.paths[path] = self.paths.get(path, 0) + (1 if rows is None else len(rows))
        self.pending_8bit += 1
        if rows is None:
            return attention_8bit(q, k, v, scale, self.fmt, self.preference)
        return torch.cat([attention_8bit(q[b:b + 1], k[b:b + 1, :, r], v[b:b + 1, :, r], scale, self.fmt,
                                         self.preference) for b, r in enumerate(rows)])

    def run(self, attn, args, kwargs):
        if self.slot.mode != "8bit":
            self.calls["bf16"] += 1
            return self.inner(attn, *args, **kwargs)
        self.pending_8bit = 0
        self.pending_other = 0
        with _Interceptor(self):
            out = self.inner(attn, *args, **kwargs)
        if self.pending_8bit == 0 and self.pending_other == 0:
            self.fallback(f"no SDPA call (attention backend {compat.attention_backend_name(self.inner)})")
        self.calls["8bit" if self.pending_other == 0 else "bf16"] += 1
        return out


_PY_TENSOR_METHODS = {name: fn for name, fn in vars(torch.Tensor).items() if isinstance(fn, types.FunctionType)}


class _Interceptor(TorchFunctionMode):
    """Sends ``scaled_dot_product_attention`` calls to a site's 8-bit path; every other function runs as called."""

    def __init__(self, site: _Site):
        super().__init__()
        self.site = site

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.site.attend(*args, **kwargs)
        if (_PY_TENSOR_METHODS.get(getattr(func, "__name__", None)) is func and args
                and isinstance(args[0], torch.Tensor)):
            # A Tensor method written in Python (unflatten, split, ...): called as a method, which torch.compile
            # traces (it cannot trace the function's own super() call); eagerly the same function runs.
            return getattr(args[0], func.__name__)(*args[1:], **kwargs)
        return func(*args, **kwargs)


class _WrappingProcessor:
    """The processor installed on a module: calls the original one through its site. Attributes it does not hold
    itself (diffusers sets the attention backend and parallel config on processors) are the original's."""

    def __init__(self, site: _Site):
        self.__dict__[_WRAPPED_ATTR] = site

    def __getattr__(self, name):  # only for names the wrapper does not hold
        site = self.__dict__.get(_WRAPPED_ATTR)
        if site is None:
            raise AttributeError(name)
        return getattr(site.inner, name)

    def __setattr__(self, name, value):
        setattr(self.__dict__[_WRAPPED_ATTR].inner, name, value)

    def __repr__(self) -> str:
        site = self.__dict__[_WRAPPED_ATTR]
        return f"<8-bit attention of block {site.slot.block} ({site.slot.mode}) around {site.inner!r}>"


_WRAPPER_CLASSES: dict[type, type] = {}


def _wrapper_class(inner_cls: type) -> type:
    """A :class:`_WrappingProcessor` subclass whose ``__call__`` has the signature of ``inner_cls.__call__``:
    diffusers' ``Attention.forward`` passes a processor only the keyword arguments its ``__call__`` names."""
    if inner_cls not in _WRAPPER_CLASSES:
        def __call__(self, attn, *args, **kwargs):
            return self._sixbit_attention_site.run(attn, args, kwargs)

        __call__.__signature__ = inspect.signature(inner_cls.__call__)
        _WRAPPER_CLASSES[inner_cls] = type(f"Sixbit8bit{inner_cls.__name__}", (_WrappingProcessor,),
                                           {"__call__": __call__, "__module__": __name__})
    return _WRAPPER_CLASSES[inner_cls]


def _set_processor(module: torch.nn.Module, processor) -> None:
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:  # MochiAttention holds its processor as a plain attribute
        module.processor = processor


# ------------------------------------------------------------------------------------------------ handle
@dataclass
class AttentionStats:
    """Counts since install (or :meth:`AttentionHandle.reset_stats`).

    Attributes:
        calls: attention-module calls by what ran: ``"8bit"`` when every attention computation of the call ran in
            8 bit, ``"bf16"`` otherwise (the block's mode was ``"bf16"``, or the 8-bit path left the call to SDPA).
        per_block: the same, per block index.
        fallbacks: per module name, the attention computations left to SDPA while the mode was ``"8bit"``, by
            reason.
        paths: calls of the 8-bit operator by path (``"triton"`` or ``"reference"``): one per SDPA call, or one per
            batch row where a key-padding mask is applied.
    """

    calls: dict[str, int] = field(default_factory=dict)
    per_block: dict[int, dict[str, int]] = field(default_factory=dict)
    fallbacks: dict[str, dict[str, int]] = field(default_factory=dict)
    paths: dict[str, int] = field(default_factory=dict)


class AttentionHandle:
    """8-bit attention installed on a transformer (:func:`install_attention`).

    Attributes:
        fmt: the ``Q·Kᵀ`` format, ``"int8"`` or ``"fp8"``.
        blocks: the block indices installed, ascending.
        modules: module names installed (inside the transformer), in block order.
    """

    def __init__(self, transformer: torch.nn.Module, fmt: str, sites: list[_Site], slots: dict[int, _Slot]):
        self.transformer = transformer
        self.fmt = fmt
        self._sites = sites
        self._slots = slots
        self.blocks = tuple(sorted(slots))
        self.modules = tuple(s.name for s in sites)
        self.removed = False

    def set_modes(self, modes: Mapping[int, str]) -> None:
        """Set the attention mode of the given blocks (``"8bit"`` or ``"bf16"``); other blocks keep theirs.

        Raises:
            PolicyError: an unknown mode, a block that was not installed, or a removed handle.
        """
        if self.removed:
            raise PolicyError("this 8-bit attention was removed; install it again")
        for block, mode in modes.items():
            if mode not in ATTENTION_MODES:
                raise PolicyError(f"unknown attention mode {mode!r} for block {block}; expected one of "
                                  f"{ATTENTION_MODES}", key="attention")
            if block not in self._slots:
                raise PolicyError(f"block {block} has no 8-bit attention installed (installed: {list(self.blocks)})",
                                  key="attention")
        for block, mode in modes.items():
            self._slots[block].mode = mode

    def modes(self) -> dict[int, str]:
        """The current mode of every installed block."""
        return {b: s.mode for b, s in sorted(self._slots.items())}

    def stats(self) -> AttentionStats:
        """What ran since install or the last :meth:`reset_stats`."""
        out = AttentionStats(calls={m: 0 for m in ATTENTION_MODES})
        for site in self._sites:
            block = out.per_block.setdefault(site.slot.block, {m: 0 for m in ATTENTION_MODES})
            for mode, n in site.calls.items():
                out.calls[mode] += n
                block[mode] += n
            if site.fallbacks:
                out.fallbacks[site.name] = dict(site.fallbacks)
            for path, n in site.paths.items():
                out.paths[path] = out.paths.get(path, 0) + n
        return out

    def reset_stats(self) -> None:
        for site in self._sites:
            site.calls = {m: 0 for m in ATTENTION_MODES}
            site.fallbacks = {}
            site.paths = {}

    def remove(self) -> None:
        """Put every original processor back (the same objects). A module whose processor was replaced since the
        install keeps the replacement. Idempotent."""
        if self.removed:
            return
        for site in self._sites:
            if site.module.processor is site.wrapper:
                _set_processor(site.module, site.inner)
        self.removed = True

    def __enter__(self) -> AttentionHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def install_attention(model, *, fmt: str = "int8", blocks: Iterable[int] | None = None,
                      modes: Mapping[int, str] | None = None, default: str = "8bit",
                      kinds: Iterable[str] = ("self", "joint"),
                      preference: KernelPreference | str = "auto") -> AttentionHandle:
    """Install 8-bit attention on the attention modules of ``model``'s blocks (a pipeline or its transformer).

    Args:
        fmt: the ``Q·Kᵀ`` operands, ``"int8"`` (K smoothing, per-token INT8) or ``"fp8"`` (per-token E4M3);
            ``P·V`` is FP8 either way (:mod:`sixbit_tune.formats.attention`).
        blocks: block indices (execution order, as ``ModelAdapter.blocks``) to install on; default every block.
        modes: initial mode per block; blocks not named take ``default``.
        default: ``"8bit"`` or ``"bf16"``.
        kinds: attention kinds to install (``"self"``, ``"joint"``, ``"cross"``).
        preference: ``"auto"`` (kernel on CUDA, reference elsewhere), ``"triton"`` or ``"reference"``.

    Returns:
        An :class:`AttentionHandle`: ``set_modes`` per step, ``stats``, ``remove``.

    Raises:
        PolicyError: an unknown format, mode or kind, a block index out of range, or an attention module that
            already has 8-bit attention installed.
        UnsupportedModelError: not a supported transformer.
    """
    if fmt not in QK_FORMATS:
        raise PolicyError(f"unknown attention format {fmt!r}; expected one of {QK_FORMATS}", key="attention.format")
    if default not in ATTENTION_MODES:
        raise PolicyError(f"unknown attention mode {default!r}; expected one of {ATTENTION_MODES}", key="attention")
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in ATTENTION_KINDS]
    if bad:
        raise PolicyError(f"unknown attention kind(s) {bad}; expected some of {ATTENTION_KINDS}", key="attention")
    try:
        pref = KernelPreference(str(preference))
    except ValueError:
        raise PolicyError(f"unknown kernel preference {preference!r}; expected one of "
                          f"{[p.value for p in KernelPreference]}") from None
    adapter = get_adapter(model)
    refs = adapter.blocks()
    chosen = sorted(set(range(len(refs)) if blocks is None else blocks))
    outside = [b for b in chosen if not (isinstance(b, int) and 0 <= b < len(refs))]
    if outside:
        raise PolicyError(f"block indices {outside} out of range (the model has {len(refs)} blocks)",
                          key="attention")
    modes = dict(modes or {})
    for block, mode in modes.items():
        if block not in chosen or mode not in ATTENTION_MODES:
            raise PolicyError(f"initial mode {mode!r} for block {block}: the block must be installed and the mode "
                              f"one of {ATTENTION_MODES}", key="attention")
    attentions = [a for b in chosen for a in adapter.attentions(b) if a.kind in kinds]
    taken = [a.name for a in attentions if isinstance(a.module.processor, _WrappingProcessor)]
    if taken:
        raise PolicyError(f"8-bit attention is already installed on {taken}; remove that handle first",
                          key="attention")
    slots = {b: _Slot(b, modes.get(b, default)) for b in chosen}
    sites = []
    for a in attentions:
        inner = a.module.processor
        site = _Site(a.name, a.kind, a.module, inner, slots[a.block], fmt, pref)
        site.wrapper = _wrapper_class(type(inner))(site)
        _set_processor(a.module, site.wrapper)
        sites.append(site)
    return AttentionHandle(adapter.transformer, fmt, sites, slots)
