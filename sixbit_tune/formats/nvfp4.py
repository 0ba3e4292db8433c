"""NVFP4 reference numerics: the bit-level specification every NVFP4 kernel is tested against.

Layout of a quantized tensor ``x`` of shape ``[..., K]`` (``K % 16 == 0``):

* elements: FP4 E2M1 codes, bit 3 = sign, bits 2-1 = exponent, bit 0 = mantissa; codes 0..7 are the magnitudes
  0, 0.5, 1, 1.5, 2, 3, 4, 6. Two codes per byte, the even-indexed element in the low nibble
  (``data[..., j] = code[2j] | code[2j + 1] << 4``).
* block scales: one ``float8_e4m3fn`` per 16 consecutive elements along K, shape ``[..., K // 16]``.
* global scale: one float32 per tensor.

Arithmetic, all in float32, each operation IEEE round-to-nearest-even, in exactly this order:

1. ``s = amax(|x|) / 2688``  (2688 = 448 * 6). Special rule, see :func:`global_scale_of`: ``s = 1.0`` when
   ``amax == 0`` or when ``(1 / s) / 2**-6`` is not finite in float32 (``amax`` below about 5.06e-34).
2. per block: ``b = e4m3(clamp(amax_block / 6 / s, 2**-6, 448))``; ``/ 6`` then ``/ s`` (two divisions), then the
   clamp, then PyTorch's round-to-nearest-even cast ``.to(torch.float8_e4m3fn)``.
3. per block: ``r = (1 / s) / float32(b)``; per element ``v = clamp(x * r, -6, 6)`` (a multiplication by that
   reciprocal, never a division of ``x``), then ``code = encode_e2m1(v)``: nearest E2M1 value, ties to the code
   whose mantissa bit is 0; the sign bit is the sign bit of ``v`` (so a negative value, or -0.0, that rounds to zero
   gives code 0b1000).
4. dequantized value ``(E2M1[code] * float32(b)) * s``. ``E2M1[code] * b`` is exact in float32, so this is the
   correctly rounded product of the three factors (any association that rounds once matches it).

Range notes (float32, IEEE subnormals kept, no flush-to-zero), for the default global scale (not for an explicit
``global_scale`` argument): ``r >= (2688 / FLT_MAX) / 448 > 2**-126`` is always
a normal number, and ``E2M1[code] * b <= 2688`` so ``(q * b) * s`` stays finite even for ``amax = FLT_MAX``: finite
input never yields NaN or Inf anywhere. A kernel that flushes subnormals to zero can differ from this reference
only for tensors with ``amax`` below about 2e-33 (where ``amax_block / 6`` can be subnormal) and in the sign of
zero codes if it does not keep the sign of flushed values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sixbit_tune.formats.common import check_float_input, ieee_div

BLOCK_SIZE = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
SCALE_FLOOR = 2.0**-6

#: Value of each 4-bit code (index = code; codes 8..15 are the negatives, code 8 is -0.0).
E2M1_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=torch.float32,
)

_GLOBAL_DENOM = E4M3_MAX * E2M1_MAX  # 2688.0, exact in float32


def check_k(K: int) -> None:
    """Raise ValueError (naming K and 16) unless K is a multiple of the NVFP4 block size."""
    if K % BLOCK_SIZE != 0:
        raise ValueError(
            f"NVFP4 needs the last (reduction) dim K to be a multiple of {BLOCK_SIZE}, got K={K} "
            f"(K % {BLOCK_SIZE} = {K % BLOCK_SIZE}); pad or keep this layer unquantized, there is no silent padding"
        )


def global_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """``amax / 2688`` in float32 with the degenerate-scale rule of :func:`global_scale_of` applied.

    For callers (kernels, profiling) that already hold ``amax = max(|x|)`` as a float32 tensor (any shape; applied
    elementwise, no host synchronization).
    """
    amax = amax.to(torch.float32)
    s = ieee_div(amax, _GLOBAL_DENOM)
    usable = (amax > 0) & torch.isfinite((1.0 / s) / SCALE_FLOOR)
    return torch.where(usable, s, torch.ones_like(s))


_global_scale_from_amax = global_scale_from_amax  # old private name, kept for callers that already use it


def global_scale_of(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor NVFP4 scale ``amax(|x|) / (448 * 6)`` in float32, as a 0-d tensor on ``x``'s device.

    Degenerate-scale rule: the scale is defined as 1.0 when ``amax == 0`` (all-zero or empty tensor), and also when
    ``amax`` is so small that the largest element multiplier ``(1 / s) / 2**-6`` (the block-scale floor) would
    overflow float32, which happens for ``amax < ~5.06e-34`` (that also covers ``s`` underflowing to 0). With
    ``s = 1`` every block scale sits at the floor 2**-6 and every element of such a tensor encodes to (signed) zero,
    so quantization never produces NaN or Inf for finite input; the absolute error is then at most ``amax``.

    Raises:
        NonFiniteError: ``x`` contains NaN or Inf.
        TypeError: ``x`` is not a float32/float16/bfloat16 tensor.
    """
    check_float_input(x, "NVFP4 input")
    if x.numel() == 0:
        return torch.ones((), dtype=torch.float32, device=x.device)
    return global_scale_from_amax(x.detach().float().abs().amax())


def _as_global_scale(global_scale, device: torch.device) -> torch.Tensor:
    s = torch.as_tensor(global_scale, dtype=torch.float32, device=device).detach()
    if s.numel() != 1:
        raise ValueError(f"global_scale must be a single number, got shape {tuple(s.shape)}")
    s = s.reshape(())
    if not bool(torch.isfinite(s)) or not bool(s > 0):
        raise ValueError(f"global_scale must be finite and > 0, got {float(s)!r}")
    if not bool(torch.isfinite((1.0 / s) / SCALE_FLOOR)):
        raise ValueError(
            f"global_scale={float(s)!r} is too small: (1/s)/2**-6 overflows float32 (need s >= ~1.9e-37)"
        )
    return s


def encode_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Encode float32 values (already scaled and clamped to [-6, 6]) to unpacked E2M1 codes (uint8, 0..15).

    Round to nearest; a tie goes to the code whose mantissa bit (bit 0) is 0: 0.25 -> 0, 0.75 -> 1.0,
    1.25 -> 1.0, 1.75 -> 2.0, 2.5 -> 2.0, 3.5 -> 4.0, 5.0 -> 4.0. The sign bit (bit 3) is copied from the sign bit of
    ``v``, so -0.0 and small negatives give 0b1000. Magnitudes above 6 saturate to code 7 (15 for negatives).
    Implemented as a count of explicit midpoint comparisons (``>`` where the tie goes down, ``>=`` where it goes up),
    so no floating-point rounding trick can move a tie. NaN is not allowed (callers check finiteness first).
    """
    if v.dtype != torch.float32:
        raise TypeError(f"encode_e2m1 expects float32 values, got {v.dtype}")
    a = v.abs()
    mag = (
        (a > 0.25).to(torch.uint8)  # 0.25 tie -> code 0 (0)
        + (a >= 0.75).to(torch.uint8)  # 0.75 tie -> code 2 (1.0)
        + (a > 1.25).to(torch.uint8)  # 1.25 tie -> code 2 (1.0)
        + (a >= 1.75).to(torch.uint8)  # 1.75 tie -> code 4 (2.0)
        + (a > 2.5).to(torch.uint8)  # 2.5 tie -> code 4 (2.0)
        + (a >= 3.5).to(torch.uint8)  # 3.5 tie -> code 6 (4.0)
        + (a > 5.0).to(torch.uint8)  # 5.0 tie -> code 6 (4.0)
    )
    return mag | (torch.signbit(v).to(torch.uint8) << 3)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Float32 value of each unpacked E2M1 code (uint8 or any integer dtype, values 0..15)."""
    if codes.is_floating_point():
        raise TypeError(f"decode_e2m1 expects integer codes, got {codes.dtype}")
    return E2M1_VALUES.to(codes.device)[(codes.long() & 0xF)]


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Pack unpacked codes ``[..., K]`` (values 0..15, K even) into bytes ``[..., K // 2]``, even element low."""
    if codes.dim() == 0 or codes.shape[-1] % 2 != 0:
        raise ValueError(f"pack_codes needs an even last dim, got shape {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] & 0xF) | ((c[..., 1::2] & 0xF) << 4)


def unpack_codes(data: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: bytes ``[..., K // 2]`` -> uint8 codes ``[..., K]``."""
    if data.dtype != torch.uint8:
        raise TypeError(f"unpack_codes expects uint8 data, got {data.dtype}")
    if data.dim() == 0:
        raise ValueError("unpack_codes needs at least one dim")
    return torch.stack((data & 0xF, data >> 4), dim=-1).reshape(*data.shape[:-1], data.shape[-1] * 2)


@dataclass
class NVFP4Tensor:
    """A tensor quantized to NVFP4 over its last dim.

    Attributes:
        data: uint8 ``[..., K // 2]``, two E2M1 codes per byte, even-indexed element in the low nibble.
        block_scales: ``torch.float8_e4m3fn`` ``[..., K // 16]``.
        global_scale: float32 0-d tensor.
        shape: ``torch.Size`` of the original tensor ``[..., K]``.
        orig_dtype: dtype of the original tensor.
    """

    data: torch.Tensor
    block_scales: torch.Tensor
    global_scale: torch.Tensor
    shape: torch.Size
    orig_dtype: torch.dtype

    def __post_init__(self) -> None:
        self.shape = torch.Size(self.shape)
        if len(self.shape) == 0:
            raise ValueError("NVFP4Tensor.shape must have at least one dim")
        K = self.shape[-1]
        check_k(K)
        lead = tuple(self.shape[:-1])
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != (*lead, K // 2):
            raise ValueError(
                f"NVFP4Tensor.data must be uint8 {(*lead, K // 2)}, got {self.data.dtype} {tuple(self.data.shape)}"
            )
        if self.block_scales.dtype != torch.float8_e4m3fn or tuple(self.block_scales.shape) != (
            *lead,
            K // BLOCK_SIZE,
        ):
            raise ValueError(
                f"NVFP4Tensor.block_scales must be float8_e4m3fn {(*lead, K // BLOCK_SIZE)}, "
                f"got {self.block_scales.dtype} {tuple(self.block_scales.shape)}"
            )
        if self.global_scale.dtype != torch.float32 or self.global_scale.dim() != 0:
            raise ValueError(
                f"NVFP4Tensor.global_scale must be a float32 0-d tensor, got {self.global_scale.dtype} "
                f"{tuple(self.global_scale.shape)}"
            )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """See :func:`dequantize`."""
        return dequantize(self, dtype)

    @property
    def nbytes(self) -> int:
        """Storage bytes of codes + block scales + the 4-byte global scale."""
        return (
            self.data.numel() * self.data.element_size()
            + self.block_scales.numel() * self.block_scales.element_size()
            + self.global_scale.numel() * self.global_scale.element_size()
        )


def quantize(x: torch.Tensor, global_scale=None, *, check: bool = True) -> NVFP4Tensor:
    """Quantize ``x`` ``[..., K]`` to NVFP4 over its last dim, exactly as the module docstring specifies.

    Args:
        x: float32/float16/bfloat16 tensor with ``K = x.shape[-1]`` a multiple of 16; any leading dims.
        global_scale: optional per-tensor float32 scale ``s`` to use instead of :func:`global_scale_of` ``(x)``
            (a float or 1-element tensor, finite, > 0, and ``(1/s)/2**-6`` finite). Block scales are then clamped
            to [2**-6, 448] and elements to [-6, 6] as usual.
        check: scan ``x`` for NaN/Inf (a device synchronization). Pass False only where the caller has already
            checked; non-finite input then gives unspecified codes instead of an error.

    Returns:
        The :class:`NVFP4Tensor`, on ``x``'s device.

    Raises:
        ValueError: ``K % 16 != 0`` (the message names K and 16), or a bad ``global_scale``.
        NonFiniteError: ``x`` contains NaN or Inf.
        TypeError: ``x`` is not a float32/float16/bfloat16 tensor.
    """
    codes, b8, s = _encode(x, global_scale, check)
    return NVFP4Tensor(
        data=pack_codes(codes),
        block_scales=b8,
        global_scale=s,
        shape=x.shape,
        orig_dtype=x.dtype,
    )


def block_values(x: torch.Tensor, global_scale=None, *, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4-quantize ``x`` and return ``(V, s)`` with ``Q(x) = V * s`` and ``V = E2M1[code] * b`` (float32, exact).

    The same steps as :func:`quantize` (one implementation), for callers that multiply the unpacked values
    directly, such as the profiling hooks' error GEMMs. Arguments and errors as for :func:`quantize`.
    """
    codes, b8, s = _encode(x, global_scale, check)
    K = x.shape[-1]
    lead = tuple(x.shape[:-1])
    v = decode_e2m1(codes).reshape(*lead, K // BLOCK_SIZE, BLOCK_SIZE) * b8.to(torch.float32).unsqueeze(-1)
    return v.reshape(x.shape), s


def _encode(x: torch.Tensor, global_scale, check: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1-3 of the module docstring: unpacked codes ``[..., K]``, E4M3 block scales, global scale."""
    check_float_input(x, "NVFP4 input", finite=check)
    shape = x.shape
    K = shape[-1]
    check_k(K)
    xf = x.detach().to(torch.float32)
    if global_scale is not None:
        s = _as_global_scale(global_scale, x.device)
    elif xf.numel() == 0:
        s = torch.ones((), dtype=torch.float32, device=x.device)
    else:
        s = global_scale_from_amax(xf.abs().amax())

    lead = tuple(shape[:-1])
    xb = xf.reshape(*lead, K // BLOCK_SIZE, BLOCK_SIZE)
    amax_b = xb.abs().amax(dim=-1) if xb.numel() else xb.new_zeros((*lead, K // BLOCK_SIZE))
    b32 = (ieee_div(amax_b, E2M1_MAX) / s).clamp(SCALE_FLOOR, E4M3_MAX)
    b8 = b32.to(torch.float8_e4m3fn)
    r = (1.0 / s) / b8.to(torch.float32)
    v = (xb * r.unsqueeze(-1)).clamp(-E2M1_MAX, E2M1_MAX)
    return encode_e2m1(v).reshape(*lead, K), b8, s


def dequantize(t: NVFP4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values ``(E2M1[code] * b) * s`` computed in float32, reshaped to ``t.shape``, then cast to ``dtype``."""
    K = t.shape[-1]
    lead = tuple(t.shape[:-1])
    q = decode_e2m1(unpack_codes(t.data)).reshape(*lead, K // BLOCK_SIZE, BLOCK_SIZE)
    y = (q * t.block_scales.to(torch.float32).unsqueeze(-1)) * t.global_scale
    return y.reshape(t.shape).to(dtype)


# ------------------------------------------------------------------------------------------------ weight encoders
#
# A weight encoder chooses the codes and scales of a weight; the decode above stays the same, so every encoder's
# output is valid NVFP4 that :func:`dequantize` and every NVFP4 GEMM read unchanged. Weights are encoded once, when a
# policy is applied, so an encoder may spend time to lower the error. Activations always use :func:`quantize`.

#: Names of the NVFP4 weight encoders :func:`quantize_weight` accepts; the first is the default.
WEIGHT_ENCODERS = ("standard", "scale-search", "gptq")
DEFAULT_WEIGHT_ENCODER = "standard"

#: Steps (in E4M3 codes, i.e. in units of the scale's last mantissa bit) tried around the standard block scale by
#: the ``"scale-search"`` encoder. Eight steps are one binade: down to half and up to nearly twice the standard scale.
SCALE_SEARCH_STEPS = tuple(range(-8, 9))

_E4M3_MIN_CODE = 1  # smallest positive E4M3 value (2**-9, subnormal)
_E4M3_MAX_CODE = 0x7E  # 448


def check_weight_encoder(encoder: str) -> str:
    """Return ``encoder`` if it names a weight encoder, else raise ValueError listing :data:`WEIGHT_ENCODERS`."""
    if encoder not in WEIGHT_ENCODERS:
        raise ValueError(f"unknown NVFP4 weight encoder {encoder!r}; expected one of {WEIGHT_ENCODERS}")
    return encoder


def _codes_for_scales(xb: torch.Tensor, s: torch.Tensor, b8: torch.Tensor) -> torch.Tensor:
    """Step 3 of the module docstring for given block scales: unpacked codes ``[..., nblocks, 16]``."""
    r = (1.0 / s) / b8.to(torch.float32)
    return encode_e2m1((xb * r.unsqueeze(-1)).clamp(-E2M1_MAX, E2M1_MAX))


def _block_sq_error(
    xb: torch.Tensor, codes: torch.Tensor, b8: torch.Tensor, s: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Squared error of each block's dequantized values (computed as :func:`dequantize` does) against ``xb``,
    each element's term multiplied by ``weight`` (broadcast to ``xb``) when given."""
    sq = ((decode_e2m1(codes) * b8.to(torch.float32).unsqueeze(-1)) * s - xb).square()
    return (sq if weight is None else sq * weight).sum(dim=-1)


def _search_block_scales(
    xb: torch.Tensor, s: torch.Tensor, b8: torch.Tensor, steps=SCALE_SEARCH_STEPS, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block, the E4M3 scale among ``b8`` shifted by ``steps`` codes with the lowest (weighted) squared error.

    ``b8`` is always a candidate and is replaced only by a strictly lower error, so no block gets worse and ties
    keep the given scale. Candidates are the positive finite E4M3 values (subnormals included, up to 448).
    Returns ``(codes [..., nblocks, 16], scales)``.
    """
    best_b = b8
    best_codes = _codes_for_scales(xb, s, b8)
    best_err = _block_sq_error(xb, best_codes, b8, s, weight)
    base = b8.view(torch.uint8).to(torch.int16)
    for step in steps:
        if step == 0:
            continue
        cand = (base + step).clamp(_E4M3_MIN_CODE, _E4M3_MAX_CODE).to(torch.uint8).view(torch.float8_e4m3fn)
        codes = _codes_for_scales(xb, s, cand)
        err = _block_sq_error(xb, codes, cand, s, weight)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_b = torch.where(better, cand.view(torch.uint8), best_b.view(torch.uint8)).view(torch.float8_e4m3fn)
        best_codes = torch.where(better.unsqueeze(-1), codes, best_codes)
    return best_codes, best_b


def _standard_block_scales(xb: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Step 2 of the module docstring for blocks ``xb [..., nblocks, 16]``."""
    amax_b = xb.abs().amax(dim=-1) if xb.numel() else xb.new_zeros(xb.shape[:-1])
    return (ieee_div(amax_b, E2M1_MAX) / s).clamp(SCALE_FLOOR, E4M3_MAX).to(torch.float8_e4m3fn)


def _gptq_encode(
    w: torch.Tensor,
    s: torch.Tensor,
    hessian: torch.Tensor,
    damp: float,
    search: bool,
    block_columns: int = 128,
    scale_weight: str = "obs",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Error-compensated rounding of ``w [N, K]`` (float32) for the proxy loss ``tr((W - Q) H (W - Q)^T)``.

    Columns are encoded left to right; the rounding error of each column is spread over the columns not yet
    encoded through the upper Cholesky factor ``U`` of ``H^-1``. Each 16-column block's scales are chosen when its
    first column is reached, from the weights as updated so far: the standard rule, or with ``search`` the scale
    search, its squared errors weighted per column by ``scale_weight``: ``"obs"`` ``1 / U[i, i]^2`` (the cost of
    rounding column ``i`` that the compensation cannot remove), ``"diag"`` ``H[i, i]``, ``"none"`` unweighted.
    Returns ``(codes [N, K], block scales [N, K // 16])``.
    """
    N, K = w.shape
    W = w.clone()
    H = hessian.to(device=w.device, dtype=torch.float64).clone()
    dead = torch.diagonal(H) <= 0
    H[dead, dead] = 1.0
    mean_diag = float(torch.diagonal(H).mean())
    H += torch.eye(K, dtype=H.dtype, device=H.device) * (damp * mean_diag)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).to(torch.float32)
    codes = torch.empty((N, K), dtype=torch.uint8, device=w.device)
    scales = torch.empty((N, K // BLOCK_SIZE), dtype=torch.uint8, device=w.device)
    for c0 in range(0, K, block_columns):
        c1 = min(c0 + block_columns, K)
        W1 = W[:, c0:c1].clone()
        Hinv1 = Hinv[c0:c1, c0:c1]
        Err1 = torch.zeros_like(W1)
        for g in range(0, c1 - c0, BLOCK_SIZE):
            gb = W1[:, g : g + BLOCK_SIZE].unsqueeze(1)  # [N, 1, 16]
            b8 = _standard_block_scales(gb, s)
            if search:
                wt = None
                if scale_weight == "obs":
                    wt = torch.diagonal(Hinv1)[g : g + BLOCK_SIZE].reciprocal().square()
                elif scale_weight == "diag":
                    wt = torch.diagonal(H)[c0 + g : c0 + g + BLOCK_SIZE].to(torch.float32)
                _, b8 = _search_block_scales(gb, s, b8, weight=wt)
            b8 = b8[:, 0]
            scales[:, (c0 + g) // BLOCK_SIZE] = b8.view(torch.uint8)
            r = (1.0 / s) / b8.to(torch.float32)
            bs = b8.to(torch.float32)
            for i in range(g, g + BLOCK_SIZE):
                col = W1[:, i]
                code = encode_e2m1((col * r).clamp(-E2M1_MAX, E2M1_MAX))
                codes[:, c0 + i] = code
                q = (decode_e2m1(code) * bs) * s
                err = (col - q) / Hinv1[i, i]
                W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
        W[:, c1:] -= Err1 @ Hinv[c0:c1, c1:]
    return codes, scales.view(torch.float8_e4m3fn)


def quantize_weight(
    w: torch.Tensor,
    encoder: str = DEFAULT_WEIGHT_ENCODER,
    *,
    hessian: torch.Tensor | None = None,
    damp: float = 0.01,
) -> NVFP4Tensor:
    """Encode a weight ``w [..., K]`` to NVFP4 with the named encoder; the result decodes with :func:`dequantize`.

    Encoders (:data:`WEIGHT_ENCODERS`), all with the standard global scale ``amax(|w|) / 2688``:

    * ``"standard"``: :func:`quantize`, bit for bit.
    * ``"scale-search"``: per 16-element block, the E4M3 scale among the standard one and its neighbours
      (:data:`SCALE_SEARCH_STEPS` codes away) whose dequantized block has the lowest squared error; elements are
      rounded as :func:`quantize` rounds them for that scale. No block's squared error exceeds the standard
      encoder's.
    * ``"gptq"``: error-compensated rounding for a linear weight ``[N, K]`` that minimises
      ``tr((W - Q) H (W - Q)^T)`` with ``H = sum x^T x`` over calibration inputs ``x [.., K]`` of the layer
      (``hessian``, float, ``[K, K]``, symmetric positive semi-definite); ``damp * mean(diag H)`` is added to the
      diagonal. Block scales by the scale search, chosen on the weights as compensated so far, each column's
      squared error weighted by what the compensation cannot remove of it.

    Raises:
        ValueError: unknown encoder, ``K % 16 != 0``, ``"gptq"`` without a ``[K, K]`` hessian or for a weight that
            is not 2-D, a non-finite hessian, a negative ``damp``.
        NonFiniteError: ``w`` contains NaN or Inf (as :func:`quantize`).
        TypeError: ``w`` is not a float32/float16/bfloat16 tensor.
    """
    check_weight_encoder(encoder)
    if encoder == "standard":
        return quantize(w)
    check_float_input(w, "NVFP4 weight")
    K = w.shape[-1]
    check_k(K)
    xf = w.detach().to(torch.float32)
    s = global_scale_from_amax(xf.abs().amax()) if xf.numel() else torch.ones((), device=w.device)
    lead = tuple(w.shape[:-1])
    if encoder == "scale-search":
        xb = xf.reshape(*lead, K // BLOCK_SIZE, BLOCK_SIZE)
        codes, b8 = _search_block_scales(xb, s, _standard_block_scales(xb, s))
        codes = codes.reshape(*lead, K)
    else:
        if w.dim() != 2:
            raise ValueError(f"the 'gptq' encoder needs a 2-D linear weight [N, K], got shape {tuple(w.shape)}")
        if hessian is None:
            raise ValueError(
                "the 'gptq' encoder needs hessian=[K, K] (sum of x^T x over calibration inputs of the layer)"
            )
        if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (K, K):
            raise ValueError(f"hessian must be a [{K}, {K}] tensor, got {tuple(getattr(hessian, 'shape', ()))}")
        if not bool(torch.isfinite(hessian).all()):
            raise ValueError("hessian must be finite")
        if not (damp >= 0 and math.isfinite(damp)):
            raise ValueError(f"damp must be finite and >= 0, got {damp!r}")
        if not bool(xf.any()):  # all zero (or empty): nothing to compensate, zero codes as quantize gives them
            return quantize(w)
        codes, b8 = _gptq_encode(xf, s, hessian, damp, search=True)
    return NVFP4Tensor(data=pack_codes(codes), block_scales=b8, global_scale=s, shape=w.shape, orig_dtype=w.dtype)
