"""W8A8 INT8 GEMM in Triton: ``out = (x_q @ w_q.T) * (sx[:, None] * sw[None, :]) + bias`` in one kernel.

int8 x int8 products accumulate exactly in int32 on the tensor cores; the epilogue converts the accumulator to
float32, multiplies by the product of the per-token and per-output-channel scales (that order, as in
``sixbit_tune.formats.quantized_linear_reference``), adds the bias in float32 and rounds once to the output dtype.

Two kernels with the same numerics:

* ``_int8_gemm_tma_kernel`` (the default on GPU when ``K % 16 == 0``): persistent grid, grouped tile order,
  operand tiles through tensor descriptors (TMA on Hopper), autotuned over tiles and three epilogue/loop forms
  (pointer-store epilogue; TMA store in two half-width subtiles; the same with a flattened persistent loop).
  H200: 874-1,246 TOPS on the DiT shapes, 1.13-1.83x cuBLAS bf16 (benchmarks/results/kernels-h200.md).
* ``_int8_gemm_kernel``: plain pointer loads with masks, any ``K``.

The first call for a new (token-count bucket, N, K) autotunes (about 1 s); the first call in a process with an
empty Triton cache also compiles every configuration (about a minute).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_support import ensure_tma_allocator, interpreting, launcher, num_sms

_TILES = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    (128, 256, 128, 8, 3),
    (128, 256, 128, 8, 4),
    (256, 128, 128, 8, 3),
    (128, 128, 128, 8, 4),
]
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=st)
    for m, n, k, w, st in [*_TILES, (128, 128, 128, 4, 4)]
]
_INTERP_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=1)]


def _configs():
    return _INTERP_CONFIGS if interpreting() else _GPU_CONFIGS


def _tma_configs():
    """The TMA kernel's autotuning space: tiles x epilogue/loop forms (EPI_TMA, EPI_SUBTILE, FLATTEN).

    Measured on the H200 (benchmarks/results/kernels-h200.*): the TMA-store epilogue with two half-width
    subtiles was best on the large feed-forward shapes, the flattened persistent loop on K = N = 1,920.
    """
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "EPI_TMA": e,
                               "EPI_SUBTILE": sub, "FLATTEN": fl}, num_warps=1)
                for e, sub, fl in [(False, False, False)]]
    forms = [(False, False, False), (True, True, False), (True, True, True)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, "EPI_TMA": e, "EPI_SUBTILE": sub,
                       "FLATTEN": fl}, num_warps=w, num_stages=st)
        for m, n, k, w, st in _TILES
        for e, sub, fl in forms
    ]


def autotune_bench(kernel_call, quantiles):
    """Shorter autotuning benchmark than Triton's default (25 ms warm-up, 100 ms): DiT GEMMs run 1-15 ms."""
    return triton.testing.do_bench(kernel_call, warmup=10, rep=40, quantiles=quantiles)


def _m_bucket(M: int) -> int:
    # Autotune key for the token count: powers of two, so a new sequence length does not re-tune.
    return min(triton.next_power_of_2(max(M, 1)), 1 << 17)


@triton.jit
def round_to(out, OUT_DTYPE: tl.constexpr):
    """float32 ``out`` rounded to nearest even in ``OUT_DTYPE``.

    bf16 is rounded with integer arithmetic on the float32 bits: Triton's CPU interpreter (3.9) truncates
    float32 -> bf16 casts, so the cast itself would be wrong there; on the GPU both agree (finite values).
    """
    if OUT_DTYPE == tl.bfloat16:
        u = out.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return u.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return out.to(OUT_DTYPE)


@triton.jit
def store_rounded(ptrs, out, mask, OUT_DTYPE: tl.constexpr):
    """Store float32 ``out`` in ``OUT_DTYPE``, rounded to nearest even (see :func:`round_to`)."""
    tl.store(ptrs, round_to(out, OUT_DTYPE), mask=mask)


@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _scaled(acc, pid_m, pid_n, M, N, sa_ptr, sb_ptr, bias_ptr,
            HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
    sb = tl.load(sb_ptr + rn, mask=rn < N, other=0.0)
    out = acc.to(tl.float32) * (sa[:, None] * sb[None, :])
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        out = out + bias[None, :]
    return out


@triton.jit
def _epilogue(acc, pid_m, pid_n, M, N, c_ptr, stride_cm, sa_ptr, sb_ptr, bias_ptr,
              HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    out = _scaled(acc, pid_m, pid_n, M, N, sa_ptr, sb_ptr, bias_ptr, HAS_BIAS, BLOCK_M, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
    store_rounded(c_ptrs, out, (rm < M)[:, None] & (rn < N)[None, :], c_ptr.dtype.element_ty)


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "HAS_BIAS"], do_bench=autotune_bench)
@triton.jit
def _int8_gemm_kernel(
    a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, K, M_BUCKET,
    stride_am, stride_bn, stride_cm,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _tile_coords(pid, num_pid_m, num_pid_n, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :]
    b_ptrs = b_ptr + rn[None, :].to(tl.int64) * stride_bn + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        kmask = rk < K - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=kmask[None, :], other=0)
        b = tl.load(b_ptrs, mask=kmask[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    _epilogue(acc, pid_m, pid_n, M, N, c_ptr, stride_cm, sa_ptr, sb_ptr, bias_ptr, HAS_BIAS, BLOCK_M, BLOCK_N)


@triton.jit
def _int8_gemm_tma_body(
    a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, K, M_BUCKET, stride_cm,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, EPI_TMA: tl.constexpr, EPI_SUBTILE: tl.constexpr,
    FLATTEN: tl.constexpr,
):
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    OUT_DTYPE: tl.constexpr = c_ptr.dtype.element_ty
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    if EPI_TMA:
        if EPI_SUBTILE:
            c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1],
                                               block_shape=[BLOCK_M, BLOCK_N // 2])
        else:
            c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1],
                                               block_shape=[BLOCK_M, BLOCK_N])
    for tile_id in tl.range(start, num_tiles, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for ki in range(k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            b = b_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        if EPI_TMA:
            out = _scaled(acc, pid_m, pid_n, M, N, sa_ptr, sb_ptr, bias_ptr, HAS_BIAS, BLOCK_M, BLOCK_N)
            if EPI_SUBTILE:
                o = tl.permute(tl.reshape(out, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
                o0, o1 = tl.split(o)
                c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], round_to(o0, OUT_DTYPE))
                c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N + BLOCK_N // 2], round_to(o1, OUT_DTYPE))
            else:
                c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], round_to(out, OUT_DTYPE))
        else:
            _epilogue(acc, pid_m, pid_n, M, N, c_ptr, stride_cm, sa_ptr, sb_ptr, bias_ptr, HAS_BIAS,
                      BLOCK_M, BLOCK_N)


#: The TMA kernel autotuned over tiles and epilogue/loop forms (the default), and fixed forms for tests and
#: benchmarks: (EPI_TMA, EPI_SUBTILE, FLATTEN).
_int8_gemm_tma_kernel = triton.autotune(
    configs=_tma_configs(), key=["M_BUCKET", "N", "K", "HAS_BIAS"], do_bench=autotune_bench
)(_int8_gemm_tma_body)
_int8_gemm_tma_fixed = triton.autotune(
    configs=_configs(), key=["M_BUCKET", "N", "K", "HAS_BIAS", "EPI_TMA", "EPI_SUBTILE", "FLATTEN"],
    do_bench=autotune_bench,
)(_int8_gemm_tma_body)
TMA_VARIANTS = {
    "tma": (False, False, False),
    "tma-store": (True, False, False),
    "tma-store-sub": (True, True, False),
    "tma-flat": (True, True, True),
}
DEFAULT_TMA_VARIANT = "tma-auto"


def int8_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    sa: torch.Tensor,
    sb: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    variant: str = "auto",
) -> torch.Tensor:
    """``(a @ b.T) * (sa[:, None] * sb[None, :]) + bias`` with int32 accumulation.

    Args:
        a: int8 ``[M, K]`` (per-token codes), last dim contiguous.
        b: int8 ``[N, K]`` (per-output-channel weight codes), last dim contiguous.
        sa: float32 ``[M]``; sb: float32 ``[N]``; bias: ``[N]`` (any float dtype) or None.
        out_dtype: bfloat16, float16 or float32.
        variant: "tma-auto" (persistent grid, operand tiles through tensor descriptors, autotuned over tiles and
            epilogue forms; needs contiguous operands, ``K % 16 == 0`` and output rows of a multiple of 16 bytes),
            one of :data:`TMA_VARIANTS` (fixed forms), "pointer", or "auto" (tma-auto where it applies, else
            "tma" or "pointer").
    """
    M, K = a.shape
    N = b.shape[0]
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_() if bias is None else c.copy_(bias.to(out_dtype).expand(M, N))
    has_bias = bias is not None
    bias_arg = bias if has_bias else sb
    tma_ok = a.is_contiguous() and b.is_contiguous() and K % 16 == 0
    if variant == "auto":
        variant = DEFAULT_TMA_VARIANT if tma_ok else "pointer"
        if (N * c.element_size()) % 16 != 0 and variant != "pointer":
            variant = "tma"  # a TMA store needs 16-byte output rows
    if variant == "tma-auto" or variant in TMA_VARIANTS:
        assert tma_ok, "the TMA INT8 GEMM needs contiguous operands and K % 16 == 0"
        ensure_tma_allocator()
        sms = num_sms(a.device)

        def grid(meta):
            return (min(sms, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)

        if variant == "tma-auto":
            launcher(_int8_gemm_tma_kernel)[grid](
                a, b, c, sa, sb, bias_arg, M, N, K, _m_bucket(M), c.stride(0), HAS_BIAS=has_bias, NUM_SMS=sms
            )
        else:
            epi_tma, epi_sub, flatten = TMA_VARIANTS[variant]
            launcher(_int8_gemm_tma_fixed)[grid](
                a, b, c, sa, sb, bias_arg, M, N, K, _m_bucket(M), c.stride(0), HAS_BIAS=has_bias, NUM_SMS=sms,
                EPI_TMA=epi_tma, EPI_SUBTILE=epi_sub, FLATTEN=flatten,
            )
    else:
        assert variant == "pointer", f"unknown INT8 GEMM variant {variant!r}"
        assert a.stride(1) == 1 and b.stride(1) == 1

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        launcher(_int8_gemm_kernel)[grid](
            a, b, c, sa, sb, bias_arg, M, N, K, _m_bucket(M), a.stride(0), b.stride(0), c.stride(0),
            HAS_BIAS=has_bias,
        )
    return c
