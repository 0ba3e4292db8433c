"""Device-side quantization errors of one linear layer call: ``act_err`` (‖Q(x) − x‖₂ / ‖x‖₂) and ``out_err``
(‖y_quantized − x·Wᵀ‖₂ / ‖x·Wᵀ‖₂).

The arithmetic is :mod:`sixbit_tune.formats`' (the specification), without the per-call finiteness scan (it reads
a flag back to the host, and one host synchronisation per layer call would serialise the GPU): INT8 is
``formats.int8.quantize(..., check=False)``; NVFP4 is composed from ``formats.nvfp4``'s building blocks because the
GEMM needs the unpacked values ``E2M1 × block scale`` rather than packed codes. Here nothing
leaves the device; NaN/Inf inputs propagate into the statistics and the recorder checks them once per step.
``tests/profiling/test_quant.py`` pins these functions bit for bit to ``formats.fake_quant`` and to
``formats.quantized_linear_reference``.

Definitions, per batch row (dim 0 of the activation), for format ``f``:

* ``act_err = ‖Q_f(x) − x‖₂ / ‖x‖₂``
* ``out_err = ‖Q_f(x)·Q_f(W)ᵀ − x·Wᵀ‖₂ / ‖x·Wᵀ‖₂``

``Q_f(x)`` quantizes the whole activation tensor as the runtime would (NVFP4: one global scale over all rows;
INT8: one scale per token). ``x·Wᵀ`` is the layer's own output with its bias removed, in float32: exactly the
unquantized product for float32 models, the model-dtype product (float32 accumulation, rounded once to the model
dtype) for bf16/fp16 models. That rounding is a known, measured deviation from the exact product for bf16 models:
on CogVideoX-2B ``attn1.to_q`` (H200, benchmarks/results/profile-overhead-h200.md) the recorded NVFP4 out_err is
within 7e-5 (relative) of the exact-product value, INT8 out_err (about 0.009) 1.7e-2 above it. Removing it costs one
more float32-output GEMM per linear call. The quantized product is computed without any rounding beyond float32 accumulation:

* NVFP4: ``Q(x)·Q(W)ᵀ = (s_x·s_w) · (V_x·V_wᵀ)`` with ``V = E2M1 value × block scale``. Every ``V`` has at most 6
  significant bits (2 of E2M1 times 4 of a normal E4M3 scale), so on CUDA ``V`` is held exactly in bfloat16 and multiplied on tensor cores with float32
  output (``torch.mm(..., out_dtype=torch.float32)``); elsewhere in float32.
* INT8: exact integer accumulation (``torch._int_mm`` on CUDA, float64 elsewhere, as the reference), then
  ``acc.float() * (s_x[:, None] * s_w[None, :])``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sixbit_tune.formats import FORMATS, int8, nvfp4
from sixbit_tune.stats import safe_ratio

__all__ = [
    "QuantizedWeight",
    "int8_codes",
    "linear_errors",
    "linear_errors_impl",
    "nvfp4_gemm_path",
    "nvfp4_values",
    "output_errors",
    "quantize_activation",
    "quantize_weight",
]


def nvfp4_values(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4-quantize ``x`` over its last dim; return ``(V, s)`` with ``Q(x) = V * s`` (no finiteness check).

    ``V`` = E2M1 value × float32 block scale (float32, exact), ``s`` = the float32 per-tensor scale (0-d):
    ``formats.nvfp4.block_values(x, check=False)``, the specification's own steps.
    """
    return nvfp4.block_values(x, check=False)


def int8_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8-quantize ``x`` over its last dim: ``(q int8, scales float32 [...])``, without the finiteness scan
    (``formats.int8.quantize(x, check=False)``)."""
    return int8.quantize(x, axis=-1, check=False)


@dataclass
class QuantizedWeight:
    """One linear weight in every profiled format, quantized once per run.

    Attributes:
        formats: the formats held, in ``FORMATS`` order (the order ``linear_errors`` reports them).
        nvfp4_v: ``V_w`` ``[N, K]`` (bfloat16 on CUDA, exact; float32 elsewhere), or None.
        nvfp4_s: ``s_w`` (0-d float32), or None.
        int8_q: ``[N, K]`` int8, or None.
        int8_s: ``[N]`` float32 per-output-channel scales, or None.
        bias: the layer's bias (float32) or None; removed from the layer output to get ``x·Wᵀ``.
    """

    formats: tuple[str, ...]
    nvfp4_v: torch.Tensor | None = None
    nvfp4_s: torch.Tensor | None = None
    int8_q: torch.Tensor | None = None
    int8_s: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def quantize_weight(linear: torch.nn.Linear, formats: tuple[str, ...] = FORMATS) -> QuantizedWeight:
    """Quantize ``linear.weight`` in every format of ``formats`` (checked for finiteness once, here).

    Raises:
        ValueError: an unknown format, or a K that is not a multiple of 16 for NVFP4.
        NonFiniteError: the weight contains NaN or Inf.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown format(s) {unknown}; expected a subset of {FORMATS}")
    w = linear.weight.detach()
    from sixbit_tune.formats import check_finite

    check_finite(w, "weight")
    qw = QuantizedWeight(formats=tuple(f for f in FORMATS if f in formats))
    if linear.bias is not None:
        qw.bias = linear.bias.detach().float()
    if "nvfp4" in formats:
        v, s = nvfp4_values(w)
        qw.nvfp4_v = v.to(torch.bfloat16) if nvfp4_gemm_path(w.device) != "fp32" else v
        qw.nvfp4_s = s
    if "int8" in formats:
        qw.int8_q, qw.int8_s = int8_codes(w)
    return qw


_MM_OUT_DTYPE: bool | None = None


def _mm_out_dtype_supported() -> bool:
    """Whether ``torch.mm(bf16, bf16, out_dtype=torch.float32)`` runs here (CUDA, torch >= 2.9)."""
    global _MM_OUT_DTYPE
    if _MM_OUT_DTYPE is None:
        try:
            a = torch.ones(16, 16, dtype=torch.bfloat16, device="cuda")
            _MM_OUT_DTYPE = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError):
            _MM_OUT_DTYPE = False
    return _MM_OUT_DTYPE


def nvfp4_gemm_path(device: torch.device) -> str:
    """How the NVFP4 product runs on ``device``: ``"bf16-tensorcore-fp32-out"`` or ``"fp32"`` (both exact up to
    float32 accumulation)."""
    if device.type == "cuda" and _mm_out_dtype_supported():
        return "bf16-tensorcore-fp32-out"
    return "fp32"


def _mm_f32(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``a @ b_t`` with float32 output; bf16 inputs use tensor cores with float32 accumulation and output."""
    if a.dtype == torch.float32:
        return a @ b_t
    return torch.mm(a, b_t, out_dtype=torch.float32)


def _int_mm_exact(qx: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """Exact ``qx @ qw.T`` of int8 matrices as float32 (the int32/float64 accumulator's ``.float()``)."""
    M, K = qx.shape
    N = qw.shape[0]
    if qx.is_cuda and M > 16 and K % 8 == 0 and N % 8 == 0:
        return torch._int_mm(qx, qw.t()).float()
    return (qx.double() @ qw.double().t()).float()


def quantize_activation(
    x: torch.Tensor, nvfp4_dtype: torch.dtype | None, with_int8: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Quantize one linear input (the whole tensor, as the runtime would) and measure ``act_err`` per row.

    Linears that read the same input tensor (attention q/k/v) share this result.

    Args:
        x: ``[B, ..., K]``.
        nvfp4_dtype: dtype of the NVFP4 GEMM operand ``V_x`` (the weight's ``nvfp4_v.dtype``), or None for no NVFP4.
        with_int8: also quantize to INT8.

    Returns:
        ``(act [F, B], V_x [M, K] | None, s_x 0-d | None, q_x int8 [M, K] | None, s_x [M] | None)`` with
        ``M`` = tokens over all rows and formats in ``FORMATS`` order.
    """
    B = x.shape[0]
    x2 = x.detach().reshape(-1, x.shape[-1])
    xf = x2.float()
    x_n = torch.linalg.vector_norm(xf.reshape(B, -1), dim=1)
    acts = []
    v = s = q = sx = None
    if nvfp4_dtype is not None:
        v, s = nvfp4_values(x2)
        acts.append(safe_ratio(torch.linalg.vector_norm((v * s - xf).reshape(B, -1), dim=1), x_n))
        v = v.to(nvfp4_dtype)
    if with_int8:
        q, sx = int8_codes(x2)
        acts.append(safe_ratio(torch.linalg.vector_norm((q.float() * sx.unsqueeze(-1) - xf).reshape(B, -1), dim=1), x_n))
    return torch.stack(acts), v, s, q, sx


def output_errors(
    y: torch.Tensor,
    bias: torch.Tensor | None,
    xv: torch.Tensor | None,
    xs: torch.Tensor | None,
    wv: torch.Tensor | None,
    ws: torch.Tensor | None,
    xq: torch.Tensor | None,
    xqs: torch.Tensor | None,
    wq: torch.Tensor | None,
    wqs: torch.Tensor | None,
) -> torch.Tensor:
    """``out_err`` per row from the quantized operands: one extra GEMM per format, then a row reduction.

    Args:
        y: the layer output ``[B, ..., N]`` (bias included; removed here).
        bias: float32 ``[N]`` or None.
        xv, xs, wv, ws: NVFP4 ``V_x``, ``s_x``, ``V_w``, ``s_w`` (all None without NVFP4).
        xq, xqs, wq, wqs: INT8 codes and scales of x and W (all None without INT8).

    Returns:
        ``[F, B]`` float32, formats in ``FORMATS`` order.
    """
    B = y.shape[0]
    ref = y.detach().reshape(-1, y.shape[-1]).float()
    if bias is not None:
        ref = ref - bias
    ref_n = torch.linalg.vector_norm(ref.reshape(B, -1), dim=1)
    errs = []
    if xv is not None:
        yq = _mm_f32(xv, wv.t()) * (xs * ws)
        errs.append(safe_ratio(torch.linalg.vector_norm((yq - ref).reshape(B, -1), dim=1), ref_n))
    if xq is not None:
        yq = _int_mm_exact(xq, wq) * (xqs.unsqueeze(-1) * wqs.unsqueeze(0))
        errs.append(safe_ratio(torch.linalg.vector_norm((yq - ref).reshape(B, -1), dim=1), ref_n))
    return torch.stack(errs)


def linear_errors_impl(x, y, bias, nvfp4_v, nvfp4_s, int8_q, int8_s) -> torch.Tensor:
    """:func:`linear_errors` on plain tensors: :func:`quantize_activation` then :func:`output_errors`."""
    act, xv, xs, xq, xqs = quantize_activation(x, None if nvfp4_v is None else nvfp4_v.dtype, int8_q is not None)
    out = output_errors(y, bias, xv, xs, nvfp4_v, nvfp4_s, xq, xqs, int8_q, int8_s)
    return torch.stack((act, out), dim=1)


def linear_errors(x: torch.Tensor, y: torch.Tensor, qw: QuantizedWeight, impl=linear_errors_impl) -> torch.Tensor:
    """``act_err`` and ``out_err`` of one linear call, per batch row, for every format of ``qw``.

    Args:
        x: the layer input ``[B, ..., K]`` (dim 0 = batch rows).
        y: the layer output ``[B, ..., N]`` (bias included; it is removed here).
        qw: the layer's quantized weight.
        impl: :func:`linear_errors_impl` or a compiled version of it.

    Returns:
        float32 ``[len(qw.formats), 2, B]``: ``[:, 0]`` act_err, ``[:, 1]`` out_err, formats in ``qw.formats``
        order.
    """
    return impl(x, y, qw.bias, qw.nvfp4_v, qw.nvfp4_s, qw.int8_q, qw.int8_s)
