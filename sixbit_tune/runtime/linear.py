"""``MixedPrecisionLinear``: an in-block ``nn.Linear`` replaced by its quantized encodings.

A layer in mode ``"nvfp4"`` or ``"int8"`` keeps one encoding; a ``"dynamic"`` layer keeps both and
runs the one named by :attr:`MixedPrecisionLinear.fmt`, which the runtime's block hook sets before the block
runs (DMPQ decisions are made once per denoising step, on the host). Activations are quantized at every call;
weights once, at construction.

The original ``nn.Linear`` is held (not registered as a submodule, so it is absent from ``state_dict()`` and
``parameters()`` of the model) to be put back bit-exactly by :meth:`restore`. Its weight can be parked on the CPU
while the quantized layer serves (``original_weight="cpu"``), so the model's device memory holds only the
quantized encodings; the ``Parameter`` object stays the same and comes back unchanged.

``torch.compile``: a static layer's forward is one call into the backend and is traced like any module. A dynamic
layer branches on a Python attribute that changes from step to step; it goes through a
``torch.compiler.disable``-d function so a compiled block graph-breaks around it instead of recompiling for every
combination of formats.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from sixbit_tune.formats import weight_bytes
from sixbit_tune.runtime._backend import Backend

__all__ = ["MixedPrecisionLinear"]


def _map_tensors(obj: Any, fn) -> Any:
    """Apply ``fn`` to every tensor inside a quantized-weight object (tensor, tuple/list, dict, dataclass)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {
            f.name: _map_tensors(getattr(obj, f.name), fn)
            for f in dataclasses.fields(obj)
            if f.init and isinstance(getattr(obj, f.name), torch.Tensor | tuple | list | dict)
        }
        return dataclasses.replace(obj, **changes)
    return obj


class MixedPrecisionLinear(nn.Module):
    """A linear layer running W4A4 NVFP4 or W8A8 INT8 (see the module docstring).

    Args:
        original: the ``nn.Linear`` being replaced (kept for :meth:`restore`).
        mode: ``"nvfp4"``, ``"int8"`` or ``"dynamic"``.
        backend: where the quantized linear runs.
        initial_format: the format a dynamic layer runs until told otherwise (the policy's first-step format).
        original_weight: ``"keep"`` leaves the original weight where it is; ``"cpu"`` moves its data to the CPU
            while this layer is installed.

    Attributes:
        fmt: the format the next call runs in.
        formats: the formats whose encodings this layer holds.
    """

    def __init__(
        self,
        original: nn.Linear,
        mode: str,
        backend: Backend,
        initial_format: str = "int8",
        original_weight: str = "keep",
        nvfp4_encoder: str = "standard",
        nvfp4_hessian: torch.Tensor | None = None,
    ):
        super().__init__()
        if mode not in ("nvfp4", "int8", "dynamic"):
            raise ValueError(f"MixedPrecisionLinear mode must be 'nvfp4', 'int8' or 'dynamic', got {mode!r}")
        if original_weight not in ("keep", "cpu"):
            raise ValueError(f"original_weight must be 'keep' or 'cpu', got {original_weight!r}")
        self.in_features = original.in_features
        self.out_features = original.out_features
        self.mode = mode
        self.formats: tuple[str, ...] = ("nvfp4", "int8") if mode == "dynamic" else (mode,)
        self.fmt = initial_format if mode == "dynamic" else mode
        self._backend = backend
        self._original = (original,)  # a tuple: not registered as a submodule
        # The bias Parameter itself is shared (same object, same state_dict key as before).
        self.bias = original.bias
        w = original.weight.detach()
        self.qweights: dict[str, Any] = {
            f: backend.quantize_weight(w, f, nvfp4_encoder, nvfp4_hessian) for f in self.formats
        }
        self._weight_home: torch.device | None = None
        if original_weight == "cpu" and w.device.type != "cpu":
            self._weight_home = w.device
            original.weight.data = original.weight.data.to("cpu")

    @property
    def original(self) -> nn.Linear:
        """The ``nn.Linear`` this layer replaced."""
        return self._original[0]

    def weight_bytes(self) -> dict[str, int]:
        """Storage bytes of each held encoding (``formats.weight_bytes``: scales included)."""
        return {f: weight_bytes(f, self.out_features, self.in_features) for f in self.formats}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "dynamic":
            return self._dynamic_forward(x)
        return self._backend.linear(x, self.qweights[self.fmt], self.bias, self.fmt, x.dtype)

    @torch.compiler.disable
    def _dynamic_forward(self, x: torch.Tensor) -> torch.Tensor:
        fmt = self.fmt
        return self._backend.linear(x, self.qweights[fmt], self.bias, fmt, x.dtype)

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .half() etc. reach the quantized encodings (moves only: integer, fp8 and float32-scale
        # tensors keep their dtypes) and the held original weight (moved and cast like the rest of the model, so
        # restore() gives back a layer consistent with the model; a weight parked on the CPU stays there).
        super()._apply(fn, recurse)

        def move(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(out.device)

        self.qweights = {f: _map_tensors(q, move) for f, q in self.qweights.items()}
        weight = self.original.weight
        with torch.no_grad():
            if self._weight_home is not None:  # parked: learn where fn sends it from an empty probe, stay on the CPU
                probe = fn(weight.data[:0])
                self._weight_home = probe.device
                weight.data = weight.data.to(dtype=probe.dtype)
            else:
                weight.data = fn(weight.data)
        return self

    def restore(self) -> nn.Linear:
        """The original ``nn.Linear``, its weight back on the device it was parked away from."""
        original = self.original
        if self._weight_home is not None:
            original.weight.data = original.weight.data.to(self._weight_home)
            self._weight_home = None
        return original

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, "
            f"formats={self.formats}, bias={self.bias is not None}"
        )
