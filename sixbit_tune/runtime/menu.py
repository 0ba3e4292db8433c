"""A GPU's menu of routes, measured: how fast each route runs a model's in-block linears against the model's dtype.

:func:`linear_shapes` records the GEMM shapes ``(M, K, N)`` the in-block linears of a model see during one call
(``M``: the rows of the flattened activation), with how many layer calls have each. :func:`measure_menu` times, per
shape, the unquantized ``nn.Linear`` and a :class:`~sixbit_tune.runtime.linear.MixedPrecisionLinear` on every
route that runs on the device (each under ``torch.compile`` unless ``compile=False``, so a route's activation
quantizer and a derived weight operand's conversion are timed as a compiled block runs them), and gives each route
a :class:`~sixbit_tune.policy.MenuEntry`: its execution path, its throughput over all calls (TFLOP/s, ``2·M·K·N``
per call), and its speed against the unquantized layers (total unquantized time ÷ total route time, each shape
weighted by its call count). :meth:`MenuMeasurement.fastest` names the fastest of some routes for one shape: on
Hopper the fast 8-bit route may be FP8 or INT8, whichever measures faster there. :func:`choose_8bit_routes` puts a
measurement into a policy: the measured menu becomes ``target.menu``, and every layer on an 8-bit route takes the
faster of that route and its 8-bit alternative (:data:`EIGHT_BIT_ALTERNATIVES`) at the layer's shape.

Times are CUDA-event medians on a GPU and wall-clock medians elsewhere (CPU figures are for tests: the reference
numerics are not kernels).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from sixbit_tune import policy as _policy
from sixbit_tune import routes as _routes
from sixbit_tune.runtime._backend import Backend
from sixbit_tune.runtime.linear import MixedPrecisionLinear

__all__ = ["EIGHT_BIT_ALTERNATIVES", "MenuMeasurement", "choose_8bit_routes", "linear_shapes", "measure_menu"]

Shape = tuple[int, int, int]
#: The unquantized layer's key in :attr:`MenuMeasurement.per_shape`.
UNQUANTIZED = "none/none"


def linear_shapes(model: nn.Module, call: Callable[[], object]) -> dict[Shape, int]:
    """``(M, K, N) -> number of calls`` of the in-block linears of ``model`` (a pipeline or transformer of a
    supported family) during ``call()``, which runs the model once."""
    from sixbit_tune.models.adapters import get_adapter

    transformer = getattr(model, "transformer", model)
    counts: dict[Shape, int] = {}

    def hook(mod: nn.Module, args: tuple) -> None:
        x = args[0]
        k = int(x.shape[-1])
        m = x.numel() // max(1, k)
        shape = (m, k, int(mod.out_features))
        counts[shape] = counts.get(shape, 0) + 1

    handles = [lin.register_forward_pre_hook(hook) for lin in get_adapter(transformer).all_linears().values()]
    try:
        with torch.no_grad():
            call()
    finally:
        for h in handles:
            h.remove()
    return counts


@dataclass
class MenuMeasurement:
    """What :func:`measure_menu` measured.

    Attributes:
        device: the device name (the GPU's, or ``"cpu"``).
        menu: route key -> :class:`~sixbit_tune.policy.MenuEntry` (path, TFLOP/s, speed-up), for ``target.menu``.
        per_shape: ``(M, K, N)`` -> route key (and :data:`UNQUANTIZED`) -> median milliseconds of one call.
        counts: ``(M, K, N)`` -> calls per model call.
        failed: route key -> why it was not measured.
    """

    device: str
    menu: dict[str, _policy.MenuEntry] = field(default_factory=dict)
    per_shape: dict[Shape, dict[str, float]] = field(default_factory=dict)
    counts: dict[Shape, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def fastest(self, shape: Shape, routes: Iterable[str]) -> str:
        """The route among ``routes`` (keys) with the shortest time at ``shape``.

        Raises:
            KeyError: ``shape`` was not measured, or none of ``routes`` was.
        """
        times = self.per_shape[tuple(shape)]
        timed = [r for r in routes if r in times]
        if not timed:
            raise KeyError(f"none of {list(routes)} was measured at shape {tuple(shape)}")
        return min(timed, key=times.__getitem__)

    def to_json(self) -> dict:
        """A JSON-ready dict (shapes written ``"MxKxN"``)."""
        return {
            "device": self.device,
            "menu": {k: e.to_dict() for k, e in self.menu.items()},
            "per_shape": {"x".join(map(str, s)): t for s, t in self.per_shape.items()},
            "counts": {"x".join(map(str, s)): c for s, c in self.counts.items()},
            "failed": dict(self.failed),
        }


def _timer(device: torch.device, fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn()`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def measure_menu(
    shapes: Mapping[Shape, int],
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    *,
    routes: Iterable[str] | None = None,
    backend: Backend | None = None,
    compile: bool = True,
    warmup: int = 3,
    repeats: int = 10,
    progress: Callable[[str], None] | None = None,
) -> MenuMeasurement:
    """Time every route (default: every quantized route of ``sixbit_tune.routes.ROUTES``) at ``shapes`` on ``device``.

    Args:
        shapes: ``(M, K, N) -> calls`` (from :func:`linear_shapes`); layers get random weights and a bias.
        dtype: the model's dtype (activations, the unquantized layer).
        routes: route keys (``"<weight>/<activation>"``) to time.
        backend: where the quantized layers run (default ``Backend("auto")``).
        compile: time each layer under ``torch.compile`` (as compiled blocks run it).
        progress: called with a line per shape.

    Raises:
        ValueError: an unknown route, or no shapes.
    """
    device = torch.device(device)
    if not shapes:
        raise ValueError("measure_menu needs at least one (M, K, N) shape")
    keys = list(routes) if routes is not None else [r for r in _routes.all_route_keys() if not r.startswith("none")]
    parsed = [_routes.Route.parse(k) for k in keys]
    backend = backend or Backend("auto")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    out = MenuMeasurement(device=name, counts={tuple(s): int(c) for s, c in shapes.items()})
    gen = torch.Generator(device="cpu").manual_seed(0)
    for shape, count in out.counts.items():
        M, K, N = shape
        x = torch.randn(M, K, generator=gen).to(device, dtype)
        base = nn.Linear(K, N, bias=True)
        with torch.no_grad():
            base.weight.copy_(torch.randn(N, K, generator=gen) / math.sqrt(K))
            base.bias.copy_(torch.randn(N, generator=gen) * 0.01)
        base = base.to(device, dtype)
        layers: dict[str, nn.Module] = {UNQUANTIZED: base}
        for route in parsed:
            if route.key in out.failed:
                continue
            if route.weight == "nvfp4" and K % 16:
                continue  # NVFP4 needs K % 16 == 0: not a route at this shape
            try:
                layers[route.key] = MixedPrecisionLinear(base, "fast", backend, weight=route.weight,
                                                         fast=route.activation)
            except (RuntimeError, ValueError) as exc:
                out.failed[route.key] = f"{type(exc).__name__}: {exc}"
        times = {}
        for key, layer in layers.items():
            if compile:
                torch._dynamo.reset()  # each layer compiles afresh (no recompile limit reached across layers)
            fn = torch.compile(layer, dynamic=False) if compile else layer
            try:
                with torch.no_grad():
                    times[key] = _timer(device, lambda fn=fn, x=x: fn(x), warmup, repeats)
            except Exception as exc:  # a route that cannot run here (compiler or kernel error): recorded, not fatal
                if key == UNQUANTIZED:
                    raise
                out.failed[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        out.per_shape[shape] = times
        if progress is not None:
            progress(f"{M}x{K}x{N} (x{count}): " + ", ".join(f"{k} {v:.3f} ms" for k, v in times.items()))
    for route in parsed:
        if route.key in out.failed:
            continue
        both = [(s, t) for s, t in out.per_shape.items() if route.key in t]
        if not both:
            continue
        total = sum(t[route.key] * out.counts[s] for s, t in both)
        base_total = sum(t[UNQUANTIZED] * out.counts[s] for s, t in both)
        flops = sum(2.0 * s[0] * s[1] * s[2] * out.counts[s] for s, _ in both)
        op = _routes.operand_format(*route)
        out.menu[route.key] = _policy.MenuEntry(
            backend.path(op, device), tflops=flops / (total * 1e-3) / 1e12 if total > 0 else None,
            speedup=base_total / total if total > 0 else None)
    return out


#: 8-bit routes a layer may run in place of each other (same stored weight, or an INT8 weight for an FP8 one):
#: INT8 W8A8 and FP8 W8A8; over an NVFP4 weight, the W4A8 routes with an INT8 or an FP8 derived operand.
EIGHT_BIT_ALTERNATIVES: tuple[tuple[str, str], ...] = (("int8/int8", "fp8/fp8"), ("nvfp4/int8", "nvfp4/fp8"))


def _kn_times(measurement: MenuMeasurement) -> dict[tuple[int, int], dict[str, float]]:
    """``(K, N)`` -> route -> milliseconds per model call summed over the measured shapes with that ``K`` and ``N``
    (each shape's time times its calls); a route missing at one of those shapes is left out for that ``(K, N)``."""
    out: dict[tuple[int, int], dict[str, float]] = {}
    groups: dict[tuple[int, int], list[Shape]] = {}
    for shape in measurement.per_shape:
        groups.setdefault((shape[1], shape[2]), []).append(shape)
    for kn, shapes in groups.items():
        common = set.intersection(*(set(measurement.per_shape[s]) for s in shapes))
        out[kn] = {r: sum(measurement.per_shape[s][r] * measurement.counts.get(s, 1) for s in shapes)
                   for r in common}
    return out


def choose_8bit_routes(policy: _policy.Policy, measurement: MenuMeasurement) -> tuple[_policy.Policy, dict[str, int]]:
    """``policy`` with the measured menu and the faster 8-bit route at every layer.

    The menu's entries (execution path, TFLOP/s, speed-up) replace ``target.menu``'s for the routes measured. A
    layer whose route (either of a dynamic layer's two) is one of an :data:`EIGHT_BIT_ALTERNATIVES` pair runs the
    one of the pair with less time at the layer's ``(in_features, out_features)`` (over the measured ``M``, weighted
    by calls); an INT8- or FP8-stored layer then stores the chosen format. Layers whose shape was not measured, and
    W4A4 and unquantized routes, are left as they are.

    Returns:
        The new policy, and how many layers now run each 8-bit route (route key -> layers).
    """
    times = _kn_times(measurement)
    alternative = {a: pair for pair in EIGHT_BIT_ALTERNATIVES for a in pair}
    layers = {}
    chosen: dict[str, int] = {}
    for name, lp in policy.dmpq.layers.items():
        at = times.get((lp.in_features, lp.out_features), {})
        acts = {}
        picked = set()
        for role in _routes.ROUTE_ROLES:  # an INT8/FP8-stored layer has one route in both roles: one choice
            key = _routes.Route(lp.weight, getattr(lp, role)).key
            pair = alternative.get(key)
            if pair is not None and all(r in at for r in pair):
                key = min(pair, key=at.__getitem__)
                picked.add(key)
            route = _routes.Route.parse(key)
            weight, acts[role] = route.weight, route.activation
        for key in picked:
            chosen[key] = chosen.get(key, 0) + 1
        layers[name] = _policy.LayerPolicy(weight, lp.in_features, lp.out_features, acts["fast"], acts["robust"],
                                           lp.mode, lp.predictor, lp.encoder)
    d = policy.dmpq
    dmpq = _policy.DMPQ(d.threshold, layers, d.first_step, d.nvfp4_weight_encoder)
    target = policy.target
    target = _policy.Target(target.gpu, target.compute_capability, {**target.menu, **measurement.menu})
    return policy.replace(dmpq=dmpq, target=target), chosen
