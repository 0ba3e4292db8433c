"""Per-row block and layer statistics (Γ, Δ, the change of Δ, layer errors), computed on the device. Imports torch only.

The profiling hooks and the runtime (TDC) both compute their statistics with these functions, so a threshold
fitted on profiled numbers means the same thing at inference.

Conventions shared by every function here:

* Dimension 0 is the batch row (one row = one (prompt, guidance branch)); every other dimension is reduced.
* Inputs may be any floating dtype; all arithmetic runs in float32 and the results are float32 tensors of shape
  ``[B]`` on the inputs' device. Nothing here synchronises with the host (no ``.item()``, no data-dependent Python
  branching), so the functions are safe inside ``torch.compile`` and inside CUDA graphs.
* Degenerate ratios are defined, never NaN: ``0/0 -> 0`` and ``x/0 -> inf`` for ``x > 0``. A cosine with a
  zero-norm operand is ``1`` when both operands are zero and ``0`` otherwise. NaN or Inf in the *inputs*
  propagates to the result (the caller checks finiteness once per step on the host).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

__all__ = ["Compiled", "block_stats", "delta_change", "rel_l2_rows", "safe_ratio", "stream_delta"]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """View ``t`` as ``[B, -1]`` float32 (a copy only when the dtype differs or the layout forces one)."""
    return t.reshape(t.shape[0], -1).float()


def safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with ``0/0 -> 0`` (and ``x/0 -> inf`` for ``x > 0``, as IEEE division gives)."""
    return torch.where((num == 0) & (den == 0), torch.zeros_like(num), num / den)


def stream_delta(x_streams: Sequence[torch.Tensor], y_streams: Sequence[torch.Tensor]) -> torch.Tensor:
    """The residual update Δ = Y − X of a block, float32, one flattened row per batch row.

    Dual-stream blocks pass both streams; their per-row deltas are concatenated (hidden first, in the order
    given), which is how dual-stream blocks are measured: both streams concatenated along tokens.

    Args:
        x_streams: the block's input streams, each ``[B, ...]`` (cloned before the block ran).
        y_streams: the block's output streams, same shapes and order.

    Returns:
        ``[B, N]`` float32, ``N`` = the total number of elements per row over all streams.
    """
    _check_streams(x_streams, y_streams)
    parts = [_rows(y) - _rows(x) for x, y in zip(x_streams, y_streams)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def block_stats(
    x_streams: Sequence[torch.Tensor],
    y_streams: Sequence[torch.Tensor],
    delta: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Γ and ‖Δ‖ of one block call, per batch row.

    ``gamma`` = Σ|Y − X| / Σ|X| and ``delta_norm`` = sqrt(Σ (Y − X)²), the sums running over every stream and
    every element of the row.

    Args:
        x_streams: input streams, each ``[B, ...]``.
        y_streams: output streams, same shapes.
        delta: optional precomputed ``stream_delta(x_streams, y_streams)`` (saves one pass over the data).

    Returns:
        ``{"gamma": [B], "delta_norm": [B]}``, float32.
    """
    if delta is None:
        delta = stream_delta(x_streams, y_streams)
    else:
        _check_streams(x_streams, y_streams)
    l1_x = sum(_rows(x).abs().sum(dim=1) for x in x_streams)
    l1_d = delta.abs().sum(dim=1)
    return {"gamma": safe_ratio(l1_d, l1_x), "delta_norm": torch.linalg.vector_norm(delta, dim=1)}


def delta_change(delta: torch.Tensor, prev_delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How much a block's residual update changed since the previous step, per row.

    Args:
        delta: Δ_t, ``[B, ...]``.
        prev_delta: Δ_{t−1}, same shape.

    Returns:
        ``(change, cos)``: ``change`` = ‖Δ_t − Δ_{t−1}‖₂ / ‖Δ_{t−1}‖₂, ``cos`` = ⟨Δ_t, Δ_{t−1}⟩ / (‖Δ_t‖₂‖Δ_{t−1}‖₂),
        both ``[B]`` float32.
    """
    if delta.shape != prev_delta.shape:
        raise ValueError(f"delta {tuple(delta.shape)} and prev_delta {tuple(prev_delta.shape)} differ in shape")
    a, b = _rows(delta), _rows(prev_delta)
    change = safe_ratio(torch.linalg.vector_norm(a - b, dim=1), torch.linalg.vector_norm(b, dim=1))
    na, nb = torch.linalg.vector_norm(a, dim=1), torch.linalg.vector_norm(b, dim=1)
    dot = (a * b).sum(dim=1)
    den = na * nb
    cos = torch.where(
        den > 0, dot / torch.where(den > 0, den, torch.ones_like(den)), ((na == 0) & (nb == 0)).float()
    )
    return change, cos


def rel_l2_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a − b‖₂ / ‖b‖₂ per row (``[B]`` float32; ``0`` when both rows are zero)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    ra, rb = _rows(a), _rows(b)
    return safe_ratio(torch.linalg.vector_norm(ra - rb, dim=1), torch.linalg.vector_norm(rb, dim=1))


def _check_streams(x_streams: Sequence[torch.Tensor], y_streams: Sequence[torch.Tensor]) -> None:
    if len(x_streams) == 0 or len(x_streams) != len(y_streams):
        raise ValueError(f"need the same non-zero number of input and output streams, got {len(x_streams)} "
                         f"and {len(y_streams)}")
    b = x_streams[0].shape[0]
    for i, (x, y) in enumerate(zip(x_streams, y_streams)):
        if x.shape != y.shape:
            raise ValueError(f"stream {i}: input {tuple(x.shape)} and output {tuple(y.shape)} differ in shape")
        if x.shape[0] != b:
            raise ValueError(f"stream {i} has {x.shape[0]} batch rows, stream 0 has {b}")


class Compiled:
    """``torch.compile(fn)`` that falls back to ``fn`` (eager, same numbers) if compilation fails; the reason is
    kept in :attr:`failed` and warned once. The profiler and the runtime fuse their statistics with it."""

    def __init__(self, fn: Callable):
        self.eager = fn
        self.compiled = torch.compile(fn)
        self.failed: str | None = None

    def __call__(self, *args):
        if self.failed is None:
            try:
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 - any compiler failure: the eager function is the spec
                self.failed = f"{type(e).__name__}: {e}"[:500]
                warnings.warn(f"torch.compile of {self.eager.__name__} failed, using eager: {self.failed}",
                              stacklevel=2)
        return self.eager(*args)
