"""``MixedPrecisionLinear``: an in-block ``nn.Linear`` replaced by its one stored quantized encoding.

The weight is quantized once, at construction, into the layer's stored format (``weight``: ``"nvfp4"``, ``"int8"``
or ``"fp8"``); nothing else stays resident. A layer has a fast and a robust route (activation formats ``fast`` and
``robust`` over that weight, ``sixbit_tune.routes.ROUTES``). A route whose activation format is the stored one runs
the stored encoding; an NVFP4 weight on the INT8 or FP8 route is converted at call time into a scratch buffer the
backend shares between layers of the same shape (:meth:`sixbit_tune.runtime._backend.Backend.derive_weight`).
Activations are quantized at every call.

A ``"dynamic"`` layer runs the route named by :attr:`MixedPrecisionLinear.route`, which the runtime's block hook
sets before the block runs (DMPQ decisions are made once per denoising step, on the host), through the ``fmt``
attribute in ``sixbit_tune.rules``' names: ``rules.FAST_FORMAT`` selects the fast route, ``rules.ROBUST_FORMAT``
the robust one, whatever the routes' activation formats are. ``"fast"`` and ``"robust"`` layers always run that
route.

The tensors of the stored encoding are registered as non-persistent buffers (``qweight_0``, ``qweight_1``, … : absent
from ``state_dict()``), the very tensor objects :attr:`MixedPrecisionLinear.qweight` holds. Offloading that moves a
module's parameters and buffers in place (diffusers' group offload sets ``buffer.data``) therefore moves the
encoding too; ``.to()`` moves it without changing its dtypes.

The original ``nn.Linear`` is held (not registered as a submodule, so it is absent from ``state_dict()`` and
``parameters()`` of the model) to be put back bit-exactly by :meth:`restore`. Its weight can be parked on the CPU
while the quantized layer serves (``original_weight="cpu"``), so the model's device memory holds only the
quantized encodings; the ``Parameter`` object stays the same and comes back unchanged.

``torch.compile``: a static layer's forward is one call into the backend and is traced like any module (a derived
route then converts without the shared scratch buffer). A dynamic layer traces both routes into one
``torch.cond`` on a 0-dim boolean tensor that stays on the CPU (``route == "fast"``, updated in place whenever the
route is set): a compiled block holding dynamic layers is one graph, switching routes between steps neither
recompiles nor graph-breaks, and the compiled code reads the predicate on the host without waiting for the GPU.
The flag is a plain attribute, not a buffer, so ``.to()`` and offloading leave it on the CPU. Eager calls branch
in Python.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from sixbit_tune import routes as _routes
from sixbit_tune.formats import weight_bytes
from sixbit_tune.runtime._backend import Backend

__all__ = ["MixedPrecisionLinear"]

_QBUF = "qweight_"  # buffer-name prefix of the stored encoding's tensors


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


def _flat_tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors inside a quantized-weight object, in :func:`_map_tensors` order."""
    out: list[torch.Tensor] = []
    _map_tensors(obj, lambda t: out.append(t) or t)
    return out


def _with_tensors(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """``obj`` with its tensors replaced, in :func:`_map_tensors` order, by ``tensors``."""
    it = iter(tensors)
    return _map_tensors(obj, lambda _: next(it))


_ROLE_OF = {_routes.FAST_FORMAT: "fast", _routes.ROBUST_FORMAT: "robust", "fast": "fast", "robust": "robust"}


class MixedPrecisionLinear(nn.Module):
    """A linear layer storing its weight once and running one of two routes over it (see the module docstring).

    Args:
        original: the ``nn.Linear`` being replaced (kept for :meth:`restore`).
        mode: ``"dynamic"``, ``"fast"`` or ``"robust"``. The version-1 modes are accepted when ``weight`` is not
            given: ``"nvfp4"``/``"int8"`` (that weight, its fast route) and ``"dynamic"`` (an NVFP4 weight).
        backend: where the quantized linear runs.
        initial_format: the route a dynamic layer runs until told otherwise (the policy's first step), in the names
            the ``fmt`` attribute takes.
        original_weight: ``"keep"`` leaves the original weight where it is; ``"cpu"`` moves its data to the CPU
            while this layer is installed.
        nvfp4_encoder, nvfp4_hessian: the NVFP4 weight encoder (and its calibration statistics).
        weight: the stored format; ``fast``, ``robust``: the routes' activation formats (default: the weight's
            ``sixbit_tune.routes.DEFAULT_ROUTES``).

    Attributes:
        weight_format: the stored format (the ``weight`` argument). qweight: its encoding (the only one held).
        fast, robust: the routes' activation formats. mode: ``"dynamic"``, ``"fast"`` or ``"robust"``.
        route: ``"fast"`` or ``"robust"``, the route the next call runs.
    """

    def __init__(
        self,
        original: nn.Linear,
        mode: str,
        backend: Backend,
        initial_format: str = _routes.ROBUST_FORMAT,
        original_weight: str = "keep",
        nvfp4_encoder: str = "standard",
        nvfp4_hessian: torch.Tensor | None = None,
        *,
        weight: str | None = None,
        fast: str | None = None,
        robust: str | None = None,
    ):
        super().__init__()
        if weight is None:  # the version-1 modes
            if mode not in _routes.V1_LAYER_MODES or mode == "none":
                raise ValueError(f"MixedPrecisionLinear mode must be one of {_routes.LAYER_MODES} with weight=, or "
                                 f"'nvfp4', 'int8' or 'dynamic', got {mode!r}")
            weight, mode = ("nvfp4", "dynamic") if mode == "dynamic" else (mode, "fast")
        if weight not in _routes.QUANT_FORMATS:
            raise ValueError(f"MixedPrecisionLinear weight must be one of {_routes.QUANT_FORMATS}, got {weight!r}")
        if mode not in _routes.LAYER_MODES:
            raise ValueError(f"MixedPrecisionLinear mode must be one of {_routes.LAYER_MODES}, got {mode!r}")
        default_fast, default_robust = _routes.DEFAULT_ROUTES[weight]
        fast = default_fast if fast is None else fast
        robust = default_robust if robust is None else robust
        for act in (fast, robust):
            _routes.operand_format(weight, act)  # raises ValueError for a pair that is not a route
        if original_weight not in ("keep", "cpu"):
            raise ValueError(f"original_weight must be 'keep' or 'cpu', got {original_weight!r}")
        self.in_features = original.in_features
        self.out_features = original.out_features
        self.mode = mode
        self.weight_format = weight
        self.fast = fast
        self.robust = robust
        # The route as a CPU tensor, the predicate of the compiled dynamic forward (see the module docstring).
        self._fast_flag = torch.ones((), dtype=torch.bool)
        self.route = "fast" if mode == "fast" else "robust" if mode == "robust" else "fast"
        self.fmt = initial_format if mode == "dynamic" else mode
        self._backend = backend
        self._original = (original,)  # a tuple: not registered as a submodule
        # The bias Parameter itself is shared (same object, same state_dict key as before).
        self.bias = original.bias
        w = original.weight.detach()
        self.qweight: Any = backend.quantize_weight(w, weight, nvfp4_encoder, nvfp4_hessian)
        for i, t in enumerate(_flat_tensors(self.qweight)):
            self.register_buffer(f"{_QBUF}{i}", t, persistent=False)
        self._weight_home: torch.device | None = None
        if original_weight == "cpu" and w.device.type != "cpu":
            self._weight_home = w.device
            original.weight.data = original.weight.data.to("cpu")

    # ------------------------------------------------------------------------------------------------ routes
    @property
    def route(self) -> str:
        """``"fast"`` or ``"robust"``: the route the next call runs."""
        return self._route

    @route.setter
    def route(self, value: str) -> None:
        if value not in _routes.ROUTE_ROLES:
            raise ValueError(f"route must be one of {_routes.ROUTE_ROLES}, got {value!r}")
        if value != getattr(self, "_route", None):  # set before every block call: write the flag on a change only
            self._fast_flag.fill_(value == "fast")
        self._route = value

    @property
    def fmt(self) -> str:
        """The route the next call runs, in ``sixbit_tune.rules``' names (``FAST_FORMAT``: the fast route,
        ``ROBUST_FORMAT``: the robust one). Set it with those names or ``"fast"``/``"robust"``."""
        return _routes.FAST_FORMAT if self.route == "fast" else _routes.ROBUST_FORMAT

    @fmt.setter
    def fmt(self, value: str) -> None:
        role = _ROLE_OF.get(value)
        if role is None:
            raise ValueError(f"a route is selected with {sorted(_ROLE_OF)}, got {value!r}")
        if self.mode != "dynamic" and role != self.mode:
            raise ValueError(f"a {self.mode!r} layer runs its {self.mode} route only, not the {role} one")
        self.route = role

    @property
    def activation(self) -> str:
        """The activation format of the route the next call runs."""
        return self.fast if self.route == "fast" else self.robust

    @property
    def routes(self) -> tuple[_routes.Route, ...]:
        """The routes this layer can run (both for a dynamic layer)."""
        acts = (self.fast, self.robust) if self.mode == "dynamic" else (self.activation,)
        return tuple(dict.fromkeys(_routes.Route(self.weight_format, a) for a in acts))

    @property
    def formats(self) -> tuple[str, ...]:
        """The formats the GEMMs of this layer's routes run in (the stored one and any derived one)."""
        return tuple(dict.fromkeys(_routes.operand_format(*r) for r in self.routes))

    @property
    def qweights(self) -> dict[str, Any]:
        """The held encoding by format: the stored one only."""
        return {self.weight_format: self.qweight}

    @property
    def original(self) -> nn.Linear:
        """The ``nn.Linear`` this layer replaced."""
        return self._original[0]

    def weight_bytes(self) -> dict[str, int]:
        """Resident bytes of the held encoding, by its format (``formats.weight_bytes``: scales included)."""
        return {self.weight_format: weight_bytes(self.weight_format, self.out_features, self.in_features)}

    def scratch_shapes(self) -> set[tuple[str, int, int]]:
        """``(format, N, K)`` of the derived weight operands this layer's routes need (empty when none)."""
        return {(_routes.operand_format(*r), self.out_features, self.in_features)
                for r in self.routes if _routes.is_derived(*r)}

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != "dynamic":
            return self._run(x, self.activation)
        if self.fast == self.robust:
            return self._run(x, self.fast)
        if torch.compiler.is_compiling():
            return torch.cond(self._fast_flag, self._run_fast, self._run_robust, (x,))
        return self._run(x, self.activation)

    def _run_fast(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, self.fast)

    def _run_robust(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, self.robust)

    def _run(self, x: torch.Tensor, act: str) -> torch.Tensor:
        if act == self.weight_format:
            qweight = self.qweight
        else:
            qweight = self._backend.derive_weight(self.qweight, act, scratch=not torch.compiler.is_compiling())
        return self._backend.linear(x, qweight, self.bias, act, x.dtype)

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .half() etc. reach the quantized encodings (moves only: integer, fp8 and float32-scale
        # tensors keep their dtypes) and the held original weight (moved and cast like the rest of the model, so
        # restore() gives back a layer consistent with the model; a weight parked on the CPU stays there).
        # The encoding's buffers are moved here, not by nn.Module._apply, which would also cast their dtypes.
        names = [n for n in self._buffers if n.startswith(_QBUF)]
        held = [self._buffers.pop(n) for n in names]
        try:
            super()._apply(fn, recurse)
        finally:
            def move(t: torch.Tensor) -> torch.Tensor:
                out = fn(t)
                return out if out.dtype == t.dtype else t.to(out.device)

            moved = [move(t) for t in held]
            self._buffers.update(zip(names, moved))
            self.qweight = _with_tensors(self.qweight, moved)
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
            f"in_features={self.in_features}, out_features={self.out_features}, weight={self.weight_format}, "
            f"fast={self.fast}, robust={self.robust}, mode={self.mode}, bias={self.bias is not None}"
        )
