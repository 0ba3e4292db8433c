"""One entry point per quantized operation, choosing a Triton kernel or the reference numerics.

Paths (:func:`kernel_path` returns one of :data:`PATHS`):

* ``"triton-int8"``: Triton per-token INT8 quantizer + W8A8 GEMM with scales and bias in the epilogue.
* ``"triton-nvfp4-emulated"``: Triton NVFP4 quantizer + GEMM that dequantizes packed NVFP4 inside the kernel and
  multiplies on the bf16 tensor cores (Hopper has no FP4 tensor cores).
* ``"native-nvfp4"``: block-scaled FP4 tensor cores through ``torch._scaled_mm`` on compute capability >= 10;
  used only after a self-check on the device passed (untested on hardware, see :mod:`.native_nvfp4`).
* ``"scaled-mm-fp8"``: FP8 E4M3 W8A8 through ``torch._scaled_mm`` with row-wise scales (compute capability >= 8.9;
  :mod:`.scaled_mm_fp8`); the activation quantizer is plain PyTorch, which ``torch.compile`` fuses with the code
  before it.
* ``"reference"``: :mod:`sixbit_tune.formats` in plain PyTorch (CPU, or any device without Triton).

Choice: :class:`KernelPreference` per call (``preference=``) or process-wide (:func:`set_kernel_preference`,
initialised from the environment variable ``SIXBIT_KERNELS`` = auto | triton | reference). ``AUTO`` uses the
kernels on CUDA and the reference elsewhere; a CUDA tensor that has to fall back to the reference is logged once
per reason (logger ``sixbit_tune.kernels``), never silently. ``TRITON`` raises where no kernel can run; on CPU it
runs the kernels in Triton's interpreter when ``TRITON_INTERPRET=1`` was set before the kernels were imported
(tests only: slow), and FP8 through PyTorch's CPU ``_scaled_mm``. ``REFERENCE`` always uses the reference.

Every entry point calls torch custom operators (:mod:`.ops`, :mod:`.triton_ops`) or plain PyTorch operations
only, so ``torch.compile(fullgraph=True)`` traces :func:`quantized_linear` and :func:`quantize_activation`
without graph breaks. Under compilation a ``check_finite`` check is one operator that copies the activation after
checking it (``sixbit::finite_copy``); eagerly the kernels' scales are checked instead, without a copy.

Every path computes the same numbers: quantizers bit-identical to the reference; GEMMs equal to
``quantized_linear_reference`` up to float32 accumulation order and the final rounding to ``out_dtype``.
"""

from __future__ import annotations

import enum
import logging
import os

import torch

from sixbit_tune.errors import NonFiniteError
from sixbit_tune.formats.common import check_float_input
from sixbit_tune.routes import QUANT_FORMATS

from . import ops
from ._triton_support import HAS_TRITON, interpreting, triton_usable_on

log = logging.getLogger("sixbit_tune.kernels")

PATHS = ("triton-int8", "triton-nvfp4-emulated", "native-nvfp4", "scaled-mm-fp8", "reference")
_FORMATS = QUANT_FORMATS
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class KernelPreference(enum.StrEnum):
    """Which implementation to use: ``AUTO`` (kernels on CUDA, reference elsewhere), ``TRITON`` (kernels or an
    error), ``REFERENCE`` (plain PyTorch always)."""

    AUTO = "auto"
    TRITON = "triton"
    REFERENCE = "reference"


def _parse_preference(value) -> KernelPreference:
    if isinstance(value, KernelPreference):
        return value
    try:
        return KernelPreference(str(value).lower())
    except ValueError:
        raise ValueError(
            f"unknown kernel preference {value!r}; expected one of {[p.value for p in KernelPreference]}"
        ) from None


_preference = _parse_preference(os.environ.get("SIXBIT_KERNELS", "auto") or "auto")


def set_kernel_preference(preference: KernelPreference | str) -> None:
    """Set the process-wide default preference (a :class:`KernelPreference` or its string value)."""
    global _preference
    _preference = _parse_preference(preference)


def get_kernel_preference() -> KernelPreference:
    """The process-wide default preference."""
    return _preference


def _check_fmt(fmt: str) -> str:
    if fmt not in _FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; expected one of {_FORMATS}")
    return fmt


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


_native_status: dict[tuple[int, ...], bool] = {}


@torch.compiler.assume_constant_result
def _native_nvfp4_ok(device: torch.device) -> bool:
    """Compute capability >= 10, the torch build has FP4 ``_scaled_mm``, and its self-check passed (cached)."""
    if device.type != "cuda" or interpreting():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if torch.cuda.get_device_capability(index)[0] < 10:
        return False
    key = (index,)
    if key not in _native_status:
        from . import native_nvfp4

        reason = "this torch build has no float4_e2m1fn_x2 / _scaled_mm" if not native_nvfp4.available() else None
        if reason is None:
            reason = native_nvfp4.self_check(torch.device("cuda", index))
        _native_status[key] = reason is None
        if reason is not None:
            _warn_once(f"native:{index}", f"NVFP4 on cuda:{index}: not using the native FP4 path ({reason}); "
                       "using the emulated Triton kernel instead")
    return _native_status[key]


def _fp8_path(device: torch.device, pref: KernelPreference) -> str:
    from .scaled_mm_fp8 import unusable_reason

    why = unusable_reason(device)
    if why is None and (device.type == "cuda" or pref is KernelPreference.TRITON):
        return "scaled-mm-fp8"
    if pref is KernelPreference.TRITON:
        raise RuntimeError(f"kernel preference TRITON, but no FP8 kernel can run on {device}: {why}")
    if device.type == "cuda":
        _warn_once(f"cuda-ref:fp8:{why}", f"fp8 on {device}: falling back to the PyTorch reference ({why})")
    return "reference"


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def kernel_path(fmt: str, device=None, preference: KernelPreference | str | None = None) -> str:
    """The path :func:`quantized_linear` / :func:`quantize_activation` take for ``fmt`` on ``device``.

    Args:
        fmt: "nvfp4", "int8" or "fp8".
        device: a torch.device or string; default the current CUDA device if there is one, else CPU.
        preference: overrides the process-wide preference for this query.

    Returns:
        One of :data:`PATHS`. Recorded with measurements and policies.

    Raises:
        ValueError: unknown ``fmt`` or preference.
        RuntimeError: ``TRITON`` preferred where no kernel can run.
    """
    _check_fmt(fmt)
    pref = _preference if preference is None else _parse_preference(preference)
    device = _default_device() if device is None else torch.device(device)
    if pref is KernelPreference.REFERENCE:
        return "reference"
    if fmt == "fp8":
        return _fp8_path(device, pref)
    triton_path = "triton-int8" if fmt == "int8" else "triton-nvfp4-emulated"
    if device.type == "cuda":
        if fmt == "nvfp4" and pref is KernelPreference.AUTO and _native_nvfp4_ok(device):
            return "native-nvfp4"
        if triton_usable_on(device):
            return triton_path
        why = "Triton is not installed" if not HAS_TRITON else "TRITON_INTERPRET is set"
        if pref is KernelPreference.TRITON:
            raise RuntimeError(f"kernel preference TRITON, but no Triton kernel can run on {device}: {why}")
        _warn_once(f"cuda-ref:{fmt}:{why}", f"{fmt} on {device}: falling back to the PyTorch reference ({why})")
        return "reference"
    if pref is KernelPreference.TRITON:
        if triton_usable_on(device):
            return triton_path
        raise RuntimeError(
            f"kernel preference TRITON, but no Triton kernel can run on {device} "
            "(CPU needs TRITON_INTERPRET=1 set before sixbit_tune.kernels' kernels are imported, and Triton)"
        )
    return "reference"


# ------------------------------------------------------------------------------------------------ helpers


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _nonfinite(what: str, x: torch.Tensor) -> NonFiniteError:
    # Build the reference's message (it counts NaN and Inf) for a tensor known to be non-finite.
    from sixbit_tune.formats.common import check_finite

    try:
        check_finite(x, what)
    except NonFiniteError as exc:
        return exc
    return NonFiniteError(f"{what} must be finite")


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _checked_input(x2: torch.Tensor, path: str, check_finite: bool, what: str) -> torch.Tensor:
    """Under compilation, a kernel path's NaN/Inf check: one operator that raises or passes on a copy."""
    if check_finite and path != "reference" and _compiling():
        return ops.finite_copy(x2, what)
    return x2


def _check_probe(probe: torch.Tensor, x2: torch.Tensor, check_finite: bool, what: str) -> None:
    """Eagerly, a kernel path's NaN/Inf check on values it computed anyway (scales, amax): one host sync."""
    if check_finite and not _compiling() and not bool(torch.isfinite(probe).all()):
        raise _nonfinite(what, x2)


# ------------------------------------------------------------------------------------------- quantizers


def _int8_rows(x2: torch.Tensor, path: str, check_finite: bool, what: str):
    if path == "reference":
        return ops.int8_quantize_reference(x2)
    from . import triton_ops

    x2 = _checked_input(x2, path, check_finite, what)
    q, s = triton_ops.int8_quantize_triton(x2)
    _check_probe(s, x2, check_finite, what)
    return q, s


def _fp8_rows(x2: torch.Tensor, path: str, check_finite: bool, what: str):
    if path == "reference":
        return ops.fp8_quantize_reference(x2)
    from sixbit_tune.formats import fp8

    x2 = _checked_input(x2, path, check_finite, what)
    q, s = fp8.quantize(x2, check=False)
    _check_probe(s, x2, check_finite, what)
    return q, s


def _nvfp4_rows(x: torch.Tensor, x2: torch.Tensor, path: str, check_finite: bool, what: str):
    from sixbit_tune.formats import nvfp4

    nvfp4.check_k(x.shape[-1])
    if path == "reference":
        data, scales, gs = ops.nvfp4_quantize_reference(x2)
    else:
        from . import triton_ops

        x2 = _checked_input(x2, path, check_finite, what)
        data, scales, gs, amax = triton_ops.nvfp4_quantize_triton(x2)
        _check_probe(amax, x2, check_finite, what)
    lead = tuple(x.shape[:-1])
    K = x.shape[-1]
    return nvfp4.NVFP4Tensor(
        data=data.reshape(*lead, K // 2),
        block_scales=scales.reshape(*lead, K // 16),
        global_scale=gs,
        shape=x.shape,
        orig_dtype=x.dtype,
    )


def quantize_activation(
    x: torch.Tensor,
    fmt: str,
    *,
    preference: KernelPreference | str | None = None,
    check_finite: bool = True,
):
    """Quantize an activation ``x [..., K]`` over its last dim.

    Args:
        x: bfloat16/float16/float32 tensor.
        fmt: "int8" or "fp8" (one scale per token) or "nvfp4" (per-tensor + per-16-block scales; ``K % 16 == 0``).
        preference: overrides the process-wide :class:`KernelPreference`.
        check_finite: raise :class:`NonFiniteError` on NaN/Inf input. The kernel paths detect it from the scales
            they computed anyway (costs one device-to-host sync); ``False`` skips that sync, and non-finite input
            then gives non-finite or meaningless outputs. The reference path always checks.

    Returns:
        int8: ``(q int8 [..., K], scales float32 [...])``; fp8: ``(q float8_e4m3fn [..., K], scales float32
        [...])``; nvfp4: :class:`sixbit_tune.formats.nvfp4.NVFP4Tensor`. Bit-identical to
        ``sixbit_tune.formats.int8.quantize`` / ``.fp8.quantize`` / ``.nvfp4.quantize``.
    """
    _check_fmt(fmt)
    check_float_input(x, "activation", finite=False)  # NaN/Inf: see check_finite
    path = kernel_path(fmt, x.device, preference)
    x2 = _rows(x)
    if fmt in ("int8", "fp8"):
        rows = _int8_rows if fmt == "int8" else _fp8_rows
        q, s = rows(x2, path, check_finite, "activation")
        return q.reshape(x.shape), s.reshape(x.shape[:-1])
    if path == "native-nvfp4":  # the native path uses the Triton quantizer
        path = "triton-nvfp4-emulated"
    return _nvfp4_rows(x, x2, path, check_finite, "activation")


def quantize_weight(
    w: torch.Tensor,
    fmt: str,
    *,
    preference: KernelPreference | str | None = None,
    encoder: str = "standard",
    hessian: torch.Tensor | None = None,
):
    """Quantize a linear weight ``w [N, K]`` once (always checked for NaN/Inf).

    Args:
        w: bfloat16/float16/float32 ``[N, K]``.
        fmt: "nvfp4", "int8" or "fp8".
        preference: overrides the process-wide :class:`KernelPreference`.
        encoder: the NVFP4 weight encoder, one of ``sixbit_tune.formats.nvfp4.WEIGHT_ENCODERS``. ``"standard"`` is
            the bit-exact quantizer (Triton kernel or reference); the others run
            :func:`sixbit_tune.formats.nvfp4.quantize_weight` in PyTorch on ``w``'s device and give other valid
            NVFP4 codes that every path decodes unchanged. INT8 and FP8 have only ``"standard"``.
        hessian: calibration statistics ``[K, K]`` for ``encoder="gptq"`` (see the formats function).

    Returns:
        int8: ``(q int8 [N, K], scales float32 [N])``; fp8: ``(q float8_e4m3fn [N, K], scales float32 [N])`` (one
        scale per output channel); nvfp4: an :class:`~sixbit_tune.formats.nvfp4.NVFP4Tensor` of shape ``[N, K]``.
        These are the ``qweight`` arguments of :func:`quantized_linear`.

    Raises:
        ValueError: unknown format or encoder, an encoder other than ``"standard"`` for INT8/FP8, a weight that is
            not 2-D, ``K % 16 != 0`` for NVFP4, a missing or misshapen ``hessian`` for ``"gptq"``.
        NonFiniteError: ``w`` contains NaN or Inf.
    """
    from sixbit_tune.formats import nvfp4

    _check_fmt(fmt)
    nvfp4.check_weight_encoder(encoder)
    if encoder != nvfp4.DEFAULT_WEIGHT_ENCODER and fmt != "nvfp4":
        raise ValueError(f"weight encoder {encoder!r} is for NVFP4 only; {fmt} weights use 'standard'")
    check_float_input(w, "weight", finite=False)  # NaN/Inf: quantize_activation(check_finite=True) below
    if w.dim() != 2:
        raise ValueError(f"a linear weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    if encoder != nvfp4.DEFAULT_WEIGHT_ENCODER:
        return nvfp4.quantize_weight(w, encoder, hessian=hessian)
    return quantize_activation(w, fmt, preference=preference, check_finite=True)


_CODE_DTYPES = {torch.int8: "int8", torch.float8_e4m3fn: "fp8"}


def _check_qweight(qweight, fmt: str | None):
    from sixbit_tune.formats.nvfp4 import NVFP4Tensor

    if isinstance(qweight, NVFP4Tensor):
        kind = "nvfp4"
        if len(qweight.shape) != 2:
            raise ValueError(f"NVFP4 qweight must have shape [N, K], got {tuple(qweight.shape)}")
        N, K = qweight.shape
    elif isinstance(qweight, (tuple, list)) and len(qweight) == 2:
        q, s = qweight
        if not (isinstance(q, torch.Tensor) and q.dtype in _CODE_DTYPES and q.dim() == 2):
            raise ValueError("INT8/FP8 qweight must be (int8 or float8_e4m3fn [N, K], float32 [N]); the codes are "
                             "not a 2-D int8 or float8_e4m3fn tensor")
        kind = _CODE_DTYPES[q.dtype]
        N, K = q.shape
        if not (isinstance(s, torch.Tensor) and s.dtype == torch.float32 and tuple(s.shape) == (N,)):
            raise ValueError(f"{kind.upper()} qweight scales must be float32 [{N}], got "
                             f"{getattr(s, 'dtype', type(s))} {tuple(getattr(s, 'shape', ()))}")
    else:
        raise TypeError(
            "qweight must be an NVFP4Tensor [N, K] or a tuple (int8 or float8_e4m3fn [N, K], float32 [N]) from "
            f"quantize_weight, got {type(qweight).__name__}"
        )
    if fmt is not None and _check_fmt(fmt) != kind:
        raise ValueError(f"fmt={fmt!r} does not match the qweight, which is {kind}")
    return kind, N, K


def quantized_linear(
    x: torch.Tensor,
    qweight,
    bias: torch.Tensor | None = None,
    fmt: str | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    preference: KernelPreference | str | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """``y = Q(x) @ Wq.T + bias`` with the activation quantized per call and the weight pre-quantized.

    Args:
        x: activation ``[..., K]``, bfloat16/float16/float32.
        qweight: from :func:`quantize_weight`: ``(int8 [N, K], float32 [N])``, ``(float8_e4m3fn [N, K],
            float32 [N])`` or an ``NVFP4Tensor [N, K]``.
        bias: ``[N]`` or None (added in float32).
        fmt: "int8" / "fp8" / "nvfp4", or None to infer it from ``qweight`` (a mismatch raises ValueError).
        out_dtype: bfloat16, float16 or float32; default ``x.dtype``.
        preference: overrides the process-wide :class:`KernelPreference`.
        check_finite: see :func:`quantize_activation`.

    Returns:
        ``[..., N]`` in ``out_dtype``. INT8 (W8A8): exact int32 accumulation, then
        ``acc * (sx * sw) + bias`` in float32, rounded once. FP8 (W8A8): the code products accumulated in float32
        (the reference: exactly), then ``acc * (sx * sw) + bias`` (see :mod:`.scaled_mm_fp8` for the output
        rounding). NVFP4 (W4A4): dequantized operands multiplied with float32 accumulation, times both global
        scales, plus bias, rounded once.
    """
    kind, N, K = _check_qweight(qweight, fmt)
    check_float_input(x, "activation", finite=False)  # NaN/Inf: see check_finite
    if x.shape[-1] != K:
        raise ValueError(f"activation has K={x.shape[-1]} but the weight expects K={K}")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must have shape [{N}], got {tuple(bias.shape)}")
    path = kernel_path(kind, x.device, preference)
    lead = tuple(x.shape[:-1])
    x2 = _rows(x)
    if kind in ("int8", "fp8"):
        wq, ws = qweight
        if path == "reference":
            op = ops.int8_linear_reference if kind == "int8" else ops.fp8_linear_reference
            y = op(x2, wq, ws, bias, out_dtype)
        elif kind == "int8":
            from . import triton_ops

            xq, xs = _int8_rows(x2, path, check_finite, "activation")
            y = triton_ops.int8_gemm_triton(xq, wq, xs, ws, bias, out_dtype)
        else:
            from .scaled_mm_fp8 import fp8_scaled_mm

            xq, xs = _fp8_rows(x2, path, check_finite, "activation")
            y = fp8_scaled_mm(xq, wq, xs, ws, bias, out_dtype)
        return y.reshape(*lead, N)

    from sixbit_tune.formats import nvfp4

    nvfp4.check_k(K)
    w = (qweight.data, qweight.block_scales, qweight.global_scale)
    if path == "reference":
        y = ops.nvfp4_linear_reference(x2, *w, bias, out_dtype)
    elif path == "native-nvfp4":
        x2 = _checked_input(x2, path, check_finite, "activation")
        y, amax = ops.nvfp4_linear_native(x2, *w, bias, out_dtype)
        _check_probe(amax, x2, check_finite, "activation")
    else:
        from . import triton_ops

        x2 = _checked_input(x2, path, check_finite, "activation")
        y, amax = triton_ops.nvfp4_linear_triton(x2, *w, bias, out_dtype)
        _check_probe(amax, x2, check_finite, "activation")
    return y.reshape(*lead, N)
