"""Build policies from a model's adapter: every in-block linear static, or dynamic from fitted predictors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sixbit_tune import policy as _policy
from sixbit_tune import routes as _routes
from sixbit_tune.errors import PolicyError
from sixbit_tune.models.adapters import get_adapter
from sixbit_tune.runtime.apply import _model_device, device_target

__all__ = ["make_dynamic_policy", "make_static_policy"]


_V1_FIRST = {_routes.FAST_FORMAT: "fast", _routes.ROBUST_FORMAT: "robust"}


def _model_info(adapter, spec: str | None) -> _policy.ModelInfo:
    return _policy.ModelInfo(
        cls=type(adapter.transformer).__name__,
        family=adapter.family.name,
        config_hash=adapter.config_hash(),
        blocks=len(adapter.blocks()),
        spec=spec,
    )


def _target(adapter, target: _policy.Target | None) -> _policy.Target:
    return target if target is not None else device_target(_model_device(adapter.transformer))


def _check_weight(weight: str, key: str, what: str) -> None:
    if weight not in _routes.WEIGHT_FORMATS:
        raise PolicyError(f"{what} must be one of {list(_routes.WEIGHT_FORMATS)}, got {weight!r}", key=key)


Line = tuple[float, float, float | None, int | None]


def make_static_policy(
    model: Any,
    fmt: str,
    tdc_tolerance: float = 0.0,
    *,
    mode: str = "fast",
    fast: str | None = None,
    robust: str | None = None,
    target: _policy.Target | None = None,
    spec: str | None = None,
    provenance: _policy.Provenance | None = None,
    **tdc_options: Any,
) -> _policy.Policy:
    """A policy storing every in-block linear of ``model`` in one format and running one route.

    Args:
        model: a diffusers pipeline or transformer of a supported family.
        fmt: the stored weight format, one of ``sixbit_tune.routes.WEIGHT_FORMATS`` (``"none"`` with a
            tolerance > 0 = TDC alone).
        tdc_tolerance: the TDC tolerance δ (0 = never skip).
        mode: ``"fast"`` or ``"robust"``: the route every layer runs (e.g. ``fmt="nvfp4", mode="robust"``: NVFP4
            weights, INT8 activations).
        fast, robust: the routes' activation formats (default: the weight's ``sixbit_tune.routes.DEFAULT_ROUTES``).
        target: the target to record; default: the device the model is on now.
        spec: the model spec to record in ``model.spec``.
        provenance: default: a fresh ``Provenance()`` (now, this tool version).
        **tdc_options: other ``TDC`` fields (``warmup``, ``cooldown``, ``max_skips``, ``cache_dtype``,
            ``extrapolate``, ``refresh_robust``, ``blocks``); their defaults are ``TDC``'s.

    Raises:
        PolicyError: an invalid format, mode or route, or (nvfp4) an in-block linear whose in_features is not a
            multiple of 16.
    """
    _check_weight(fmt, "dmpq.layers", "the stored weight format")
    if mode not in _routes.ROUTE_ROLES:
        raise PolicyError(f"static mode must be 'fast' or 'robust', got {mode!r}", key="dmpq.layers")
    return make_dynamic_policy(
        model, {}, 0.0, other_layers=fmt, other_mode=mode, other_routes=(fast, robust), tdc_tolerance=tdc_tolerance,
        target=target, spec=spec, provenance=provenance, **tdc_options,
    )


def make_dynamic_policy(
    model: Any,
    predictors: Mapping[str, Line | Mapping[str, Line]],
    threshold: float,
    *,
    first_step_format: str = "robust",
    weight: str = "nvfp4",
    fast: str | None = None,
    robust: str | None = None,
    other_layers: str = "int8",
    other_mode: str = "fast",
    other_routes: tuple[str | None, str | None] = (None, None),
    encoder: str = "standard",
    attention: _policy.Attention | None = None,
    tdc_tolerance: float = 0.0,
    target: _policy.Target | None = None,
    spec: str | None = None,
    provenance: _policy.Provenance | None = None,
    **tdc_options: Any,
) -> _policy.Policy:
    """A DMPQ policy: layers with a predictor are ``"dynamic"`` over a ``weight``-stored weight, every other
    in-block linear stores ``other_layers`` and runs its ``other_mode`` route.

    Args:
        model: a diffusers pipeline or transformer of a supported family.
        predictors: full layer name -> the fast route's error predictor ``out_err ≈ alpha·Γ_{t−1} + beta``: one
            line ``(alpha, beta, r2, n)`` (pooled over the guidance branches), or a mapping from guidance branch
            (or ``"pooled"``) to such a line.
        threshold: τ (may be ±inf).
        first_step_format: the route of dynamic layers at the first step: ``"fast"``/``"robust"`` (or their
            version-1 names ``"nvfp4"``/``"int8"``).
        weight, fast, robust: the stored format and the two routes' activation formats of the dynamic layers
            (default: NVFP4, W4A4 fast, W4A8 robust).
        other_layers: stored format of layers without a predictor (``"none"``: left unquantized).
        other_mode, other_routes: the route those layers run, and their (fast, robust) activation formats.
        encoder: the NVFP4 weight encoder (``dmpq.nvfp4_weight_encoder``).
        attention: the attention section (None: the model's own attention).
        tdc_tolerance, target, spec, provenance, **tdc_options: as in :func:`make_static_policy`.

    Raises:
        PolicyError: a predictor names a layer the model does not have, or a value is invalid.
    """
    _check_weight(other_layers, "dmpq.layers", "other_layers")
    _check_weight(weight, "dmpq.layers", "weight")
    first = _V1_FIRST.get(first_step_format, first_step_format)
    adapter = get_adapter(model)
    linears = adapter.all_linears()
    unknown = sorted(set(predictors) - set(linears))
    if unknown:
        raise PolicyError(f"predictors for layers the model does not have: {unknown}", key="dmpq.layers")
    layers = {}
    for name, lin in linears.items():
        if name in predictors:
            layers[name] = _policy.LayerPolicy(
                weight, lin.in_features, lin.out_features, fast, robust, "dynamic", _lines(predictors[name]))
        else:
            layers[name] = _policy.LayerPolicy(other_layers, lin.in_features, lin.out_features, *other_routes,
                                               other_mode)
    return _policy.Policy(
        model=_model_info(adapter, spec),
        target=_target(adapter, target),
        dmpq=_policy.DMPQ(threshold=float(threshold), layers=layers, first_step=first, nvfp4_weight_encoder=encoder),
        attention=attention,
        tdc=_policy.TDC(tolerance=tdc_tolerance, **tdc_options),
        provenance=provenance or _policy.Provenance(),
    )


def _lines(pred: Line | Mapping[str, Line]) -> dict[str, tuple]:
    """Predictor lines by branch from one pooled line or a mapping of lines (values made plain floats/ints)."""
    items = pred.items() if isinstance(pred, Mapping) else (("pooled", pred),)
    out = {}
    for branch, (alpha, beta, r2, n) in items:
        out[branch] = (float(alpha), float(beta), None if r2 is None else float(r2), None if n is None else int(n))
    return out
