"""Native block-scaled FP4 GEMM for Blackwell (compute capability >= 10) through ``torch._scaled_mm``.

UNTESTED ON HARDWARE: the project's GPU is an H200 (sm_90, no FP4 tensor cores), so this code has never run.
It is kept small and isolated, and :mod:`.dispatch` only uses it after :func:`self_check` has compared it with
the reference numerics on the device (a failure or an exception there is logged once and the emulated Triton
path is used instead).

Layout assumptions (from PyTorch's own ``_scaled_mm`` FP4 tests, to be confirmed on Blackwell): operands
``float4_e2m1fn_x2 [M, K//2]`` and ``[N, K//2]`` (the second passed transposed), block scales ``float8_e4m3fn``
in cuBLAS's swizzled 128x4 tile layout, no per-tensor scale (it is applied to the output here).
"""

from __future__ import annotations

import torch


def available() -> bool:
    """Whether this torch build exposes the FP4 dtype and ``_scaled_mm`` (says nothing about the GPU)."""
    return hasattr(torch, "float4_e2m1fn_x2") and hasattr(torch, "_scaled_mm")


def _to_blocked(scales: torch.Tensor) -> torch.Tensor:
    """[rows, cols] e4m3 block scales -> cuBLAS's swizzled layout (128-row x 4-column tiles, zero padded)."""
    rows, cols = scales.shape
    rb, cb = -(-rows // 128), -(-cols // 4)
    padded = torch.zeros((rb * 128, cb * 4), dtype=scales.dtype, device=scales.device)
    padded[:rows, :cols] = scales
    blocks = padded.view(rb, 128, cb, 4).permute(0, 2, 1, 3)
    return blocks.reshape(-1, 4, 32, 4).transpose(1, 2).reshape(-1, 32, 16).flatten()


def nvfp4_gemm_native(a, w, bias, out_dtype: torch.dtype) -> torch.Tensor:
    """``A_deq @ W_deq.T (+ bias)`` for two :class:`sixbit_tune.formats.nvfp4.NVFP4Tensor` of ``[M, K]`` and
    ``[N, K]`` on a Blackwell GPU."""
    fp4 = torch.float4_e2m1fn_x2
    out = torch._scaled_mm(
        a.data.view(fp4),
        w.data.view(fp4).t(),
        _to_blocked(a.block_scales.view(torch.uint8)).view(torch.float8_e4m3fn),
        _to_blocked(w.block_scales.view(torch.uint8)).view(torch.float8_e4m3fn),
        out_dtype=torch.float32,
    )
    out = out * (a.global_scale * w.global_scale)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def self_check(device: torch.device) -> str | None:
    """Run one small native GEMM against the reference; None when it agrees, else the reason."""
    from sixbit_tune.formats import nvfp4

    try:
        g = torch.Generator(device="cpu").manual_seed(1234)
        x = torch.randn(256, 256, generator=g).to(device)
        wt = torch.randn(128, 256, generator=g).to(device)
        a, w = nvfp4.quantize(x), nvfp4.quantize(wt)
        ref = a.dequantize() @ w.dequantize().T
        got = nvfp4_gemm_native(a, w, None, torch.float32)
        err = float((got - ref).norm() / ref.norm())
        if not err < 1e-4:
            return f"native NVFP4 GEMM disagrees with the reference (relative L2 error {err:.3g})"
        return None
    except Exception as exc:  # the API or layout differs from what this code assumes
        return f"native NVFP4 GEMM failed: {type(exc).__name__}: {exc}"
