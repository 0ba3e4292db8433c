"""NVFP4 W4A4 GEMM for GPUs without FP4 tensor cores (Hopper): dequantize inside the GEMM, multiply on the
bf16 tensor cores.

The weight stays packed in memory (4 bits per element + one E4M3 scale per 16 elements + one float32 scale:
4.5 bits per stored weight). Each weight tile is unpacked in registers (nibbles by shifts, the E2M1 value built
from its bits, times its block scale) and fed to ``tl.dot``. ``E2M1 * E4M3`` has at most 6 significant bits, so
the dequantized operands (without the per-tensor scales) are exact in bf16; the product of the two per-tensor
scales is applied once in the epilogue, with the bias, in float32. The numerics are NVFP4's; the speed is at
best bf16's.

The activation side comes in one of two forms (same numbers, different cost):

* ``a_packed``: the activation as NVFP4 codes + block scales, dequantized in the kernel like the weight;
* ``a_deq``: the activation already expanded by the quantizer to bf16 ``E2M1 * b`` (it writes that instead of
  the packed codes, one pass over the activation); the kernel then loads it (pointer loads or a tensor
  descriptor) and dequantizes only the weight. With ``swap=True`` the weight tile is the first (register)
  operand of the MMA and the kernel computes the transposed tile ``W x^T``. The default ("auto") autotunes over
  tiles, operand order and TMA loads.

H200 (benchmarks/results/kernels-h200.md): the GEMM alone runs at 0.41-0.55x cuBLAS bf16; with both operands
packed (and the activation quantizer included) at 0.15-0.24x. The limit is the dequantization: ~12 integer/float operations per weight element per token tile,
issued by the same warps that drive the tensor cores (no producer/consumer warp specialization here), so the
tensor cores wait on it.

Under the CPU interpreter the dot runs in float32 (Triton 3.9's interpreter gives silently wrong bf16 dots, errors
around 1e10); values are identical because the operands are exact in bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_support import ensure_tma_allocator, interpreting, launcher
from .gemm_int8 import _tile_coords, autotune_bench, store_rounded

_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
]
_INTERP_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=1)]


def _configs():
    return _INTERP_CONFIGS if interpreting() else _GPU_CONFIGS


@triton.jit
def _decode_tile(byte, sbyte, R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Packed bytes [R, BLOCK_K // 2] and E4M3 scale bytes [R, BLOCK_K // 16] -> [R, BLOCK_K] tile of
    E2M1[code] * block_scale (exact), cast to DOT_DTYPE."""
    # E4M3 byte -> float32 (normal: exponent bias 7 -> 127; subnormal: mant * 2**-9).
    sb = sbyte.to(tl.uint32)
    se = (sb >> 3) & 15
    sm = sb & 7
    snorm = (((se + 120) << 23) | (sm << 20)).to(tl.float32, bitcast=True)
    scale = tl.where(se == 0, sm.to(tl.float32) * 0.001953125, snorm)
    scale = tl.where((sb & 0x80) != 0, -scale, scale)
    # Nibbles -> codes, even element in the low nibble.
    code = tl.reshape(tl.join(byte & 15, byte >> 4), [R, BLOCK_K]).to(tl.uint32)
    mag = code & 7
    # E2M1 magnitude as float32 bits: e > 0 -> 2**(e-1) * (1 + m/2); codes 0, 1 -> 0, 0.5.
    bits = tl.where(mag >= 2, (mag << 22) + (126 << 23), mag * (126 << 23)) | ((code & 8) << 28)
    val = tl.reshape(bits.to(tl.float32, bitcast=True), [R, BLOCK_K // 16, 16]) * scale[:, :, None]
    return tl.reshape(val, [R, BLOCK_K]).to(DOT_DTYPE)


@triton.jit
def _load_scales(scale_ptr, rows, k0, K, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    sk = k0 // 16 + tl.arange(0, BLOCK_K // 16)
    s_ptrs = scale_ptr + rows[:, None].to(tl.int64) * (K // 16) + sk[None, :]
    if EVEN_K:
        return tl.load(s_ptrs)
    else:
        return tl.load(s_ptrs, mask=sk[None, :] < K // 16, other=0)


@triton.jit
def _dequant_tile(data_ptr, scale_ptr, rows, k0, K, EVEN_K: tl.constexpr, R: tl.constexpr,
                  BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """[R, BLOCK_K] tile of E2M1[code] * block_scale (exact) through pointer loads, cast to DOT_DTYPE."""
    pk = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    d_ptrs = data_ptr + rows[:, None].to(tl.int64) * (K // 2) + pk[None, :]
    if EVEN_K:
        byte = tl.load(d_ptrs)
    else:
        byte = tl.load(d_ptrs, mask=pk[None, :] < K // 2, other=0)
    sbyte = _load_scales(scale_ptr, rows, k0, K, EVEN_K, BLOCK_K)
    return _decode_tile(byte, sbyte, R, BLOCK_K, DOT_DTYPE)


def _nvfp4_gemm_body(
    a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, ga_ptr, gb_ptr, c_ptr, bias_ptr, M, N, K, M_BUCKET, stride_cm,
    A_PACKED: tl.constexpr, SWAP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TMA: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _tile_coords(pid, num_pid_m, num_pid_n, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    rk = tl.arange(0, BLOCK_K)
    if TMA:  # activation (bf16) and weight bytes through tensor descriptors; needs K % 32 == 0
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K // 2], strides=[K // 2, 1],
                                           block_shape=[BLOCK_N, BLOCK_K // 2])
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = kt * BLOCK_K
        if A_PACKED:
            a = _dequant_tile(a_ptr, a_scale_ptr, rm, k0, K, EVEN_K, BLOCK_M, BLOCK_K, DOT_DTYPE)
        elif TMA:
            a = a_desc.load([pid_m * BLOCK_M, k0]).to(DOT_DTYPE)
        else:
            a_ptrs = a_ptr + rm[:, None].to(tl.int64) * K + (k0 + rk)[None, :]
            if EVEN_K:
                a = tl.load(a_ptrs)
            else:
                a = tl.load(a_ptrs, mask=(k0 + rk)[None, :] < K, other=0.0)
            a = a.to(DOT_DTYPE)
        if TMA:
            wbyte = w_desc.load([pid_n * BLOCK_N, k0 // 2])
            w = _decode_tile(wbyte, _load_scales(b_scale_ptr, rn, k0, K, EVEN_K, BLOCK_K), BLOCK_N, BLOCK_K,
                             DOT_DTYPE)
        else:
            w = _dequant_tile(b_ptr, b_scale_ptr, rn, k0, K, EVEN_K, BLOCK_N, BLOCK_K, DOT_DTYPE)
        if SWAP:
            acc = tl.dot(w, tl.trans(a), acc)
        else:
            acc = tl.dot(a, tl.trans(w), acc)
    if SWAP:
        acc = tl.trans(acc)
    g = tl.load(ga_ptr) * tl.load(gb_ptr)
    out = acc * g
    om = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    on = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = om < M
    mn = on < N
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + on, mask=mn, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + om[:, None].to(tl.int64) * stride_cm + on[None, :]
    store_rounded(c_ptrs, out, mm[:, None] & mn[None, :], c_ptr.dtype.element_ty)


_EVEN_K = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
#: Fixed forms (A_PACKED, SWAP, TMA given at launch), autotuned over tiles.
_nvfp4_gemm_kernel = triton.autotune(
    configs=_configs(), key=["M_BUCKET", "N", "K", "A_PACKED", "SWAP", "HAS_BIAS", "TMA"], do_bench=autotune_bench
)(_EVEN_K(triton.jit(_nvfp4_gemm_body)))


def _auto_configs():
    """Activation pre-expanded ("deq"): autotuned over tiles x operand order (SWAP) x TMA loads."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "SWAP": sw, "TMA": tma},
                              num_warps=1) for sw, tma in [(False, True)]]
    tiles = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, "SWAP": sw, "TMA": tma},
                      num_warps=w, num_stages=st)
        for m, n, k, w, st in tiles
        for sw in (False, True)
        for tma in (False, True)
    ]


_nvfp4_gemm_auto = triton.autotune(
    configs=_auto_configs(), key=["M_BUCKET", "N", "K", "A_PACKED", "HAS_BIAS"], do_bench=autotune_bench
)(_EVEN_K(triton.jit(_nvfp4_gemm_body)))


def _launch(a, a_scale, b, b_scale, ga, gb, bias, M, N, K, out_dtype, a_packed, swap, tma=False):
    """``swap``/``tma``: fixed forms; ``swap=None``: the autotuned "deq" kernel (K % 32 == 0)."""
    c = torch.empty((M, N), dtype=out_dtype, device=b.device)
    if M == 0 or N == 0:
        return c
    has_bias = bias is not None
    dot_dtype = tl.float32 if interpreting() else tl.bfloat16

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    args = (a, a_scale, b, b_scale, ga, gb, c, bias if has_bias else ga, M, N, K,
            min(triton.next_power_of_2(max(M, 1)), 1 << 17), c.stride(0))
    if swap is None or tma:
        ensure_tma_allocator()
    if swap is None:
        launcher(_nvfp4_gemm_auto)[grid](*args, A_PACKED=a_packed, HAS_BIAS=has_bias, DOT_DTYPE=dot_dtype)
    else:
        launcher(_nvfp4_gemm_kernel)[grid](*args, A_PACKED=a_packed, SWAP=swap, HAS_BIAS=has_bias, DOT_DTYPE=dot_dtype,
                                 TMA=tma)
    return c


def nvfp4_gemm_packed(a_data, a_scales, a_gs, b_data, b_scales, b_gs, bias, out_dtype, swap=False):
    """Both operands packed NVFP4 (``[M, K//2]`` / ``[N, K//2]`` uint8 codes, e4m3 block scales, 0-d global
    scales). Returns ``[M, N]`` in ``out_dtype``: ``(A_deq @ W_deq.T)`` plus bias."""
    M = a_data.shape[0]
    N, K = b_data.shape[0], b_data.shape[1] * 2
    return _launch(a_data, a_scales.view(torch.uint8), b_data, b_scales.view(torch.uint8), a_gs, b_gs, bias,
                   M, N, K, out_dtype, True, swap)


def nvfp4_gemm_deq(a_deq, a_gs, b_data, b_scales, b_gs, bias, out_dtype, swap=True, tma=False):
    """Activation given as bf16 ``E2M1 * b`` ``[M, K]`` (contiguous) and its global scale; weight packed.

    ``swap=None``: autotuned over operand order and TMA loads (needs ``K % 32 == 0``)."""
    M, K = a_deq.shape
    N = b_data.shape[0]
    if (swap is None or tma) and K % 32:
        raise ValueError(f"the TMA forms need K % 32 == 0, got K={K}")
    return _launch(a_deq, a_deq, b_data, b_scales.view(torch.uint8), a_gs, b_gs, bias,
                   M, N, K, out_dtype, False, swap, tma)


#: Form the dispatch uses: "auto" (the activation quantizer writes bf16 ``E2M1 * b``, the kernel dequantizes
#: only the weight; autotuned over tiles, operand order and TMA loads; K % 32 == 0, else "deq"). Fixed forms:
#: "deq" (same with pointer loads), "deq-tma", "packed" (both operands dequantized in the kernel), and their
#: "-swap" versions (weight tile as the first MMA operand). H200, 2026-11-24: a split-nibble fp16 variant (two
#: dots per K step, no nibble interleave) was slower than "deq" (0.16-0.46x cuBLAS bf16) and was removed.
DEFAULT_FORM = "auto"


def nvfp4_linear_emulated(x2: torch.Tensor, w, bias, out_dtype: torch.dtype, form: str | None = None):
    """Quantize the activation ``x2 [M, K]`` (contiguous) to NVFP4 and multiply by the packed weight ``w``
    (an ``NVFP4Tensor [N, K]``). Returns ``(y [M, N], amax of x2)`` (the caller checks amax for NaN/Inf)."""
    from .quant import quantize_nvfp4

    form = DEFAULT_FORM if form is None else form
    swap = form.endswith("-swap")
    base = form[: -len("-swap")] if swap else form
    wd, ws = w.data.contiguous(), w.block_scales.contiguous()
    if base in ("auto", "deq", "deq-tma"):
        _, _, gs, deq, amax = quantize_nvfp4(x2, write_dequant=True, write_packed=False)
        if base == "auto" and x2.shape[1] % 32 == 0:
            return nvfp4_gemm_deq(deq, gs, wd, ws, w.global_scale, bias, out_dtype, swap=None), amax
        return nvfp4_gemm_deq(deq, gs, wd, ws, w.global_scale, bias, out_dtype, swap=swap,
                              tma=base == "deq-tma"), amax
    if base == "packed":
        data, scales, gs, _, amax = quantize_nvfp4(x2)
        return nvfp4_gemm_packed(data, scales, gs, wd, ws, w.global_scale, bias, out_dtype, swap=swap), amax
    raise ValueError(f"unknown NVFP4 GEMM form {form!r}")
