"""FP8 E4M3 W8A8 linear through ``torch._scaled_mm`` with row-wise scales (one per token, one per output channel).

The activation quantizer is :func:`sixbit_tune.formats.fp8.quantize` itself, plain PyTorch operations (no
separate kernel, so ``torch.compile`` can fuse it with whatever produces the activation); the GEMM multiplies the
E4M3 codes with float32 accumulation and applies ``scale_a * scale_b`` (and the bias) in its epilogue, as the
reference :func:`sixbit_tune.formats.quantized_linear_reference` does with an exact accumulation.

``torch._scaled_mm`` needs K and N to be multiples of 16 on the GPU; other shapes are padded with zero codes
(zero products; padded output channels are cut off). Output dtypes: a bfloat16 output (with a bfloat16 bias, or
none) comes from one ``_scaled_mm`` call that rounds once. Other outputs are computed as float32 and rounded after
the bias is added, where ``_scaled_mm`` can write float32 with row-wise scales (CPU; sm_90, where PyTorch uses
cuBLAS); elsewhere (sm_89 and sm_100+, PyTorch's CUTLASS row-wise kernel writes bf16/fp16 only) through a
bfloat16 intermediate, rounded twice.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from sixbit_tune.formats import fp8

#: The default ``use_fast_accum`` of ``torch._scaled_mm``: False keeps the float32 accumulation exact to float32
#: rounding. Hopper's fast FP8 accumulation keeps fewer bits and runs faster; torchao's dynamic FP8 uses it by
#: default. :func:`set_fast_accum` (or the environment variable ``SIXBIT_FP8_FAST_ACCUM=1``) changes it for the
#: process; ``torch.compile`` reads it when it traces a call, so set it before compiling.
FAST_ACCUM = os.environ.get("SIXBIT_FP8_FAST_ACCUM", "0").strip().lower() in ("1", "true", "yes", "on")


def set_fast_accum(enabled: bool) -> None:
    """Whether the FP8 GEMM uses ``torch._scaled_mm``'s fast accumulation from now on (see :data:`FAST_ACCUM`)."""
    global FAST_ACCUM
    if not isinstance(enabled, bool):
        raise TypeError(f"set_fast_accum takes True or False, got {enabled!r}")
    FAST_ACCUM = enabled


def fast_accum() -> bool:
    """Whether the FP8 GEMM uses fast accumulation (:data:`FAST_ACCUM`)."""
    return FAST_ACCUM


@torch.compiler.assume_constant_result
def unusable_reason(device: torch.device) -> str | None:
    """Why ``torch._scaled_mm`` cannot run FP8 row-wise on ``device``, or None where it can (CUDA compute
    capability >= 8.9, or the CPU)."""
    if not hasattr(torch, "_scaled_mm"):
        return "this torch build has no _scaled_mm"
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"no FP8 _scaled_mm path on {device.type}"
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) < (8, 9):
        return f"compute capability {major}.{minor} is below 8.9 (no FP8 tensor cores)"
    return None


@torch.compiler.assume_constant_result
def _fp32_output_ok(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) == (9, 0)


def _pad_codes(q: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return F.pad(q.view(torch.uint8), (0, cols, 0, rows)).view(fp8.DTYPE)


def fp8_scaled_mm(
    xq: torch.Tensor, wq: torch.Tensor, xs: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``(xq @ wq.T) * (xs[:, None] * ws[None, :]) + bias`` in ``out_dtype``.

    Args:
        xq: E4M3 codes ``[M, K]``; wq: E4M3 codes ``[N, K]``; xs: float32 ``[M]``; ws: float32 ``[N]``.
        bias: ``[N]`` or None. out_dtype: bfloat16, float16 or float32.
    """
    M, K = xq.shape
    N = wq.shape[0]
    if M == 0 or N == 0 or K == 0:
        y = xq.new_zeros((M, N), dtype=torch.float32)
        return (y if bias is None else y + bias.float()).to(out_dtype)
    pk, pn = -K % 16, -N % 16
    xq = _pad_codes(xq, 0, pk) if pk else xq.contiguous()
    wq = _pad_codes(wq, pn, pk) if pk or pn else wq.contiguous()
    if pn:
        ws = F.pad(ws, (0, pn))
        bias = None if bias is None else F.pad(bias, (0, pn))
    sa = xs.reshape(M, 1).float().contiguous()
    sb = ws.reshape(1, N + pn).float().contiguous()
    if out_dtype == torch.bfloat16 and (bias is None or bias.dtype == torch.bfloat16):
        y = torch._scaled_mm(xq, wq.t(), scale_a=sa, scale_b=sb, bias=bias, out_dtype=torch.bfloat16,
                             use_fast_accum=fast_accum())
    else:
        mm_dtype = torch.float32 if _fp32_output_ok(xq.device) else torch.bfloat16
        y = torch._scaled_mm(xq, wq.t(), scale_a=sa, scale_b=sb, out_dtype=mm_dtype, use_fast_accum=fast_accum())
        y = y.float()
        if bias is not None:
            y = y + bias.float()
        y = y.to(out_dtype)
    return y[:, :N] if pn else y


def fp8_linear_scaled_mm(
    x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """Quantize ``x [M, K]`` per token (no NaN/Inf scan: the caller decides) and multiply by the FP8 weight."""
    xq, xs = fp8.quantize(x, check=False)
    return fp8_scaled_mm(xq, wq, xs, ws, bias, out_dtype)
