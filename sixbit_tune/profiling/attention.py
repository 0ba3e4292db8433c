"""The attention error of the profile: ``attn_err = ‖O_a − O‖₂ / ‖O‖₂`` per block, step and batch row.

``O`` is the attention output the model computed (``scaled_dot_product_attention`` in the model dtype) and ``O_a``
the 8-bit attention of :mod:`sixbit_tune.formats.attention` (Q·Kᵀ format ``a``: ``"fp8"`` or ``"int8"``) over the
very ``q``, ``k``, ``v`` that call received. Norms run over (heads, tokens, head_dim) of one batch row, in float32.

Capture. Each block's self-attention module (the block's ``attn1``, else ``attn``: :data:`SELF_ATTENTION_ATTRS`;
Wan and LTX blocks also hold a cross-attention ``attn2``, which is not profiled) runs inside a
:class:`SDPACapture`, a ``torch.overrides.TorchFunctionMode`` that records every
``torch.nn.functional.scaled_dot_product_attention`` call made while the module runs, whoever makes it: the
processors that call it directly (CogVideoX, Mochi) and diffusers' ``dispatch_attention_fn`` with its default
``native`` backend (Wan, LTX, HunyuanVideo, the reference model). Nothing of diffusers is patched. An attention
backend that bypasses that function (flash-attn, SageAttention, ...) is not seen: the block then records no
``attn_err`` and :class:`AttentionNotCaptured` is warned once per block.

Several calls per module are combined per batch row: calls that each cover the whole batch add their squared
norms; calls of one row each (Mochi attends over each sample's valid text tokens separately) are that row.

Masks. A boolean key-padding mask (``(B|1, 1, 1, S_k)``, as HunyuanVideo passes) is honoured the way the model
honours it: row ``b`` attends to its unmasked keys only, so ``O_a`` of row ``b`` is the 8-bit attention over those
keys (K smoothing and V scales taken over them). Any other mask, ``is_causal``, dropout or grouped-query attention
is not an attention the 8-bit route computes: such a call is skipped with :class:`AttentionNotCaptured`.

``O_a`` is computed by the Triton kernel (``sixbit_tune.kernels.attention``) on CUDA where it takes the shape (what
the runtime runs), else by :func:`sixbit_tune.formats.attention.attention_8bit_reference` one chunk of queries at a
time (each query row is independent there, so chunking changes no value).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from sixbit_tune.errors import NonFiniteError
from sixbit_tune.formats.attention import QK_FORMATS, attention_8bit_reference
from sixbit_tune.stats import safe_ratio

__all__ = [
    "ATTENTION_FORMATS",
    "SELF_ATTENTION_ATTRS",
    "AttentionCall",
    "AttentionNotCaptured",
    "SDPACapture",
    "attention_errors",
    "combine_calls",
    "self_attention",
]

#: Attention formats that can be profiled: the Q·Kᵀ formats of ``sixbit_tune.formats.attention``.
ATTENTION_FORMATS = QK_FORMATS
#: Block attributes holding the self-attention module, first found wins.
SELF_ATTENTION_ATTRS = ("attn1", "attn")
#: Score elements (float32) one chunk of the plain-PyTorch route may hold.
_CHUNK_SCORES = 1 << 24


class AttentionNotCaptured(UserWarning):
    """A block's attention error could not be recorded (the warning says why); its other statistics are."""


def self_attention(block: nn.Module) -> tuple[str, nn.Module] | None:
    """``(attribute, module)`` of a block's self-attention, or None when it has none of
    :data:`SELF_ATTENTION_ATTRS`."""
    for name in SELF_ATTENTION_ATTRS:
        m = getattr(block, name, None)
        if isinstance(m, nn.Module):
            return name, m
    return None


@dataclass
class AttentionCall:
    """One ``scaled_dot_product_attention`` call: its inputs (``(B, H, S, D)``), output and options."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    attn_mask: torch.Tensor | None = None
    scale: float | None = None
    skip: str | None = None  # why this call is not an attention the 8-bit route computes


#: the function itself, taken at import: a later wrapper of the module attribute (a test's, a tracer's) still
#: calls it and is seen through it
_SDPA = F.scaled_dot_product_attention
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class SDPACapture(TorchFunctionMode):
    """Records every ``torch.nn.functional.scaled_dot_product_attention`` call made inside the ``with`` block
    (:attr:`calls`); the calls themselves run unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[AttentionCall] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is _SDPA:
            a = dict(zip(_SDPA_PARAMS, args))
            a.update(kwargs)
            skip = None
            if a.get("dropout_p", 0.0):
                skip = f"dropout_p={a['dropout_p']}"
            elif a.get("is_causal", False):
                skip = "is_causal=True"
            elif a.get("enable_gqa", False) or a["key"].shape[-3] != a["query"].shape[-3]:
                skip = "grouped-query attention"
            elif a["query"].dim() != 4:
                skip = f"{a['query'].dim()}-d query (expected (batch, heads, tokens, head_dim))"
            mask = a.get("attn_mask")
            if skip is None and mask is not None and not _is_key_padding(mask, a["key"]):
                skip = f"an attention mask of dtype {mask.dtype} and shape {tuple(mask.shape)} (only boolean key-padding masks are taken)"
            self.calls.append(AttentionCall(a["query"], a["key"], a["value"], out, mask, a.get("scale"), skip))
        return out


def _is_key_padding(mask: torch.Tensor, k: torch.Tensor) -> bool:
    return (
        mask.dtype == torch.bool
        and mask.dim() == 4
        and mask.shape[1] == 1
        and mask.shape[2] == 1
        and mask.shape[3] == k.shape[-2]
        and mask.shape[0] in (1, k.shape[0])
    )


def _attention_8bit(q, k, v, scale, fmt: str) -> torch.Tensor:
    if q.is_cuda:
        try:
            from sixbit_tune.kernels.attention import attention_8bit, check_kernel_inputs

            check_kernel_inputs(q, k, v)
        except (ImportError, ValueError, TypeError):
            pass
        else:
            return attention_8bit(q, k, v, scale=scale, qk_format=fmt)
    b, h, s_q, _ = q.shape
    chunk = max(1, _CHUNK_SCORES // max(1, b * h * k.shape[-2]))
    try:
        if chunk >= s_q:
            return attention_8bit_reference(q, k, v, scale=scale, qk_format=fmt)
        return torch.cat(
            [attention_8bit_reference(q[..., i : i + chunk, :], k, v, scale=scale, qk_format=fmt)
             for i in range(0, s_q, chunk)],
            dim=-2,
        )
    except NonFiniteError:
        # NaN/Inf inputs: a NaN error, which the step's flush reports naming the block (as for every statistic)
        return torch.full_like(q, float("nan"))


def attention_errors(call: AttentionCall, formats: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared norms of one call, per batch row: ``(‖O_a − O‖₂² as [F, B], ‖O‖₂² as [B])``, float32.

    Raises:
        ValueError: ``call.skip`` is set (the call is not an attention the 8-bit route computes), or an unknown
            format.
    """
    if call.skip:
        raise ValueError(f"attention call not taken: {call.skip}")
    bad = [f for f in formats if f not in ATTENTION_FORMATS]
    if bad or not formats:
        raise ValueError(f"attention formats must be a non-empty subset of {ATTENTION_FORMATS}, got {list(formats)}")
    q, k, v, out = call.q, call.k, call.v, call.out
    ref = out.float()
    den = ref.square().sum(dim=(1, 2, 3))
    nums = []
    for fmt in formats:
        if call.attn_mask is None:
            oa = _attention_8bit(q, k, v, call.scale, fmt)
            nums.append((oa.float() - ref).square().sum(dim=(1, 2, 3)))
        else:
            keep = call.attn_mask.reshape(call.attn_mask.shape[0], -1)
            rows = []
            for b in range(q.shape[0]):
                idx = keep[b if keep.shape[0] > 1 else 0].nonzero().flatten()
                oa = _attention_8bit(q[b : b + 1], k[b : b + 1, :, idx], v[b : b + 1, :, idx], call.scale, fmt)
                rows.append((oa.float() - ref[b : b + 1]).square().sum())
            nums.append(torch.stack(rows))
    return torch.stack(nums), den


def combine_calls(parts: Sequence[tuple[torch.Tensor, torch.Tensor]], batch: int | None = None) -> torch.Tensor:
    """``attn_err`` ``[F, B]`` of one attention module call from its calls' :func:`attention_errors`.

    Calls that each cover all ``batch`` rows add up per row; calls of one row each (as many as rows) are
    concatenated. ``batch`` None: the first call's row count.

    Raises:
        ValueError: the calls' rows fit neither way.
    """
    sizes = [d.shape[0] for _, d in parts]
    batch = sizes[0] if batch is None else batch
    if all(s == batch for s in sizes):
        num = torch.stack([n for n, _ in parts]).sum(0)
        den = torch.stack([d for _, d in parts]).sum(0)
    elif sum(sizes) == batch:
        num = torch.cat([n for n, _ in parts], dim=1)
        den = torch.cat([d for _, d in parts])
    else:
        raise ValueError(
            f"attention calls of {sizes} rows cannot be attributed to the {batch} rows of the block's batch"
        )
    return safe_ratio(num, den).sqrt()


def warn_not_captured(block: str, why: str) -> None:
    warnings.warn(AttentionNotCaptured(f"{block}: no attn_err recorded: {why}"), stacklevel=3)


def fmt_ok(formats: Sequence[str]) -> tuple[str, ...]:
    """``formats`` as a tuple, checked against :data:`ATTENTION_FORMATS` (an empty tuple: none recorded)."""
    formats = tuple(formats)
    bad = [f for f in formats if f not in ATTENTION_FORMATS]
    if bad:
        raise ValueError(f"attention formats must be a subset of {ATTENTION_FORMATS}, got {list(formats)}")
    return formats

