"""8-bit attention: the numerics of the 8-bit attention route, in plain PyTorch (the specification).

Non-causal scaled-dot-product attention ``O = softmax(Q·Kᵀ/√D)·V`` over ``(batch, heads, tokens, head_dim)``
tensors, computed with INT8 operands for ``Q·Kᵀ`` and FP8 E4M3 operands for ``P·V`` (both run on Hopper's 8-bit
tensor cores at the same rate; INT8 keeps 7 bits of each score operand where E4M3 keeps 3 significant bits, which
measured 2-3x less error on the scores):

1. **K smoothing.** ``K ← K − mean_tokens(K)`` per (batch, head, channel), in float32. Every row of ``Q·Kᵀ``
   shifts by one constant, so the softmax is unchanged, while the channel-wise offset that dominates K's range
   in diffusion transformers leaves the quantized values.
2. **Q and K** are quantized to INT8 per token exactly as activations are (:func:`sixbit_tune.formats.int8.quantize`
   over ``head_dim``: scale ``amax/127``, round half to even, a zero row has scale 0 and zero codes); with
   ``qk_format="fp8"``, to E4M3 per token by :func:`sixbit_tune.formats.fp8.quantize` instead.
3. **Scores** ``S = (Q_code·K_codeᵀ) · s_q · s_kᵀ / √D``: the product exact (integer, or float32 accumulation
   of E4M3 products), then float32.
4. **Probabilities.** ``P = exp(S − m)`` with ``m`` the row maximum; ``P·448`` (values in (0, 448]) is cast to
   e4m3 for the second product; the row sum ``l = Σ P`` stays float32.
5. **V** is quantized to E4M3 per channel (one scale per (batch, head, channel), over all tokens) exactly as
   :func:`sixbit_tune.formats.fp8.quantize` quantizes a slice.
6. ``O = (P_code·V_code) · s_v / 448 / l``, cast to the input dtype.

The kernel (``sixbit_tune.kernels.attention``) computes the softmax online, one block of keys at a time: its
``m`` is the running maximum, so its probabilities are rounded to e4m3 relative to a different maximum than here
and it matches this reference to rounding, not bit for bit (tests bound the difference). Quantizing Q, K and V
(steps 1, 2, 5) is bit-exact in both.
"""

from __future__ import annotations

import math

import torch

from sixbit_tune.formats import fp8, int8
from sixbit_tune.formats.common import check_float_input
from sixbit_tune.formats.fp8 import E4M3_MAX

QK_FORMATS = ("int8", "fp8")

__all__ = ["QK_FORMATS", "attention_8bit_reference", "check_attention_inputs", "check_qk_format", "quantize_qkv",
           "smooth_k"]


def check_qk_format(qk_format: str) -> str:
    """Return ``qk_format`` if it is one of :data:`QK_FORMATS`, else raise ValueError."""
    if qk_format not in QK_FORMATS:
        raise ValueError(f"unknown Q·Kᵀ format {qk_format!r}; expected one of {QK_FORMATS}")
    return qk_format


def smooth_k(k: torch.Tensor) -> torch.Tensor:
    """``K − mean over tokens`` per (batch, head, channel), float32."""
    kf = k.float()
    return kf - kf.mean(dim=-2, keepdim=True)


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk_format: str = "int8"):
    """Steps 1, 2 and 5: ``(q_codes, q_scale, k_codes, k_scale, v_codes, v_scale)``.

    ``q_codes``/``k_codes`` are int8 of the input's shape with ``(B, H, S)`` scales; ``v_codes`` is
    ``(B, H, D, S)`` E4M3 (channel-major: the layout the kernel's second product reads), ``v_scale`` ``(B, H, D)``.
    """
    fmt = {"int8": int8, "fp8": fp8}[check_qk_format(qk_format)]
    q_codes, q_scale = fmt.quantize(q, check=False)
    k_codes, k_scale = fmt.quantize(smooth_k(k), check=False)
    v_codes, v_scale = fp8.quantize(v.transpose(-1, -2), check=False)
    return q_codes, q_scale, k_codes, k_scale, v_codes, v_scale


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, finite: bool = True) -> None:
    """Raise TypeError/ValueError for tensors that are not non-causal attention inputs; with ``finite``, also
    NonFiniteError for NaN or infinity (a scan that synchronizes with the device)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_input(t, f"attention {name}", finite=finite)
        if t.dim() != 4:
            raise ValueError(f"attention {name} must be (batch, heads, tokens, head_dim), got shape {tuple(t.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def attention_8bit_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             scale: float | None = None, qk_format: str = "int8") -> torch.Tensor:
    """Non-causal attention with the 8-bit numerics above; ``(B, H, S_q, D)`` in ``q``'s dtype.

    Args:
        q, k, v: ``(batch, heads, tokens, head_dim)``; k and v share their token count.
        scale: softmax scale, ``1/√D`` by default (as ``scaled_dot_product_attention``).
        qk_format: ``"int8"`` (step 2 as written) or ``"fp8"`` (Q and K through
            :func:`sixbit_tune.formats.fp8.quantize` instead: E4M3 per token).

    Raises:
        ValueError: shapes that are not attention shapes.
        NonFiniteError: NaN or infinity in an input.
    """
    check_attention_inputs(q, k, v)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q_codes, q_scale, k_codes, k_scale, v_codes, v_scale = quantize_qkv(q, k, v, qk_format)
    s = (q_codes.float() @ k_codes.float().transpose(-1, -2)) * q_scale.unsqueeze(-1) * k_scale.unsqueeze(-2)
    s = s * sm_scale
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    denom = p.sum(dim=-1, keepdim=True)
    p_codes = (p * E4M3_MAX).to(torch.float8_e4m3fn)
    o = p_codes.float() @ v_codes.float().transpose(-1, -2)
    o = o * v_scale.unsqueeze(-2) / E4M3_MAX / denom
    return o.to(q.dtype)
