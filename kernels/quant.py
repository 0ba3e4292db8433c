"""Triton activation quantizers producing exactly the layouts and bits of :mod:`sixbit_tune.formats`.

* :func:`quantize_int8_rows`: per-token (per-row) symmetric INT8 — row amax, scale ``amax / 127`` and codes
  ``clamp(rne(x / scale), -127, 127)`` in one kernel (IEEE division through ``div_rn``; round half to even through
  the float32 ``+ 1.5 * 2**23`` trick, exact for ``|v| < 2**22``).
* :func:`quantize_nvfp4`: per-tensor amax (one atomic-max kernel over the float32 bit patterns, no host sync),
  then one kernel for block scales and packed codes (the tile is loaded once and split into even and odd
  elements, so that the two nibbles of a byte meet in one thread). The E4M3 rounding of the block scales is done with integer
  arithmetic on the float32 bits (the values are always normal, in [2**-6, 448]), not with Triton's fp8 cast:
  Triton 3.9's CPU interpreter rounds about 2.4% of float32 -> float8e4nv casts wrongly (it loses the exponent
  carry, e.g. 1.958 -> 1.0). The block kernel can also write the dequantized-without-global-
  scale values ``E2M1[code] * b`` as bf16 (exact: at most 6 significant bits) for the emulated NVFP4 GEMM.

Non-finite input is not detected here (that would cost a host sync); :mod:`.dispatch` checks the scales.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_support import interpreting, launcher

try:  # libdevice's rint is round-half-even on the GPU; the CPU interpreter lacks it
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover
    libdevice = None


@triton.jit
def _rne(v, USE_RINT: tl.constexpr):
    """Round float32 to the nearest integer, ties to even (exact for |v| < 2**22, which is all we need)."""
    if USE_RINT:
        return libdevice.rint(v)
    else:
        return (v + 12582912.0) - 12582912.0  # 1.5 * 2**23


@triton.jit
def _int8_codes(x, scale, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, USE_RINT: tl.constexpr):
    """clamp(rne(x / scale), -127, 127) per row with IEEE division; 0 for rows whose scale is 0.

    (Multiplying by the reciprocal and redoing only tiles near a rounding boundary was tried: with bf16
    inputs nearly every 4k-element tile has such an element, so it saved nothing.)
    """
    zero = scale == 0.0
    denom = tl.where(zero, 1.0, scale)
    v = tl.math.div_rn(x, tl.broadcast_to(denom[:, None], [ROWS, BLOCK_K]))
    v = _rne(v, USE_RINT)
    v = tl.minimum(tl.maximum(v, -127.0), 127.0)
    return tl.where(zero[:, None], 0.0, v).to(tl.int8)


@triton.jit
def _int8_rows_kernel(
    x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm,
    BLOCK_K: tl.constexpr, ROWS: tl.constexpr, USE_RINT: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_K)
    rmask = rows < M
    mask = rmask[:, None] & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    # amax as an integer max over the bits of |x|: exact, and NaN (bits above +Inf) propagates.
    amax = tl.max(tl.abs(x).to(tl.int32, bitcast=True), axis=1).to(tl.float32, bitcast=True)
    scale = tl.math.div_rn(amax, tl.full([ROWS], 127.0, tl.float32))
    q = _int8_codes(x, scale, ROWS, BLOCK_K, USE_RINT)
    tl.store(q_ptr + rows[:, None].to(tl.int64) * stride_qm + cols[None, :], q, mask=mask)
    tl.store(s_ptr + rows, scale, mask=rmask)


@triton.jit
def _int8_rows_loop_kernel(
    x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm,
    BLOCK_K: tl.constexpr, USE_RINT: tl.constexpr,
):
    # Two passes over one long row (K > 16384): amax, then codes (the second read is served by L2).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        m = (k0 + cols) < K
        x = tl.load(x_ptr + row * stride_xm + k0 + cols, mask=m, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x).to(tl.int32, bitcast=True))
    a = tl.max(amax, axis=0).to(tl.float32, bitcast=True)
    scale = tl.math.div_rn(a, 127.0)
    zero = scale == 0.0
    denom = tl.where(zero, 1.0, scale)
    for k0 in range(0, K, BLOCK_K):
        m = (k0 + cols) < K
        x = tl.load(x_ptr + row * stride_xm + k0 + cols, mask=m, other=0.0).to(tl.float32)
        v = tl.math.div_rn(x, tl.full([BLOCK_K], 1.0, tl.float32) * denom)
        v = _rne(v, USE_RINT)
        v = tl.minimum(tl.maximum(v, -127.0), 127.0)
        v = tl.where(zero, 0.0, v)
        tl.store(q_ptr + row * stride_qm + k0 + cols, v.to(tl.int8), mask=m)
    tl.store(s_ptr + row, scale)


#: Launch parameters of the per-row INT8 quantizer. Rows with K <= loop_k are held whole in registers,
#: ``elems // next_pow2(K)`` rows (at least one) per program; longer rows are read twice in chunks of
#: ``loop_block`` (the second read hits L2). H200, 2026-11-24: one row of <= 2048 per program with 4 warps
#: reached 2.27 TB/s at K = 1,920; whole rows of 8-16k elements only 0.75-1.25 TB/s.
INT8_QUANT_PARAMS = {"elems": 2048, "num_warps": 4, "loop_k": 4096, "loop_block": 2048, "loop_warps": 4}


def quantize_int8_rows(x: torch.Tensor, elems=None, num_warps=None, loop_k=None):
    """Per-row INT8 of a 2-D float tensor ``x [M, K]`` (last dim contiguous).

    ``elems``, ``num_warps`` and ``loop_k`` override :data:`INT8_QUANT_PARAMS` (benchmarking); every setting
    gives the same bits.

    Returns:
        ``(q int8 [M, K], scales float32 [M])``, bit-identical to ``sixbit_tune.formats.int8.quantize(x)``.
    """
    assert x.dim() == 2 and x.stride(1) == 1
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    s = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return q, s
    p = INT8_QUANT_PARAMS
    elems = p["elems"] if elems is None else elems
    use_rint = not interpreting()
    loop_k = p["loop_k"] if loop_k is None else loop_k
    if K <= min(loop_k, 16384):
        block_k = max(16, triton.next_power_of_2(K))
        rows = max(1, min(64, elems // block_k))
        nw = p["num_warps"] if num_warps is None else num_warps
        if block_k * rows >= 16384:
            nw = max(nw, 8)
        if interpreting():
            nw = 1
        launcher(_int8_rows_kernel)[(triton.cdiv(M, rows),)](
            x, q, s, M, K, x.stride(0), q.stride(0), BLOCK_K=block_k, ROWS=rows, USE_RINT=use_rint,
            num_warps=nw,
        )
    else:
        launcher(_int8_rows_loop_kernel)[(M,)](
            x, q, s, M, K, x.stride(0), q.stride(0), BLOCK_K=p["loop_block"], USE_RINT=use_rint,
            num_warps=1 if interpreting() else p["loop_warps"],
        )
    return q, s


@triton.jit
def _amax_bits_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # amax(|x|) as the int32 bit pattern of a float32 >= 0 (bit order = value order; NaN sorts above Inf).
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    base = pid.to(tl.int64) * (BLOCK * ITERS)
    for i in range(ITERS):
        o = base + i * BLOCK + offs
        x = tl.load(x_ptr + o, mask=o < n, other=0.0).to(tl.float32)
        acc = tl.maximum(acc, tl.abs(x).to(tl.int32, bitcast=True))
    tl.atomic_max(out_ptr, tl.max(acc, axis=0))


@triton.jit
def _e2m1_mag(v):
    """E2M1 magnitude code (0..7) of float32 values in [-6, 6]: midpoint comparisons, ties to even mantissa."""
    a = tl.abs(v)
    return (
        (a > 0.25).to(tl.uint8) + (a >= 0.75).to(tl.uint8) + (a > 1.25).to(tl.uint8)
        + (a >= 1.75).to(tl.uint8) + (a > 2.5).to(tl.uint8) + (a >= 3.5).to(tl.uint8) + (a > 5.0).to(tl.uint8)
    )


@triton.jit
def _e2m1_value(mag, sign, b):
    """Signed E2M1 value of a magnitude code, times the block scale ``b`` (exact: <= 6 significant bits)."""
    val = tl.where(mag >= 4, tl.where(mag >= 6, tl.where(mag == 7, 6.0, 4.0), tl.where(mag == 5, 3.0, 2.0)),
                   tl.where(mag >= 2, tl.where(mag == 3, 1.5, 1.0), tl.where(mag == 1, 0.5, 0.0)))
    return tl.where(sign != 0, -val, val) * b


@triton.jit
def _nvfp4_block_kernel(
    x_ptr, amax_ptr, data_ptr, scale_ptr, deq_ptr, gs_ptr,
    M, K, stride_xm,
    BLOCK_K: tl.constexpr, ROWS: tl.constexpr, WRITE_DEQ: tl.constexpr, WRITE_PACKED: tl.constexpr,
    PAIR_LOADS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    NB: tl.constexpr = BLOCK_K // 16
    H: tl.constexpr = BLOCK_K // 2
    # Global scale from the amax bits, with formats.nvfp4's degenerate-scale rule.
    amax = tl.load(amax_ptr).to(tl.float32, bitcast=True)
    s = tl.math.div_rn(amax, 2688.0)
    inv_s = tl.math.div_rn(1.0, s)
    top = tl.math.div_rn(inv_s, 0.015625)
    usable = (amax > 0.0) & (tl.abs(top) < float("inf"))
    s = tl.where(usable, s, 1.0)
    inv_s = tl.where(usable, inv_s, 1.0)
    if pid_m == 0 and pid_k == 0:
        tl.store(gs_ptr, s)

    rows = pid_m * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    pcols = pid_k * H + tl.arange(0, H)  # byte j holds elements 2j (low nibble) and 2j + 1 (high nibble)
    pmask = rmask[:, None] & (pcols[None, :] < K // 2)
    row_ptr = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    if PAIR_LOADS:
        # Even and odd elements as two strided loads (same cache lines). Measured 3x slower; kept selectable.
        xe = tl.load(row_ptr + 2 * pcols[None, :], mask=pmask, other=0.0).to(tl.float32)
        xo = tl.load(row_ptr + 2 * pcols[None, :] + 1, mask=pmask, other=0.0).to(tl.float32)
    else:
        cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(row_ptr + cols[None, :], mask=rmask[:, None] & (cols[None, :] < K), other=0.0)
        xe, xo = tl.split(tl.reshape(x.to(tl.float32), [ROWS, H, 2]))
    xe = tl.reshape(xe, [ROWS, NB, 8])
    xo = tl.reshape(xo, [ROWS, NB, 8])
    amax_b = tl.maximum(tl.max(tl.abs(xe), axis=2), tl.max(tl.abs(xo), axis=2))
    b = tl.math.div_rn(tl.math.div_rn(amax_b, 6.0), tl.broadcast_to(s, [ROWS, NB]))
    b = tl.minimum(tl.maximum(b, 0.015625), 448.0)
    # Round to E4M3 (3 mantissa bits, nearest even); always a normal number here.
    u = b.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFFF + ((u >> 20) & 1)) & 0xFFF00000
    b = u.to(tl.float32, bitcast=True)
    sbyte = ((((u >> 23) - 120) << 3) | ((u >> 20) & 7)).to(tl.uint8)
    r = tl.math.div_rn(tl.broadcast_to(inv_s, [ROWS, NB]), b)
    ve = tl.minimum(tl.maximum(xe * r[:, :, None], -6.0), 6.0)
    vo = tl.minimum(tl.maximum(xo * r[:, :, None], -6.0), 6.0)
    mag_e = _e2m1_mag(ve)
    mag_o = _e2m1_mag(vo)
    sign_e = ((ve.to(tl.uint32, bitcast=True) >> 31) << 3).to(tl.uint8)
    sign_o = ((vo.to(tl.uint32, bitcast=True) >> 31) << 3).to(tl.uint8)
    if WRITE_PACKED:
        packed = tl.reshape((mag_e | sign_e) | ((mag_o | sign_o) << 4), [ROWS, H])
        tl.store(data_ptr + rows[:, None].to(tl.int64) * (K // 2) + pcols[None, :], packed, mask=pmask)
        scols = pid_k * NB + tl.arange(0, NB)
        smask = rmask[:, None] & (scols[None, :] < K // 16)
        tl.store(scale_ptr + rows[:, None].to(tl.int64) * (K // 16) + scols[None, :], sbyte, mask=smask)
    if WRITE_DEQ:
        OUT: tl.constexpr = deq_ptr.dtype.element_ty
        val_e = tl.reshape(_e2m1_value(mag_e, sign_e, b[:, :, None]), [ROWS, H]).to(OUT)
        val_o = tl.reshape(_e2m1_value(mag_o, sign_o, b[:, :, None]), [ROWS, H]).to(OUT)
        d_ptr = deq_ptr + rows[:, None].to(tl.int64) * K + 2 * pcols[None, :]
        tl.store(d_ptr, val_e, mask=pmask)
        tl.store(d_ptr + 1, val_o, mask=pmask)


#: Launch parameters of the NVFP4 quantizer: amax pass (elements per load, programs per SM, warps) and block
#: pass (K tile, elements per program, warps).
#: ``pair_loads`` (even and odd elements as two stride-2 loads) avoids the register split but measured 3x
#: slower on the H200 (0.33-0.36 vs 0.95-1.12 TB/s effective, benchmarks/results/kernels-h200.md), so the
#: default loads the tile once and splits it.
NVFP4_QUANT_PARAMS = {"amax_block": 4096, "amax_waves": 4, "amax_warps": 8, "block_k": 256, "elems": 4096,
                      "num_warps": 4, "pair_loads": False}


def _amax_bits(x: torch.Tensor, p=None) -> torch.Tensor:
    """amax(|x|) of a contiguous tensor as the int32 bits of a float32, shape [1], computed on device."""
    p = NVFP4_QUANT_PARAMS if p is None else p
    n = x.numel()
    out = torch.zeros((1,), dtype=torch.int32, device=x.device)
    if n:
        block = 16384 if interpreting() else p["amax_block"]
        iters = 1 if interpreting() else max(1, min(64, triton.cdiv(n, block * 132 * p["amax_waves"])))
        launcher(_amax_bits_kernel)[(triton.cdiv(n, block * iters),)](
            x, out, n, BLOCK=block, ITERS=iters, num_warps=1 if interpreting() else p["amax_warps"]
        )
    return out


def quantize_nvfp4(x: torch.Tensor, write_dequant: bool = False, write_packed: bool = True, params=None,
                   deq_dtype: torch.dtype = torch.bfloat16):
    """NVFP4 quantization of a 2-D float tensor ``x [M, K]`` (contiguous, ``K % 16 == 0``) over its last dim.

    Returns:
        ``(data uint8 [M, K//2], block_scales float8_e4m3fn [M, K//16], global_scale float32 0-d, deq, amax)``
        where ``deq`` is None, or with ``write_dequant`` the ``[M, K]`` tensor of ``E2M1[code] * b`` (the
        value without the global scale; exact in ``deq_dtype``, bf16 or fp16), and ``amax`` the float32 0-d amax(|x|) (NaN/Inf when x is not finite:
        the caller checks it). Without ``write_packed`` the codes and block scales are not stored (empty tensors are
        returned in their place). The first three are bit-identical to ``sixbit_tune.formats.nvfp4.quantize(x)``.
    """
    assert x.dim() == 2 and x.is_contiguous() and x.shape[1] % 16 == 0
    M, K = x.shape
    dev = x.device
    p = NVFP4_QUANT_PARAMS if params is None else {**NVFP4_QUANT_PARAMS, **params}
    amax_bits = _amax_bits(x, p)
    data = torch.empty((M, K // 2) if write_packed else (0, 0), dtype=torch.uint8, device=dev)
    scales = torch.empty((M, K // 16) if write_packed else (0, 0), dtype=torch.uint8, device=dev)
    gs = torch.ones((1,), dtype=torch.float32, device=dev)
    deq = torch.empty((M, K), dtype=deq_dtype, device=dev) if write_dequant else data
    if M:
        block_k = min(1024 if interpreting() else p["block_k"], triton.next_power_of_2(K))
        rows = 32 if interpreting() else max(1, p["elems"] // block_k)
        grid = (triton.cdiv(M, rows), triton.cdiv(K, block_k))
        launcher(_nvfp4_block_kernel)[grid](
            x, amax_bits, data, scales, deq, gs, M, K, x.stride(0),
            BLOCK_K=block_k, ROWS=rows, WRITE_DEQ=write_dequant, WRITE_PACKED=write_packed, PAIR_LOADS=p["pair_loads"],
            num_warps=1 if interpreting() else p["num_warps"],
        )
    amax = amax_bits.view(torch.float32).reshape(())
    return data, scales.view(torch.float8_e4m3fn), gs.reshape(()), (deq if write_dequant else None), amax
