"""Device-side quantization errors of one linear layer call: ``act_err`` (‖Q(x) − x‖₂ / ‖x‖₂) and ``out_err``
(‖y_route − x·Wᵀ‖₂ / ‖x·Wᵀ‖₂), per route of :data:`sixbit_tune.routes.PROFILE_ROUTES`.

The arithmetic is :mod:`sixbit_tune.formats`' (the specification), without the per-call finiteness scan (it reads
a flag back to the host, and one host synchronisation per layer call would serialise the GPU): INT8 is
``formats.int8.quantize(..., check=False)``, FP8 ``formats.fp8.quantize(..., check=False)``; NVFP4 is
``formats.nvfp4.block_values`` because the GEMM needs the unpacked values ``E2M1 × block scale`` rather than packed
codes. Here nothing leaves the device; NaN/Inf inputs propagate into the statistics and the recorder checks them once
per step. ``tests/profiling/test_quant.py`` pins these functions to ``formats.fake_quant`` and
``formats.quantized_linear_reference``.

Routes (stored weight / activation; a format name ``f`` is the route ``f/f``):

* ``nvfp4`` (W4A4), ``int8`` (W8A8 INT8), ``fp8`` (W8A8 FP8 E4M3): the weight and the activation in that format;
* ``nvfp4/int8`` (W4A8) and ``nvfp4/fp8``: the GEMM's weight operand is derived from the NVFP4 weight as the runtime
  derives it: the dequantized NVFP4 values (``formats.nvfp4.block_values``' ``V·s``, which is
  ``NVFP4Tensor.dequantize(torch.float32)``) quantized with the INT8 (FP8) weight rule, one scale per output channel;
  the activation is the INT8 (FP8) one of the ``int8`` (``fp8``) route. Its reference is
  ``formats.quantized_linear_reference(x, nvfp4_dequantized_weight, None, "int8")`` (``"fp8"``).

Weights, and the derived operands, are quantized once per run (:func:`quantize_weight`); each call quantizes the
activation once per activation format, shared by every route that reads it, and runs one GEMM per activation format
(the weight operands of the routes sharing an activation are stacked along N).

Definitions, per batch row (dim 0 of the activation), for route ``r`` with activation format ``a``:

* ``act_err = ‖Q_a(x) − x‖₂ / ‖x‖₂`` (the same for every route of one activation format)
* ``out_err = ‖Q_a(x)·W_rᵀ − x·Wᵀ‖₂ / ‖x·Wᵀ‖₂`` with ``W_r`` the route's quantized weight operand

``Q_a(x)`` quantizes the whole activation tensor as the runtime would (NVFP4: one global scale over all rows;
INT8 and FP8: one scale per token). ``x·Wᵀ`` is the layer's own output with its bias removed, in float32: exactly the
unquantized product for float32 models, the model-dtype product (float32 accumulation, rounded once to the model
dtype) for bf16/fp16 models. That rounding is a known, measured deviation from the exact product for bf16 models:
on CogVideoX-2B ``attn1.to_q`` (H200, benchmarks/results/profile-overhead-h200.md) the recorded NVFP4 out_err is
within 7e-5 (relative) of the exact-product value, INT8 out_err (about 0.009) 1.7e-2 above it. Removing it costs one
more float32-output GEMM per linear call. The quantized products:

* NVFP4: ``Q(x)·Q(W)ᵀ = (s_x·s_w) · (V_x·V_wᵀ)`` with ``V = E2M1 value × block scale``. Every ``V`` has at most 6
  significant bits (2 of E2M1 times 4 of a normal E4M3 scale), so on CUDA ``V`` is held exactly in bfloat16 and
  multiplied on tensor cores with float32 output (``torch.mm(..., out_dtype=torch.float32)``); elsewhere in float32.
* INT8 (both INT8 routes): exact integer accumulation (``torch._int_mm`` on CUDA; elsewhere float32 products summed
  over chunks of at most :data:`INT8_F32_EXACT_K` along K, where every partial sum is an integer below 2²⁴ and so
  exact, the chunks added in float64), then ``acc.float() * (s_x[:, None] * s_w[None, :])``: bit for bit the
  reference, which accumulates in float64.
* FP8 (both FP8 routes): on the CPU the E4M3 values are held as (exact) float32 and multiplied with
  ``formats.fp8.exact_matmul`` (exact accumulation, rounded once to float32), then
  ``acc * (s_x[:, None] * s_w[None, :])``: bit for bit the reference. On CUDA the weight operands stay
  ``float8_e4m3fn`` codes (one byte per element) and both operands are converted to (exact) bfloat16 at each call
  and multiplied on tensor cores with float32 output, as NVFP4 is: every product is exact (4 significant bits
  each), the sum is accumulated in float32 instead of exactly (a relative deviation of order K·2⁻²⁴ of the
  accumulator, far below the errors measured).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sixbit_tune.formats import fp8, int8, nvfp4
from sixbit_tune.routes import PROFILE_DEFAULT_ROUTES, PROFILE_ROUTES, profile_route
from sixbit_tune.stats import safe_ratio

__all__ = [
    "ACT_FORMATS",
    "QuantizedWeight",
    "fp8_codes",
    "int8_codes",
    "linear_errors",
    "linear_errors_impl",
    "nvfp4_gemm_path",
    "nvfp4_values",
    "output_errors",
    "quantize_activation",
    "quantize_weight",
    "route_outputs",
    "routes_for",
]

#: Activation formats, in the order :func:`quantize_activation` reports their ``act_err``.
ACT_FORMATS = ("nvfp4", "int8", "fp8")


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


def fp8_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8-E4M3-quantize ``x`` over its last dim: ``(q float8_e4m3fn, scales float32 [...])``, without the
    finiteness scan (``formats.fp8.quantize(x, check=False)``)."""
    return fp8.quantize(x, axis=-1, check=False)


def routes_for(names, in_features: int) -> tuple[str, ...]:
    """The routes of ``names`` (:data:`PROFILE_ROUTES` names) that a linear with ``in_features`` inputs can run, in
    :data:`PROFILE_ROUTES` order: the routes over an NVFP4 weight need ``in_features % 16 == 0``.

    Raises:
        ValueError: a name not in :data:`PROFILE_ROUTES`.
    """
    weights = {n: profile_route(n).weight for n in names}
    return tuple(n for n in PROFILE_ROUTES if n in weights
                 and (in_features % nvfp4.BLOCK_SIZE == 0 or weights[n] != "nvfp4"))


@dataclass
class QuantizedWeight:
    """One linear weight's operands for every profiled route, quantized once per run.

    The routes that share an activation format share one GEMM: their weight operands are stacked along N, in
    ``formats`` order.

    Attributes:
        formats: the routes held (:data:`PROFILE_ROUTES` names, in that order: the order ``linear_errors`` reports
            them).
        act_index: per route, the index of its activation format's ``act_err`` among the activation formats held
            (``quantize_activation``'s rows).
        nvfp4_v: ``V_w`` ``[N, K]`` (bfloat16 on CUDA, exact; float32 elsewhere), or None.
        nvfp4_s: ``s_w`` (0-d float32), or None.
        int8_q: ``[R·N, K]`` int8: the INT8 weight operands of the routes with INT8 activations (``int8``, then
            ``nvfp4/int8``), or None.
        int8_s: ``[R·N]`` float32 per-output-channel scales, or None.
        fp8_q: ``[R·N, K]`` FP8 weight operands of the routes with FP8 activations (``fp8``, then ``nvfp4/fp8``):
            ``float8_e4m3fn`` codes on CUDA, their (exact) float32 values elsewhere; or None.
        fp8_s: ``[R·N]`` float32 scales, or None.
        bias: the layer's bias (float32) or None; removed from the layer output to get ``x·Wᵀ``.
    """

    formats: tuple[str, ...]
    act_index: tuple[int, ...] = ()
    nvfp4_v: torch.Tensor | None = None
    nvfp4_s: torch.Tensor | None = None
    int8_q: torch.Tensor | None = None
    int8_s: torch.Tensor | None = None
    fp8_q: torch.Tensor | None = None
    fp8_s: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def act_key(self) -> tuple[torch.dtype | None, bool, bool]:
        """``quantize_activation``'s arguments after ``x`` for this weight's routes."""
        return (None if self.nvfp4_v is None else self.nvfp4_v.dtype, self.int8_q is not None,
                self.fp8_q is not None)

    def operands(self) -> tuple:
        """``(nvfp4_v, nvfp4_s, int8_q, int8_s, fp8_q, fp8_s)``, as :func:`output_errors` takes them."""
        return self.nvfp4_v, self.nvfp4_s, self.int8_q, self.int8_s, self.fp8_q, self.fp8_s


def _cat(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not parts:
        return None, None
    if len(parts) == 1:
        return parts[0]
    return torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts])


def quantize_weight(linear: torch.nn.Linear, formats=PROFILE_DEFAULT_ROUTES) -> QuantizedWeight:
    """Quantize ``linear.weight`` for every route of ``formats`` (checked for finiteness once, here), deriving the
    INT8/FP8 operands of the NVFP4-stored routes from the dequantized NVFP4 values.

    Raises:
        ValueError: an unknown route, or a K that is not a multiple of 16 for a route over an NVFP4 weight.
        NonFiniteError: the weight contains NaN or Inf.
    """
    formats = tuple(formats)
    unknown = [f for f in formats if f not in PROFILE_ROUTES]
    if unknown:
        raise ValueError(f"unknown format(s) or route(s) {unknown}; expected a subset of {PROFILE_ROUTES}")
    w = linear.weight.detach()
    from sixbit_tune.formats import check_finite

    check_finite(w, "weight")
    names = tuple(f for f in PROFILE_ROUTES if f in formats)
    routes = [profile_route(f) for f in names]
    over_nvfp4 = any(r.weight == "nvfp4" for r in routes)
    if over_nvfp4:
        nvfp4.check_k(w.shape[-1])
    acts = [a for a in ACT_FORMATS if any(r.activation == a for r in routes)]
    qw = QuantizedWeight(formats=names, act_index=tuple(acts.index(r.activation) for r in routes))
    if linear.bias is not None:
        qw.bias = linear.bias.detach().float()
    v = s = wd = None
    if over_nvfp4:
        v, s = nvfp4_values(w)
        wd = v * s  # the dequantized NVFP4 weight: NVFP4Tensor.dequantize(torch.float32)
    if "nvfp4" in names:
        qw.nvfp4_v = v.to(torch.bfloat16) if nvfp4_gemm_path(w.device) != "fp32" else v
        qw.nvfp4_s = s
    int8_parts = [int8_codes(w if r.weight == "int8" else wd) for r in routes if r.activation == "int8"]
    qw.int8_q, qw.int8_s = _cat(int8_parts)
    fp8_parts = [fp8_codes(w if r.weight == "fp8" else wd) for r in routes if r.activation == "fp8"]
    qw.fp8_q, qw.fp8_s = _cat(fp8_parts)
    if qw.fp8_q is not None and w.device.type != "cuda":
        qw.fp8_q = qw.fp8_q.float()  # exact; converted once here, not at every call
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
    """How the NVFP4 (and, on CUDA, the FP8) product of out_err runs on ``device``: ``"bf16-tensorcore-fp32-out"``
    or ``"fp32"`` (both exact up to float32 accumulation)."""
    if device.type == "cuda" and _mm_out_dtype_supported():
        return "bf16-tensorcore-fp32-out"
    return "fp32"


def _mm_f32(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``a @ b_t`` with float32 output; bf16 inputs use tensor cores with float32 accumulation and output (float32
    inputs where that is not available)."""
    if a.dtype == torch.float32:
        return a @ b_t
    if a.is_cuda and _mm_out_dtype_supported():
        return torch.mm(a, b_t, out_dtype=torch.float32)
    return a.float() @ b_t.float()


#: Longest K over which a float32 sum of int8 products is exact: 1040 · 127² < 2²⁴.
INT8_F32_EXACT_K = 1040


def _int_mm_exact(qx: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """Exact ``qx @ qw.T`` of int8 matrices as float32 (the int32/float64 accumulator's ``.float()``)."""
    M, K = qx.shape
    N = qw.shape[0]
    if qx.is_cuda:
        if M > 16 and K % 8 == 0 and N % 8 == 0:
            return torch._int_mm(qx, qw.t()).float()
        return (qx.double() @ qw.double().t()).float()
    if K <= INT8_F32_EXACT_K:
        return qx.float() @ qw.float().t()
    acc = qx.new_zeros((M, N), dtype=torch.float64)
    for k in range(0, K, INT8_F32_EXACT_K):  # each chunk's float32 sum is exact; chunks add exactly in float64
        acc += (qx[:, k : k + INT8_F32_EXACT_K].float() @ qw[:, k : k + INT8_F32_EXACT_K].float().t()).double()
    return acc.float()


def _fp8_operand_dtype(device: torch.device) -> torch.dtype:
    """The dtype the FP8 GEMM of out_err multiplies E4M3 values in (exactly): bfloat16 on CUDA, float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _fp8_mm(vx: torch.Tensor, vw: torch.Tensor) -> torch.Tensor:
    """``vx @ vw.T`` of E4M3 values as float32: exact on the CPU (``formats.fp8.exact_matmul``); on CUDA on tensor
    cores with float32 accumulation (see the module docstring)."""
    if vx.is_cuda:
        return _mm_f32(vx, vw.to(vx.dtype).t())
    return fp8.exact_matmul(vx, vw)


def _row_err(a: torch.Tensor, ref: torch.Tensor, ref_n: torch.Tensor, B: int) -> torch.Tensor:
    return safe_ratio(torch.linalg.vector_norm((a - ref).reshape(B, -1), dim=1), ref_n)


def quantize_activation(
    x: torch.Tensor, nvfp4_dtype: torch.dtype | None, with_int8: bool, with_fp8: bool = False
) -> tuple:
    """Quantize one linear input (the whole tensor, as the runtime would) once per activation format and measure
    ``act_err`` per row.

    Linears that read the same input tensor (attention q/k/v) share this result.

    Args:
        x: ``[B, ..., K]``.
        nvfp4_dtype: dtype of the NVFP4 GEMM operand ``V_x`` (the weight's ``nvfp4_v.dtype``), or None for no NVFP4.
        with_int8: also quantize to INT8.
        with_fp8: also quantize to FP8 E4M3.

    Returns:
        ``(act [A, B], V_x [M, K] | None, s_x 0-d | None, q_x int8 [M, K] | None, s_x [M] | None,
        v_x [M, K] | None, s_x [M] | None)`` with ``M`` = tokens over all rows, ``v_x`` the values of the FP8 codes
        (bfloat16 on CUDA, float32 elsewhere; exact) and the ``A`` activation formats in :data:`ACT_FORMATS`
        order.
    """
    B = x.shape[0]
    x2 = x.detach().reshape(-1, x.shape[-1])
    xf = x2.float()
    x_n = torch.linalg.vector_norm(xf.reshape(B, -1), dim=1)
    acts = []
    v = s = q = sx = f = fs = None
    if nvfp4_dtype is not None:
        v, s = nvfp4_values(x2)
        acts.append(_row_err(v * s, xf, x_n, B))
        v = v.to(nvfp4_dtype)
    if with_int8:
        q, sx = int8_codes(x2)
        acts.append(_row_err(q.float() * sx.unsqueeze(-1), xf, x_n, B))
    if with_fp8:
        f, fs = fp8_codes(x2)
        f = f.float()  # exact; one conversion of the codes, shared by act_err and the GEMM
        acts.append(_row_err(f * fs.unsqueeze(-1), xf, x_n, B))
        f = f.to(_fp8_operand_dtype(x.device))
    return torch.stack(acts), v, s, q, sx, f, fs


def route_outputs(
    n: int,
    xv: torch.Tensor | None,
    xs: torch.Tensor | None,
    wv: torch.Tensor | None,
    ws: torch.Tensor | None,
    xq: torch.Tensor | None,
    xqs: torch.Tensor | None,
    wq: torch.Tensor | None,
    wqs: torch.Tensor | None,
    xf: torch.Tensor | None = None,
    xfs: torch.Tensor | None = None,
    wf: torch.Tensor | None = None,
    wfs: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """The quantized products ``Q_a(x)·W_rᵀ`` (float32 ``[M, n]``, no bias) of every route held, in
    :data:`PROFILE_ROUTES` order: one GEMM per activation format, split into its routes.

    Args:
        n: the layer's output features N.
        xv, xs, wv, ws: NVFP4 ``V_x``, ``s_x``, ``V_w``, ``s_w`` (all None without the NVFP4 route).
        xq, xqs, wq, wqs: INT8 codes and scales of x, and the stacked INT8 weight operands (None without INT8).
        xf, xfs, wf, wfs: FP8 code values and scales of x, and the stacked FP8 weight operands (None without FP8).
    """
    out = []
    if xv is not None:
        out.append(_mm_f32(xv, wv.t()) * (xs * ws))
    if xq is not None:
        out.extend((_int_mm_exact(xq, wq) * (xqs.unsqueeze(-1) * wqs.unsqueeze(0))).split(n, dim=-1))
    if xf is not None:
        out.extend((_fp8_mm(xf, wf) * (xfs.unsqueeze(-1) * wfs.unsqueeze(0))).split(n, dim=-1))
    return out


def output_errors(y: torch.Tensor, bias: torch.Tensor | None, *operands: torch.Tensor | None) -> torch.Tensor:
    """``out_err`` per row from the quantized operands: one extra GEMM per activation format
    (:func:`route_outputs`), then a row reduction per route.

    Args:
        y: the layer output ``[B, ..., N]`` (bias included; removed here).
        bias: float32 ``[N]`` or None.
        operands: ``xv, xs, wv, ws, xq, xqs, wq, wqs[, xf, xfs, wf, wfs]``, as :func:`route_outputs` takes them.

    Returns:
        ``[R, B]`` float32, routes in :data:`PROFILE_ROUTES` order.
    """
    B = y.shape[0]
    ref = y.detach().reshape(-1, y.shape[-1]).float()
    if bias is not None:
        ref = ref - bias
    ref_n = torch.linalg.vector_norm(ref.reshape(B, -1), dim=1)
    outs = route_outputs(y.shape[-1], *operands)
    return torch.stack([_row_err(yq, ref, ref_n, B) for yq in outs])


def linear_errors_impl(x, y, bias, act_index, nvfp4_v, nvfp4_s, int8_q, int8_s, fp8_q=None, fp8_s=None):
    """:func:`linear_errors` on plain tensors: :func:`quantize_activation` then :func:`output_errors`."""
    act, xv, xs, xq, xqs, xf, xfs = quantize_activation(
        x, None if nvfp4_v is None else nvfp4_v.dtype, int8_q is not None, fp8_q is not None)
    out = output_errors(y, bias, xv, xs, nvfp4_v, nvfp4_s, xq, xqs, int8_q, int8_s, xf, xfs, fp8_q, fp8_s)
    return torch.stack((act[list(act_index)], out), dim=1)


def linear_errors(x: torch.Tensor, y: torch.Tensor, qw: QuantizedWeight, impl=linear_errors_impl) -> torch.Tensor:
    """``act_err`` and ``out_err`` of one linear call, per batch row, for every route of ``qw``.

    Args:
        x: the layer input ``[B, ..., K]`` (dim 0 = batch rows).
        y: the layer output ``[B, ..., N]`` (bias included; it is removed here).
        qw: the layer's quantized weight.
        impl: :func:`linear_errors_impl` or a compiled version of it.

    Returns:
        float32 ``[len(qw.formats), 2, B]``: ``[:, 0]`` act_err, ``[:, 1]`` out_err, routes in ``qw.formats``
        order.
    """
    return impl(x, y, qw.bias, qw.act_index, *qw.operands())
