"""Running a transformer block on some batch rows only (the Temporal Delta Cache's per-row rule, ``tdc.cfg_rows =
"per_row"``): which block arguments carry the batch, how to take rows from them, and how to put the rows of a
block's output back together.

A block call's arguments are sorted by name:

* the streams (``hidden_states``, ``encoder_hidden_states``): batch-major, ``[B, tokens, ...]``; taken by rows;
* :data:`BATCH_MAJOR` arguments (the timestep embedding and attention masks of every supported family): their
  first dimension is the batch, or 1 (broadcast over it); taken by rows when it is ``B``;
* every other tensor, alone or inside a tuple or list (rotary embeddings: CogVideoX, Mochi and HunyuanVideo pass
  them per token, ``[tokens, ...]``, LTX-Video per row, ``[B, tokens, ...]``): taken by rows when its first
  dimension is ``B``, passed whole otherwise. When ``B`` also equals a stream's token count the first dimension
  could be either, and the call cannot be split (:class:`RowSplitRefused`);
* tensors inside a mapping (``attention_kwargs``): passed whole; one whose first dimension is ``B`` refuses the
  split (what it holds is not known);
* anything else (None, numbers, strings): passed whole.

Rows are taken as contiguous runs (``t[a:b]``, a view when there is one run), never with index tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

#: Block arguments whose first dimension is the batch (or 1) in every supported family.
BATCH_MAJOR = frozenset({"temb", "attention_mask", "encoder_attention_mask"})


class RowSplitRefused(Exception):
    """The call's arguments are not in the layout a row split needs; ``reason`` says why (recorded in the run's
    notes; the block then runs on every row, the joint rule)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def row_runs(rows: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted distinct row indices as contiguous ``(start, stop)`` runs: ``[0, 1, 3]`` -> ``[(0, 2), (3, 4)]``."""
    out: list[tuple[int, int]] = []
    for r in sorted(set(rows)):
        if out and out[-1][1] == r:
            out[-1] = (out[-1][0], r + 1)
        else:
            out.append((r, r + 1))
    return out


def take_rows(t: torch.Tensor, runs: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The rows ``runs`` of ``t`` along its first dimension (a view for one run)."""
    if len(runs) == 1:
        a, b = runs[0]
        return t[a:b]
    return torch.cat([t[a:b] for a, b in runs])


def put_rows(batch: int, parts: Sequence[tuple[Sequence[tuple[int, int]], torch.Tensor]]) -> torch.Tensor:
    """One ``[batch, ...]`` tensor from pieces ``(runs, rows)``: ``rows`` holds, in order, the rows of ``runs``;
    together the pieces' runs cover ``0 .. batch-1`` once. The values are copied unchanged."""
    first = parts[0][1]
    out = first.new_empty((batch, *first.shape[1:]))
    for runs, rows in parts:
        k = 0
        for a, b in runs:
            out[a:b] = rows[k : k + b - a]
            k += b - a
    return out


def split_call(
    names: Sequence[str | None],
    stream_names: Sequence[str],
    args: tuple,
    kwargs: dict,
    batch: int,
    runs: Sequence[tuple[int, int]],
) -> tuple[tuple, dict]:
    """The arguments of a block call restricted to the rows ``runs`` of its ``batch`` rows.

    Args:
        names: the name of each positional parameter of the block's ``forward`` (``self`` excluded), by position;
            None where unknown.
        stream_names: the block's stream arguments (``hidden_states``, ``encoder_hidden_states``).
        args, kwargs: the call's arguments.
        batch: the call's rows.
        runs: the rows to keep, as :func:`row_runs`.

    Raises:
        RowSplitRefused: a stream is not a ``[batch, ...]`` tensor, or a tensor's first dimension is ``batch`` where
            it cannot be told whether that is the batch (see the module docstring).
    """
    tokens = set()
    for name in stream_names:
        pos = list(names).index(name) if name in names else len(args)
        x = kwargs[name] if name in kwargs else args[pos] if pos < len(args) else None
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] != batch:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise RowSplitRefused(f"stream {name} is {shape}, not [{batch} rows, ...]")
        tokens.add(int(x.shape[1]))
    tokens.add(sum(tokens))

    def one(name: str | None, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if value.dim() == 0 or value.shape[0] != batch:
                if name in stream_names:
                    raise RowSplitRefused(f"stream {name} is {tuple(value.shape)}, not [{batch} rows, ...]")
                return value
            if name in stream_names or name in BATCH_MAJOR:
                return take_rows(value, runs)
            if batch in tokens:
                raise RowSplitRefused(
                    f"argument {name or '?'} is {tuple(value.shape)}: its first dimension {batch} is both the batch "
                    "and a stream's token count, so it cannot be told whether it holds rows or tokens"
                )
            return take_rows(value, runs)
        if isinstance(value, tuple | list):
            return type(value)(one(name, v) for v in value)
        if isinstance(value, Mapping):
            for k, v in value.items():
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
                    raise RowSplitRefused(
                        f"argument {name or '?'}[{k!r}] is {tuple(v.shape)}: a tensor with the batch's size inside a "
                        "mapping is not taken by rows"
                    )
        return value

    new_args = tuple(one(names[i] if i < len(names) else None, v) for i, v in enumerate(args))
    new_kwargs = {k: one(k, v) for k, v in kwargs.items()}
    return new_args, new_kwargs
