"""From a trial's parameters (and the fitted predictors) to a policy, through the runtime's policy builders."""

from __future__ import annotations


def tdc_options(params: dict) -> dict:
    """The TDC knobs of a trial (the tolerance is passed separately); the cache knobs default to bf16, 0, 0 for
    trials of a version-1 space, which has none."""
    return {
        "warmup": int(params["warmup"]),
        "cooldown": int(params["cooldown"]),
        "max_skips": int(params["max_skips"]),
        "cache_dtype": str(params.get("cache_dtype", "bfloat16")),
        "extrapolate": int(params.get("extrapolate", 0)),
        "refresh_robust": int(params.get("refresh_robust", 0)),
    }


def build_policy(ctx, params: dict, corner: str | None = None):
    """The policy of one trial (see :meth:`sixbit_tune.search.runner.SearchContext.build_policy`).

    Trusted layers are ``"dynamic"`` with their predictor; untrusted ones (and any layer the fit lacks) run the
    fit's ``untrusted_mode`` statically. Corners: ``static_int8``/``static_nvfp4`` (every layer static, no cache),
    ``dmpq_no_cache`` (DMPQ at the trial's τ, TDC off).
    """
    from sixbit_tune.runtime import make_dynamic_policy, make_static_policy

    preds = ctx.predictors
    spec = ctx.config.model
    if corner in ("static_int8", "static_nvfp4"):
        return make_static_policy(ctx.pipe, corner.split("_", 1)[1], 0.0, spec=spec, **tdc_options(params))
    tolerance = 0.0 if corner == "dmpq_no_cache" else float(params["delta"])
    return make_dynamic_policy(
        ctx.pipe,
        preds.dynamic_layers(),
        float(params["tau"]),
        other_layers=preds.untrusted_mode,
        tdc_tolerance=tolerance,
        spec=spec,
        **tdc_options(params),
    )
