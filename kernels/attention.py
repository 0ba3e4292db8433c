"""8-bit attention for Hopper in Triton: INT8 (or FP8) ``Q·Kᵀ``, FP8 ``P·V``.

Numerics: :mod:`sixbit_tune.formats.attention` (K smoothing, per-token INT8 Q and K, per-channel FP8 V, softmax
probabilities scaled by 448 and cast to FP8 for the second product). Three launches per call:

1. ``_quant_rows_kernel`` on Q and on K (K minus its per-channel token mean, computed by PyTorch beforehand):
   one program per ``BLOCK_R`` rows of ``head_dim`` values, strided input, contiguous ``(B, H, S, D)`` codes and
   ``(B, H, S)`` scales, through the INT8 activation quantizer's own rounding (:mod:`.quant`): bit-exact with
   the reference.
2. ``_quant_v_kernel``: V's per-channel scales are reduced by PyTorch; the kernel writes the codes channel-major,
   ``(B, H, D, S)``, so the second product reads its reduction dimension (tokens) contiguously, as FP8 tensor-core
   products on Hopper need.
3. ``_attn_fwd_kernel``: one program per ``BLOCK_M`` queries of one (batch, head); online softmax over blocks of
   ``BLOCK_N`` keys (exp2, with ``1/√D·log2 e`` folded into the query scales); full key blocks run unmasked and
   the last partial block masked.

``attention_8bit(q, k, v)`` is registered as the custom op ``sixbit::attention_8bit`` so ``torch.compile`` traces
through it. Importing this module needs Triton; :mod:`sixbit_tune.kernels.dispatch` imports it lazily.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sixbit_tune.formats import fp8
from sixbit_tune.formats.attention import check_attention_inputs, check_qk_format

from ._triton_support import interpreting
from .ops import ATTENTION_HEAD_DIMS
from .quant import _int8_codes

E4M3_MAX: tl.constexpr = tl.constexpr(fp8.E4M3_MAX)
LOG2_E = 1.4426950408889634
LOG2_E4M3_MAX: tl.constexpr = tl.constexpr(math.log2(fp8.E4M3_MAX))


# ------------------------------------------------------------------------------------------------ quantizers
@triton.jit
def _round_e4m3(x):
    """``x`` (float32, |x| <= 448) rounded to the nearest E4M3 value, ties to even, sign kept, still float32.

    The cast to ``tl.float8e4nv`` then is exact. On the GPU the cast alone rounds the same way; Triton's CPU
    interpreter rounds ties up and drops the carry into the exponent (124 becomes 64), so the kernels round
    explicitly wherever the interpreter runs them.
    """
    bits = x.to(tl.int32, bitcast=True)
    exp = ((bits >> 23) & 0xFF) - 127
    ulp_exp = tl.maximum(exp, -6) - 3  # 3 mantissa bits; below 2^-6 the subnormal step 2^-9
    ulp = ((ulp_exp + 127) << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((127 - ulp_exp) << 23).to(tl.float32, bitcast=True)  # powers of two: both products are exact
    magic = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds |y| < 2^22 to an integer, ties to even
    mag = ((tl.abs(x) * inv_ulp + magic) - magic) * ulp
    # the sign bit of x, set by integer OR (a float negation compiles to 0 - mag on the GPU, which loses -0)
    return (mag.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def _quant_rows_kernel(
    x_ptr, mean_ptr, codes_ptr, scale_ptr,
    n_rows, S, H,
    stride_b, stride_h, stride_s, stride_d,
    D: tl.constexpr, BLOCK_R: tl.constexpr, HAS_MEAN: tl.constexpr, USE_RINT: tl.constexpr,
    QK_FP8: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, D)
    row_ok = rows < n_rows
    bh = rows // S
    s = rows % S
    b = bh // H
    h = bh % H
    x_ptrs = x_ptr + b[:, None] * stride_b + h[:, None] * stride_h + s[:, None] * stride_s + offs_d[None, :] * stride_d
    x = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    if HAS_MEAN:
        mu = tl.load(mean_ptr + bh[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        x = x - mu
    amax = tl.max(tl.abs(x), axis=1)
    if QK_FP8:  # formats.fp8: scale amax/448, r = 1/scale, both 0 where r is not finite
        scale = tl.math.div_rn(amax, tl.full([BLOCK_R], E4M3_MAX, tl.float32))
        r = tl.math.div_rn(tl.full([BLOCK_R], 1.0, tl.float32), scale)
        usable = (scale > 0.0) & (r < float("inf"))
        scale = tl.where(usable, scale, 0.0)
        r = tl.where(usable, r, 0.0)
        y = tl.where(r[:, None] == 0, 0.0, tl.clamp(x * r[:, None], -E4M3_MAX, E4M3_MAX))
        codes = _round_e4m3(y).to(tl.float8e4nv)
    else:
        scale = tl.math.div_rn(amax, tl.full([BLOCK_R], 127.0, tl.float32))
        codes = _int8_codes(x, scale, BLOCK_R, D, USE_RINT)
    tl.store(codes_ptr + rows[:, None] * D + offs_d[None, :], codes, mask=row_ok[:, None])
    tl.store(scale_ptr + rows, scale, mask=row_ok)


@triton.jit
def _quant_v_kernel(
    v_ptr, inv_ptr, codes_ptr,
    S, H,
    stride_b, stride_h, stride_s, stride_d,
    D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    s_ok = offs_s < S
    v = tl.load(v_ptr + b * stride_b + h * stride_h + offs_s[:, None] * stride_s + offs_d[None, :] * stride_d,
                mask=s_ok[:, None], other=0.0).to(tl.float32)
    inv = tl.load(inv_ptr + bh * D + offs_d)
    y = tl.where(inv[None, :] == 0, 0.0, tl.clamp(v * inv[None, :], -E4M3_MAX, E4M3_MAX))  # +0 for zero channels
    y = _round_e4m3(y).to(tl.float8e4nv)
    # channel-major output: codes[bh, d, s]
    tl.store(codes_ptr + bh * D * S + offs_d[None, :] * S + offs_s[:, None], y, mask=s_ok[:, None])


# ------------------------------------------------------------------------------------------------ attention
@triton.jit
def _attn_block(acc, l_i, m_i, q, qs, k_ptrs, ks_ptrs, vt_ptrs, offs_n, S_k, MASKED: tl.constexpr,
                ROUND_P: tl.constexpr, QK_FP8: tl.constexpr):
    if MASKED:
        n_ok = offs_n < S_k
        k = tl.load(k_ptrs, mask=n_ok[:, None], other=0.0)
        ks = tl.load(ks_ptrs, mask=n_ok, other=0.0)
        vt = tl.load(vt_ptrs, mask=n_ok[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
        ks = tl.load(ks_ptrs)
        vt = tl.load(vt_ptrs)
    # Scores in the log2 domain are t·qs with t = (Q_code·K_codeᵀ)·ks: qs (the query scale times 1/√D·log2 e) is
    # positive per row, so the row maximum is max(t)·qs and the exponent one fused multiply-add per element.
    if QK_FP8:
        t = tl.dot(q, tl.trans(k)) * ks[None, :]
    else:
        qk = tl.dot(q, tl.trans(k))  # int32, |qk| <= 127 * 127 * D < 2**22 for D <= 256
        # int32 -> float32 through the bits of 1.5 * 2**23 + qk: an integer add, then (bits - 1.5 * 2**23) * ks
        # as one fused multiply-add (the conversion instruction runs at a fraction of that rate)
        t = (qk + 0x4B400000).to(tl.float32, bitcast=True) * ks[None, :] - (12582912.0 * ks)[None, :]
    if MASKED:
        row_max = tl.max(tl.where(n_ok[None, :], t, float("-inf")), 1)
    else:
        row_max = tl.max(t, 1)
    m_new = tl.maximum(m_i, row_max * qs)
    # P·448 directly (448 = 2^LOG2_E4M3_MAX): the FP8 operand of the second product; the row sum l carries the
    # same factor, which cancels in acc / l
    p8 = tl.math.exp2(t * qs[:, None] - (m_new - LOG2_E4M3_MAX)[:, None])
    if MASKED:
        p8 = tl.where(n_ok[None, :], p8, 0.0)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p8, 1)
    acc = acc * alpha[:, None]
    if ROUND_P:
        p8 = _round_e4m3(p8)
    acc = tl.dot(p8.to(tl.float8e4nv), tl.trans(vt), acc)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(
    q_ptr, qs_ptr, k_ptr, ks_ptr, vt_ptr, vs_ptr, o_ptr,
    S_q, S_k, H, qk_scale,
    stride_ob, stride_oh, stride_os, stride_od,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROUND_P: tl.constexpr, QK_FP8: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < S_q
    q = tl.load(q_ptr + bh * S_q * D + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    qs = tl.load(qs_ptr + bh * S_q + offs_m, mask=m_ok, other=0.0) * qk_scale

    k_ptrs = k_ptr + bh * S_k * D + offs_n[:, None] * D + offs_d[None, :]
    ks_ptrs = ks_ptr + bh * S_k + offs_n
    vt_ptrs = vt_ptr + bh * D * S_k + offs_d[:, None] * S_k + offs_n[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    n_full = (S_k // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, qs, k_ptrs, ks_ptrs, vt_ptrs, start_n + offs_n, S_k,
                                    MASKED=False, ROUND_P=ROUND_P, QK_FP8=QK_FP8)
        k_ptrs += BLOCK_N * D
        ks_ptrs += BLOCK_N
        vt_ptrs += BLOCK_N
    if n_full < S_k:
        acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, qs, k_ptrs, ks_ptrs, vt_ptrs, n_full + offs_n, S_k,
                                    MASKED=True, ROUND_P=ROUND_P, QK_FP8=QK_FP8)

    vs = tl.load(vs_ptr + bh * D + offs_d)
    o = acc * vs[None, :] / l_i[:, None]
    b = bh // H
    h = bh % H
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=m_ok[:, None])


def _configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
        for bm, bn, w, st in [(128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 4, 3), (64, 128, 4, 3),
                              (128, 64, 8, 3), (64, 64, 4, 4)]
    ]


_attn_fwd_tuned = triton.autotune(configs=_configs(), key=["S_q", "S_k", "D", "QK_FP8"])(_attn_fwd_kernel)


# ------------------------------------------------------------------------------------------------ wrappers
def quantize_qk_rows(x: torch.Tensor, mean: torch.Tensor | None = None,
                     qk_format: str = "int8") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token codes ``(B, H, S, D)`` (int8, or E4M3 for ``qk_format="fp8"``) and float32 scales ``(B, H, S)``
    of ``x`` (minus ``mean`` ``(B, H, D)``)."""
    B, H, S, D = x.shape
    fp8_codes = check_qk_format(qk_format) == "fp8"
    codes = torch.empty((B, H, S, D), dtype=torch.float8_e4m3fn if fp8_codes else torch.int8, device=x.device)
    scale = torch.empty((B, H, S), dtype=torch.float32, device=x.device)
    n_rows = B * H * S
    block_r = 16 if interpreting() else 32
    mean_arg = mean.contiguous() if mean is not None else scale
    _quant_rows_kernel[(triton.cdiv(n_rows, block_r),)](
        x, mean_arg, codes, scale, n_rows, S, H, *x.stride(),
        D=D, BLOCK_R=block_r, HAS_MEAN=mean is not None, USE_RINT=not interpreting(), QK_FP8=fp8_codes,
    )
    return codes, scale


def quantize_v_channels(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel FP8 codes, channel-major ``(B, H, D, S)``, and float32 scales ``(B, H, D)`` of ``v``."""
    B, H, S, D = v.shape
    scale, inv = fp8.scales_from_amax(v.float().abs().amax(dim=-2))
    inv = inv.contiguous()
    codes = torch.empty((B, H, D, S), dtype=torch.float8_e4m3fn, device=v.device)
    block_s = 16 if interpreting() else 64
    _quant_v_kernel[(triton.cdiv(S, block_s), B * H)](v, inv, codes, S, H, *v.stride(), D=D, BLOCK_S=block_s)
    return codes, scale


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk_format: str = "int8"):
    """The kernels' version of :func:`sixbit_tune.formats.attention.quantize_qkv` (bit-identical)."""
    q_codes, q_scale = quantize_qk_rows(q, qk_format=qk_format)
    k_codes, k_scale = quantize_qk_rows(k, k.float().mean(dim=-2), qk_format=qk_format)
    v_codes, v_scale = quantize_v_channels(v)
    return q_codes, q_scale, k_codes, k_scale, v_codes, v_scale


def attention_kernel_only(codes, shape, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """The attention launch alone, on what :func:`quantize_qkv` returned (benchmarks time it apart)."""
    q_codes, q_scale, k_codes, k_scale, v_codes, v_scale = codes
    B, H, S_q, D = shape
    S_k = k_codes.shape[2]
    out = torch.empty((B, H, S_q, D), dtype=dtype, device=q_codes.device)
    args = (q_codes, q_scale, k_codes, k_scale, v_codes, v_scale, out, S_q, S_k, H, scale * LOG2_E, *out.stride())
    qk_fp8 = q_codes.dtype == torch.float8_e4m3fn
    if interpreting():
        _attn_fwd_kernel[(triton.cdiv(S_q, 16), B * H)](*args, D=D, BLOCK_M=16, BLOCK_N=16, ROUND_P=True,
                                                         QK_FP8=qk_fp8)
    else:
        _attn_fwd_tuned[lambda meta: (triton.cdiv(S_q, meta["BLOCK_M"]), B * H)](*args, D=D, ROUND_P=False,
                                                                                QK_FP8=qk_fp8)
    return out


def check_kernel_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise for what the kernel does not take: the reference's shape checks (no NaN scan: it would synchronize
    with the device at every call; NaN inputs give NaN outputs) plus a head_dim in ``ops.ATTENTION_HEAD_DIMS``."""
    check_attention_inputs(q, k, v, finite=False)
    D = q.shape[-1]
    if D not in ATTENTION_HEAD_DIMS:
        raise ValueError(f"the FP8 attention kernel takes head_dim {', '.join(map(str, ATTENTION_HEAD_DIMS))}, "
                         f"got {D}")


@torch.library.custom_op("sixbit::attention_8bit", mutates_args=())
def attention_8bit_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      qk_format: str) -> torch.Tensor:
    return attention_kernel_only(quantize_qkv(q, k, v, qk_format), q.shape, q.dtype, scale)


@attention_8bit_op.register_fake
def _(q, k, v, scale, qk_format):
    return q.new_empty(q.shape)


def attention_8bit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   qk_format: str = "int8") -> torch.Tensor:
    """Non-causal 8-bit attention of ``(B, H, S, D)`` tensors; ``(B, H, S_q, D)`` in ``q``'s dtype.

    Args:
        qk_format: ``"int8"`` (default) or ``"fp8"``: the operands of ``Q·Kᵀ`` (``P·V`` is always FP8).

    Raises:
        TypeError, ValueError: tensors the kernel does not take, or an unknown ``qk_format``.
    """
    check_kernel_inputs(q, k, v)
    check_qk_format(qk_format)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return attention_8bit_op(q, k, v, sm_scale, qk_format)
