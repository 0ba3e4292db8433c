"""From a trial's parameters (and the fitted predictors) to a policy, through the runtime's policy builders."""

from __future__ import annotations

import math
from typing import Any


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


def fit_lines(store, fit_id: str, dynamic: dict[str, tuple]) -> dict[str, Any]:
    """The predictor of each layer in ``dynamic`` (layer -> pooled ``(alpha, beta, r2, n)``) as a policy carries
    it: the per-branch lines ``{branch: (alpha, beta, r2, n)}`` where the fit chose per-branch lines (its
    settings' ``pooling_chosen`` and ``per_branch``), else the pooled line. A layer the per-branch record lacks
    keeps its pooled line."""
    import json

    if not dynamic:
        return {}
    df = store.predictors(fit_id)
    raw = df["settings"].iloc[0] if len(df) else None
    settings = json.loads(raw) if isinstance(raw, str) else (raw or {})
    per_branch = settings.get("per_branch") or {}
    if settings.get("pooling_chosen") != "per_branch":
        return dict(dynamic)
    out: dict[str, Any] = {}
    for name, pooled in dynamic.items():
        lines = {}
        for branch, f in (per_branch.get(name) or {}).items():
            alpha, beta, r2, n = f.get("alpha"), f.get("beta"), f.get("r2"), f.get("n")
            if not all(isinstance(v, int | float) and math.isfinite(v) for v in (alpha, beta)):
                continue  # a branch without a usable line: the others (or the pooled line) decide
            r2 = r2 if isinstance(r2, int | float) and math.isfinite(r2) else None
            lines[branch] = (alpha, beta, r2, n if isinstance(n, int) else None)
        out[name] = lines or pooled
    return out


def gptq_layers(policy) -> list[str]:
    """The NVFP4-stored layers of ``policy`` whose weight the ``"gptq"`` encoder encodes."""
    dmpq = policy.dmpq
    return [n for n, lp in dmpq.layers.items() if lp.weight == "nvfp4" and dmpq.encoder_of(n) == "gptq"]


def _dynamic_predictors(ctx) -> dict[str, Any]:
    """``fit_lines`` of the context's fit, read once per context."""
    cached = getattr(ctx, "_policy_lines", None)
    if cached is None:
        preds = ctx.predictors
        cached = fit_lines(ctx.store, preds.fit_id, preds.dynamic_layers())
        ctx._policy_lines = cached
    return cached


def attention_section(preds, threshold: float):
    """The policy's attention section at ``threshold`` from a fit's attention predictors
    (:func:`sixbit_tune.predictor.attention_predictors`): every block with a trusted predictor is ``"dynamic"``
    with its line (per guidance branch where the fit chose per-branch lines, else pooled); the other blocks keep the
    model's attention. None when no block has a trusted predictor."""
    from sixbit_tune import policy as P

    blocks = {}
    for b, lines in preds.blocks.items():
        if not preds.trusted.get(b):
            continue
        usable = {br: lf for br, lf in lines.items() if math.isfinite(lf.alpha) and math.isfinite(lf.beta)}
        if not usable:
            continue
        if preds.pooling != "per_branch":
            lf = next(iter(usable.values()))  # a pooled fit gives every branch the same line
            usable = {"pooled": lf}
        blocks[str(b)] = P.AttentionBlock("dynamic", {
            br: P.Line(float(lf.alpha), float(lf.beta), float(lf.r2) if math.isfinite(lf.r2) else None, int(lf.n))
            for br, lf in usable.items()})
    return P.Attention(float(threshold), preds.format, blocks) if blocks else None


def _attention_predictors(ctx):
    """The attention predictors of the context's fit, read once per context."""
    cached = getattr(ctx, "_attention_preds", None)
    if cached is None:
        from sixbit_tune.predictor import attention_predictors

        cached = ctx._attention_preds = attention_predictors(ctx.store, ctx.predictors.fit_id)
    return cached


def build_policy(ctx, params: dict, corner: str | None = None):
    """The policy of one trial (see :meth:`sixbit_tune.search.runner.SearchContext.build_policy`).

    Trusted layers are ``"dynamic"`` over one stored NVFP4 weight (fast W4A4, robust W4A8) with their predictor
    (per guidance branch where the fit chose per-branch lines: :func:`fit_lines`). The other layers (untrusted, or
    absent from the fit): with ``weights="mixed"`` they store the fit's ``untrusted_mode`` format and run its fast
    route; with ``weights="nvfp4"`` they store NVFP4 and run the robust route (W4A8). Corners:
    ``static_int8``/``static_nvfp4``/``static_nvfp4_robust`` (every layer static, no cache), ``dmpq_no_cache``
    (DMPQ at the trial's τ, TDC off). Every policy records the search's NVFP4 weight encoder. With ``attn_tau``
    among the parameters (a space with attention predictors), the blocks with trusted attention predictors choose
    8-bit attention per step at that threshold (:func:`attention_section`); the corners keep the model's attention.
    """
    from sixbit_tune.runtime import make_dynamic_policy

    preds = ctx.predictors
    config = ctx.config
    spec = config.model
    encoder = config.nvfp4_encoder
    if corner in _STATIC_CORNERS:
        fmt, mode = _STATIC_CORNERS[corner]
        if config.weights == "nvfp4" and fmt != "nvfp4":
            raise ValueError(f"corner {corner!r} stores {fmt}: not a corner of an NVFP4-stored search")
        return make_dynamic_policy(ctx.pipe, {}, 0.0, other_layers=fmt, other_mode=mode, encoder=encoder, spec=spec,
                                   **tdc_options(params))
    tolerance = 0.0 if corner == "dmpq_no_cache" else float(params["delta"])
    attention = None
    if "attn_tau" in params and corner is None:
        attention = attention_section(_attention_predictors(ctx), float(params["attn_tau"]))
    if config.weights == "nvfp4":
        other = {"other_layers": "nvfp4", "other_mode": "robust"}
    else:
        other = {"other_layers": preds.untrusted_mode}
    return make_dynamic_policy(
        ctx.pipe,
        _dynamic_predictors(ctx),
        float(params["tau"]),
        **other,
        encoder=encoder,
        tdc_tolerance=tolerance,
        spec=spec,
        attention=attention,
        **tdc_options(params),
    )


#: The static corners: (stored weight format, route every layer runs).
_STATIC_CORNERS = {
    "static_int8": ("int8", "fast"),
    "static_nvfp4": ("nvfp4", "fast"),
    "static_nvfp4_robust": ("nvfp4", "robust"),
}
