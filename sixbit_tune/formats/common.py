"""Checks shared by the format modules (kept apart from ``__init__`` to avoid import cycles)."""

from __future__ import annotations

import torch

from sixbit_tune.errors import NonFiniteError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_finite(x: torch.Tensor, what: str) -> None:
    """Raise if ``x`` holds a NaN or an Inf.

    Args:
        x: any tensor; integer and bool tensors are always finite and pass.
        what: a name for ``x`` that the error message carries (e.g. ``"activation of attn1.to_q"``).

    Raises:
        NonFiniteError: naming ``what`` and how many NaN and Inf values were found.
    """
    if not (x.is_floating_point() or x.is_complex()):
        return
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return
    n_nan = int(torch.isnan(x).sum())
    n_inf = int(torch.isinf(x).sum())
    raise NonFiniteError(
        f"{what} must be finite but contains {n_nan} NaN and {n_inf} Inf value(s) "
        f"(shape {tuple(x.shape)}, dtype {x.dtype})"
    )


def check_float_input(x: torch.Tensor, what: str, finite: bool = True) -> None:
    """Validate a quantizer input: a bf16/fp16/fp32 tensor with at least one dim, all finite (the NaN/Inf scan,
    which synchronizes with the device, is skipped when ``finite`` is False)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{what} must have at least one dimension (the reduction dim K), got a 0-d tensor")
    if finite:
        check_finite(x, what)


def ieee_div(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """``t / divisor`` as a correctly rounded IEEE float32 division on every device.

    PyTorch's CUDA kernels turn a division by a Python (CPU) scalar into a multiplication by its reciprocal, which
    rounds differently; a same-device tensor divisor keeps the true division that the formats specify.
    """
    return t / torch.full((), divisor, dtype=t.dtype, device=t.device)


def norm_axis(axis: int, ndim: int) -> int:
    """``axis`` as a non-negative index of a tensor with ``ndim`` dims; ValueError when out of range."""
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis={axis} is out of range for a tensor with {ndim} dim(s)")
    return axis % ndim


def slice_amax(x: torch.Tensor, axis: int, what: str, check: bool) -> tuple[torch.Tensor, int, torch.Tensor]:
    """``(float32 x, axis as an index, amax(|x|) over that axis)`` of a quantizer input, validated as
    :func:`check_float_input` does (``check``: the NaN/Inf scan). An empty axis has amax 0."""
    check_float_input(x, what, finite=check)
    ax = norm_axis(axis, x.dim())
    xf = x.detach().to(torch.float32)
    if xf.shape[ax] == 0:
        return xf, ax, xf.new_zeros(xf.shape[:ax] + xf.shape[ax + 1 :])
    return xf, ax, xf.abs().amax(dim=ax)
