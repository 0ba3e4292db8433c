"""Build policies from a model's adapter: every in-block linear static, or dynamic from fitted predictors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sixbit_tune import policy as _policy
from sixbit_tune.errors import PolicyError
from sixbit_tune.models.adapters import get_adapter
from sixbit_tune.runtime.apply import _model_device, device_target

__all__ = ["make_dynamic_policy", "make_static_policy"]


_STATIC_MODES = ("int8", "nvfp4", "none")

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


def make_static_policy(
    model: Any,
    fmt: str,
    tdc_tolerance: float = 0.0,
    *,
    target: _policy.Target | None = None,
    spec: str | None = None,
    provenance: _policy.Provenance | None = None,
    **tdc_options: Any,
) -> _policy.Policy:
    """A policy running every in-block linear of ``model`` in one static mode.

    Args:
        model: a diffusers pipeline or transformer of a supported family.
        fmt: ``"int8"``, ``"nvfp4"`` or ``"none"`` (``"none"`` with a tolerance > 0 = TDC alone).
        tdc_tolerance: the TDC tolerance δ (0 = never skip).
        target: the target to record; default: the device the model is on now.
        spec: the model spec to record in ``model.spec``.
        provenance: default: a fresh ``Provenance()`` (now, this tool version).
        **tdc_options: other ``TDC`` fields (``warmup``, ``cooldown``, ``max_skips``, ``cache_dtype``,
            ``extrapolate``, ``refresh_robust``, ``blocks``); their defaults are ``TDC``'s.

    Raises:
        PolicyError: an invalid mode, or (nvfp4) an in-block linear whose in_features is not a multiple of 16.
    """
    if fmt not in _STATIC_MODES:
        raise PolicyError(f"static mode must be 'int8', 'nvfp4' or 'none', got {fmt!r}", key="dmpq.layers")
    return make_dynamic_policy(
        model, {}, 0.0, other_layers=fmt, tdc_tolerance=tdc_tolerance, target=target, spec=spec,
        provenance=provenance, **tdc_options,
    )


def make_dynamic_policy(
    model: Any,
    predictors: Mapping[str, tuple[float, float, float | None, int | None]],
    threshold: float,
    *,
    first_step_format: str = "int8",
    other_layers: str = "int8",
    tdc_tolerance: float = 0.0,
    target: _policy.Target | None = None,
    spec: str | None = None,
    provenance: _policy.Provenance | None = None,
    **tdc_options: Any,
) -> _policy.Policy:
    """A DMPQ policy: layers with a predictor are ``"dynamic"``, every other in-block linear ``other_layers``.

    Args:
        model: a diffusers pipeline or transformer of a supported family.
        predictors: full layer name -> ``(alpha, beta, r2, n)`` of the NVFP4 error predictor
            ``out_err ≈ alpha·Γ_{t−1} + beta``.
        threshold: τ (may be ±inf).
        first_step_format: format of dynamic layers at the first step.
        other_layers: mode of layers without a predictor (``"int8"``, ``"nvfp4"`` or ``"none"``).
        tdc_tolerance, target, spec, provenance, **tdc_options: as in :func:`make_static_policy`.

    Raises:
        PolicyError: a predictor names a layer the model does not have, or a value is invalid.
    """
    if other_layers not in _STATIC_MODES:
        raise PolicyError(f"other_layers must be 'int8', 'nvfp4' or 'none', got {other_layers!r}", key="dmpq.layers")
    adapter = get_adapter(model)
    linears = adapter.all_linears()
    unknown = sorted(set(predictors) - set(linears))
    if unknown:
        raise PolicyError(f"predictors for layers the model does not have: {unknown}", key="dmpq.layers")
    layers = {}
    for name, lin in linears.items():
        if name in predictors:
            alpha, beta, r2, n = predictors[name]
            layers[name] = _policy.LayerPolicy(
                "dynamic", lin.in_features, lin.out_features, float(alpha), float(beta),
                None if r2 is None else float(r2), None if n is None else int(n),
            )
        else:
            layers[name] = _policy.LayerPolicy(other_layers, lin.in_features, lin.out_features)
    return _policy.Policy(
        model=_model_info(adapter, spec),
        target=_target(adapter, target),
        dmpq=_policy.DMPQ(threshold=float(threshold), layers=layers, first_step_format=first_step_format),
        tdc=_policy.TDC(tolerance=tdc_tolerance, **tdc_options),
        provenance=provenance or _policy.Provenance(),
    )
