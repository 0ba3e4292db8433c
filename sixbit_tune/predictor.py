"""The DMPQ predictor: per linear layer j, NVFP4 output error out_err_t ≈ α_j·Γ_{t−1} + β_j.

Every other route the profile recorded (``layer_steps.format``: ``"int8"``, ``"nvfp4/int8"``, ``"fp8"``, ...) gets
the same fit per (layer, route) (:attr:`FitResult.routes`), written beside the NVFP4 lines in ``predictors`` under
the same fit id; what policies are built from (the DMPQ rule's lines, trust, pooling) stays the NVFP4 fit.

Γ_{t−1} is the ``gamma`` of the layer's block at the previous step of the same (run, prompt, guidance branch);
out_err_t is the layer's NVFP4 ``out_err`` at step t. Every (run, prompt, branch, step ≥ 1) of the chosen profile
runs gives one pair; the fit is ordinary least squares on those pairs, with R² and n kept.

Guidance branches. Both fits are computed: *pooled* (one line per layer over both branches) and *per-branch* (one
line per layer and branch). The choice is made from the data by :func:`choose_pooling`: per-branch only when it
raises the median R² over layers by at least ``PER_BRANCH_MIN_GAIN``; otherwise the simpler pooled fit. The policy
schema (v1) holds one (α, β) per layer, so the policy always carries a pooled-form predictor; when the data says
per-branch would be better, ``fit`` says so loudly and records it (the comparison is kept in the fit's settings).

Trust. A layer's predictor drives the DMPQ rule only when it predicts the error well: ``n >= min_n`` and either
``R² >= min_r2`` (Γ explains the variation of the error) or the relative residual ``RMSE / mean(out_err) <=
max_rel_rmse`` (there is little variation to explain: e.g. cross-attention K/V projections of the fixed text
embedding have a nearly constant error, so R² is near 0 while α·Γ+β ≈ mean is an accurate prediction). An untrusted
layer gets the static mode ``untrusted_mode`` in every policy (default ``"int8"``: the robust format — the search
cannot tell when NVFP4 is safe for a layer whose error the predictor does not explain).

Attention. The same fit runs for the attention of each block: attn_err_t ≈ α·Γ_{t−1} + β, per attention format
recorded in ``attn_steps`` (``"fp8"``, ``"int8"``), with the same line fitting, pooling choice and trust verdict
(the block index plays the layer's part). :func:`fit_store` puts these fits in :attr:`FitResult.attention`,
:func:`write_fit` records them in ``attn_predictors`` under the same fit id (one row per block and branch: the
branch's own line when the fit chose per-branch lines, else the pooled line), and :func:`attention_predictors`
reads them back as ``{block: {branch: LineFit}}``.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from sixbit_tune.routes import V1_FORMATS

#: Per-branch fits are chosen only when they raise the median R² over layers by at least this much.
PER_BRANCH_MIN_GAIN = 0.05
#: var(Γ_{t−1}) below this (relative to mean(Γ)²) means Γ did not vary: the slope is undefined.
_VAR_EPS = 1e-12


@dataclass(frozen=True)
class FitSettings:
    """Settings of one fit (defaults are the CLI's defaults).

    Attributes:
        min_r2: a predictor with R² below this is not trusted.
        min_n: a predictor fitted on fewer pairs is not trusted.
        max_rel_rmse: a predictor with R² below ``min_r2`` is still trusted when its residual RMSE is at most this
            fraction of the mean error.
        pooling: ``"auto"`` (decide from the data), ``"pooled"`` or ``"per_branch"``.
        untrusted_mode: static mode of untrusted layers in policies: ``"int8"`` or ``"nvfp4"``.
        format: the format whose error is predicted (the paper predicts NVFP4).
    """

    min_r2: float = 0.5
    min_n: int = 8
    max_rel_rmse: float = 0.10
    pooling: str = "auto"
    untrusted_mode: str = "int8"
    format: str = "nvfp4"

    def __post_init__(self) -> None:
        if not (0.0 <= self.min_r2 <= 1.0):
            raise ValueError(f"min_r2 must lie in [0, 1], got {self.min_r2}")
        if not self.max_rel_rmse >= 0.0:
            raise ValueError(f"max_rel_rmse must be >= 0, got {self.max_rel_rmse}")
        if self.min_n < 2:
            raise ValueError(f"min_n must be >= 2 (a line needs two points), got {self.min_n}")
        if self.pooling not in ("auto", "pooled", "per_branch"):
            raise ValueError(f"pooling must be 'auto', 'pooled' or 'per_branch', got {self.pooling!r}")
        if self.untrusted_mode not in V1_FORMATS:
            raise ValueError(f"untrusted_mode must be one of {V1_FORMATS}, got {self.untrusted_mode!r}")


@dataclass(frozen=True)
class LineFit:
    """Least-squares line y ≈ alpha·x + beta over n points."""

    alpha: float
    beta: float
    r2: float
    n: int
    rmse: float = 0.0  # root mean squared residual
    mean_y: float = 0.0
    ss_tot: float = 0.0  # Σ (y − mean y)²

    @property
    def ss_res(self) -> float:
        """Σ residual²."""
        return self.rmse * self.rmse * self.n

    @property
    def rel_rmse(self) -> float:
        """Residual RMSE relative to mean(y) (inf when mean(y) is 0 and the residual is not)."""
        if self.mean_y == 0.0:
            return 0.0 if self.rmse == 0.0 else math.inf
        return self.rmse / abs(self.mean_y)

    def predict(self, x):
        return self.alpha * x + self.beta


def fit_line(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> LineFit:
    """Ordinary least squares of y on x, computed in float64 from centered sums.

    Degenerate cases are defined, never NaN: with fewer than 2 points or x constant the slope is 0 and the
    intercept mean(y), R² 0 (the predictor explains nothing); with y constant (and the fit exact) R² is 1.

    Raises:
        ValueError: x and y differ in length, or hold NaN/Inf.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length: {x.size} vs {y.size}")
    n = int(x.size)
    if n == 0:
        return LineFit(0.0, 0.0, 0.0, 0, 0.0, 0.0, 0.0)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("fit_line: x or y holds NaN/Inf")
    mx, my = float(x.mean()), float(y.mean())
    dx, dy = x - mx, y - my
    sxx, syy, sxy = float(dx @ dx), float(dy @ dy), float(dx @ dy)
    if n < 2 or sxx <= _VAR_EPS * max(mx * mx, 1e-30) * n:
        return LineFit(0.0, my, 1.0 if syy == 0.0 and n >= 2 else 0.0, n, math.sqrt(syy / n), my, syy)
    alpha = sxy / sxx
    beta = my - alpha * mx
    if syy == 0.0:
        return LineFit(alpha, beta, 1.0, n, 0.0, my, syy)
    resid = dy - alpha * dx
    ssr = float(resid @ resid)
    r2 = 1.0 - ssr / syy
    return LineFit(alpha, beta, max(0.0, min(1.0, r2)), n, math.sqrt(ssr / n), my, syy)


@dataclass(frozen=True)
class LayerFit:
    """The predictor of one layer (pooled form) plus its per-branch fits and trust verdict."""

    layer: str
    block_index: int
    pooled: LineFit
    per_branch: dict[str, LineFit]
    trusted: bool
    reason: str  # why it is not trusted ("" when trusted)


@dataclass
class FitResult:
    """Everything one fit produced."""

    fit_id: str
    run_ids: list[str]
    settings: FitSettings
    layers: dict[str, LayerFit]
    pooling: str  # the choice: "pooled" | "per_branch"
    pooling_evidence: dict = field(default_factory=dict)
    #: attention format -> the attention fit (keys of its ``layers``: the block index as text); empty when the
    #: profile runs recorded no attention errors
    attention: dict[str, FitResult] = field(default_factory=dict)
    #: route (``layer_steps.format``) -> the fit of that route's out_err, for every route recorded other than
    #: ``settings.format``; empty when the runs recorded no other route
    routes: dict[str, FitResult] = field(default_factory=dict)

    @property
    def trusted(self) -> dict[str, LayerFit]:
        return {k: v for k, v in self.layers.items() if v.trusted}

    @property
    def untrusted(self) -> dict[str, LayerFit]:
        return {k: v for k, v in self.layers.items() if not v.trusted}

    def r2_values(self) -> np.ndarray:
        return np.array([v.pooled.r2 for v in self.layers.values()], dtype=np.float64)

    def settings_json(self) -> dict:
        return {
            **dataclasses.asdict(self.settings),
            "pooling_chosen": self.pooling,
            "pooling_evidence": self.pooling_evidence,
        }


def _median(values: Iterable[float]) -> float:
    v = [x for x in values if math.isfinite(x)]
    return float(np.median(v)) if v else float("nan")


def choose_pooling(layers: dict[str, tuple[LineFit, dict[str, LineFit]]]) -> tuple[str, dict]:
    """Pooled or per-branch, from the data.

    Both are scored on the same scale: the fraction of the layer's *pooled* error variance they explain,
    ``1 − SS_res / SS_tot(pooled)`` (for per-branch fits, SS_res summed over the branches). Per-branch R² taken
    branch by branch would not be comparable: each branch has its own, smaller total variance, and a branch whose
    error is constant (e.g. the unconditional branch's text K/V projections) scores a vacuous R² of 1. Per-branch
    is chosen only when it raises the median over layers by at least :data:`PER_BRANCH_MIN_GAIN` (it has twice the
    parameters, so it never does worse).
    """
    pooled, split = [], []
    for p, branches in layers.values():
        if p.n < 2 or p.ss_tot <= 0.0:
            continue
        pooled.append(1.0 - p.ss_res / p.ss_tot)
        split.append(1.0 - sum(b.ss_res for b in branches.values()) / p.ss_tot)
    evidence = {
        "median_r2_pooled": _median(pooled),
        "median_r2_per_branch": _median(split),
        "mean_r2_pooled": float(np.mean(pooled)) if pooled else float("nan"),
        "mean_r2_per_branch": float(np.mean(split)) if split else float("nan"),
        "branches": sorted({b for _, br in layers.values() for b in br}),
        "layers_compared": len(pooled),
        "min_gain": PER_BRANCH_MIN_GAIN,
        "scale": "fraction of the pooled error variance explained",
    }
    gain = evidence["median_r2_per_branch"] - evidence["median_r2_pooled"]
    evidence["gain"] = gain if math.isfinite(gain) else None
    choice = "per_branch" if (math.isfinite(gain) and gain >= PER_BRANCH_MIN_GAIN) else "pooled"
    return choice, {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in evidence.items()}


# --------------------------------------------------------------------------------------------------------------
# Data access: the (Γ_{t−1}, out_err_t) pairs from the store.

PAIRS_SQL = """
SELECT l.layer, l.block_index, l.branch, l.run_id, l.prompt_index, l.step,
       b.gamma AS gamma_prev, l.out_err
FROM layer_steps AS l
JOIN block_steps AS b
  ON b.run_id = l.run_id AND b.prompt_index = l.prompt_index AND b.branch = l.branch
 AND b.block_index = l.block_index AND b.step = l.step - 1
WHERE l.format = ? AND l.run_id IN (SELECT unnest(?::VARCHAR[]))
ORDER BY l.layer, l.branch, l.run_id, l.prompt_index, l.step
"""


def distrust(line: LineFit, settings: FitSettings) -> list[str]:
    """Why ``line`` may not drive a rule (empty: trusted): fewer than ``min_n`` pairs, or an R² below ``min_r2``
    with a residual above ``max_rel_rmse`` of the mean error."""
    reasons = []
    if line.n < settings.min_n:
        reasons.append(f"n={line.n} < {settings.min_n}")
    if line.r2 < settings.min_r2 and line.rel_rmse > settings.max_rel_rmse:
        reasons.append(
            f"R²={line.r2:.3f} < {settings.min_r2} and residual {100 * line.rel_rmse:.1f}% of the mean "
            f"error > {100 * settings.max_rel_rmse:.0f}%"
        )
    return reasons


def fit_pairs(pairs, run_ids: Sequence[str], settings: FitSettings = FitSettings(), fit_id: str | None = None) -> FitResult:
    """Fit every layer from a table of pairs (columns as :data:`PAIRS_SQL` returns; a pandas DataFrame).

    Raises:
        ValueError: no pairs at all (the profile recorded no NVFP4 errors after the first step).
    """
    if len(pairs) == 0:
        raise ValueError(
            f"no (gamma_prev, {settings.format} out_err) pairs in runs {list(run_ids)}: profile with at least 2 steps "
            f"and the {settings.format} format recorded"
        )
    raw: dict[str, tuple[LineFit, dict[str, LineFit], int]] = {}
    for layer, g in pairs.groupby("layer", sort=True):
        pooled = fit_line(g["gamma_prev"].to_numpy(), g["out_err"].to_numpy())
        per = {
            str(br): fit_line(gb["gamma_prev"].to_numpy(), gb["out_err"].to_numpy())
            for br, gb in g.groupby("branch", sort=True)
        }
        raw[str(layer)] = (pooled, per, int(g["block_index"].iloc[0]))
    if settings.pooling == "auto":
        pooling, evidence = choose_pooling({k: (p, b) for k, (p, b, _) in raw.items()})
    else:
        _, evidence = choose_pooling({k: (p, b) for k, (p, b, _) in raw.items()})
        pooling = settings.pooling
    layers = {}
    for name, (pooled, per, block) in raw.items():
        reasons = distrust(pooled, settings)
        layers[name] = LayerFit(name, block, pooled, per, trusted=not reasons, reason="; ".join(reasons))
    return FitResult(
        fit_id=fit_id or f"fit-{uuid.uuid4().hex[:12]}",
        run_ids=list(run_ids),
        settings=settings,
        layers=layers,
        pooling=pooling,
        pooling_evidence=evidence,
    )


# --------------------------------------------------------------------------------------------------------------
# Reporting.


def r2_report(values: np.ndarray, bins: int = 10, width: int = 40) -> str:
    """Quantiles and a text histogram of R² values over [0, 1]."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return "R²: no layers"
    qs = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
    qv = np.quantile(v, qs)
    lines = [
        f"R² over {v.size} layers: " + "  ".join(f"q{int(q * 100):02d}={x:.3f}" for q, x in zip(qs, qv)),
    ]
    counts, edges = np.histogram(v, bins=bins, range=(0.0, 1.0))
    top = max(int(counts.max()), 1)
    for c, lo, hi in zip(counts, edges[:-1], edges[1:]):
        bar = "#" * int(round(width * c / top))
        lines.append(f"  [{lo:.1f}, {hi:.1f}{']' if hi >= 1.0 else ')'} {int(c):5d} {bar}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# The store side: which runs, fit, write.


def default_profile_runs(store, run_ids: Sequence[str] | None = None) -> list[str]:
    """The profile runs to fit: ``run_ids`` when given (checked), else every finished profile run of the model
    (config hash) of the latest finished profile run.

    Raises:
        ValueError: no finished profile run, unknown ids, or ids of different models.
    """
    runs = store.runs(kind="profile")
    if run_ids:
        run_ids = list(run_ids)
        known = set(runs["run_id"])
        missing = [r for r in run_ids if r not in known]
        if missing:
            raise ValueError(f"no profile runs {missing} in the store (known: {sorted(known)})")
        sel = runs[runs["run_id"].isin(run_ids)]
        if sel["config_hash"].nunique(dropna=False) > 1:
            raise ValueError(f"profile runs {run_ids} are of different models (config hashes differ)")
        return run_ids
    done = runs[runs["status"] == "finished"]
    if len(done) == 0:
        raise ValueError("the store has no finished profile run: run `sixbit-tune profile` first")
    latest = done.iloc[-1]
    same = done[done["config_hash"] == latest["config_hash"]] if latest["config_hash"] is not None else done.iloc[-1:]
    return [str(r) for r in same["run_id"]]


def load_pairs(store, run_ids: Sequence[str], fmt: str = "nvfp4"):
    """The (Γ_{t−1}, out_err_t) pairs of ``run_ids`` as a pandas DataFrame (:data:`PAIRS_SQL`)."""
    return store.query(PAIRS_SQL, [fmt, list(run_ids)])


ATTN_PAIRS_SQL = """
SELECT a.block_index AS layer, a.block_index, a.branch, a.run_id, a.prompt_index, a.step,
       b.gamma AS gamma_prev, a.attn_err AS out_err
FROM attn_steps AS a
JOIN block_steps AS b
  ON b.run_id = a.run_id AND b.prompt_index = a.prompt_index AND b.branch = a.branch
 AND b.block_index = a.block_index AND b.step = a.step - 1
WHERE a.format = ? AND a.run_id IN (SELECT unnest(?::VARCHAR[]))
ORDER BY a.block_index, a.branch, a.run_id, a.prompt_index, a.step
"""
"""The (Γ_{t−1}, attn_err_t) pairs, in the columns of :data:`PAIRS_SQL` (``layer`` is the block index,
``out_err`` the attention error), so :func:`fit_pairs` fits them as it fits layers."""


def load_attention_pairs(store, run_ids: Sequence[str], fmt: str):
    """The (Γ_{t−1}, attn_err_t) pairs of ``run_ids`` for attention format ``fmt`` (:data:`ATTN_PAIRS_SQL`)."""
    return store.query(ATTN_PAIRS_SQL, [fmt, list(run_ids)])


def fit_attention(store, run_ids: Sequence[str], settings: FitSettings = FitSettings(),
                  fit_id: str | None = None) -> dict[str, FitResult]:
    """The attention predictors of ``run_ids``: one :class:`FitResult` per attention format recorded (its
    ``layers`` keyed by block index as text), each fitted by :func:`fit_pairs`. Formats with no pair (a single
    step, or errors recorded only on steps whose previous step has no Γ) are left out; no attention rows at all
    gives ``{}``. Trust is judged as for layers, on the lines the attention rule will use: the pooled line, or
    every branch's own line when the fit chose per-branch lines."""
    fmts = store.query(
        "SELECT DISTINCT format FROM attn_steps WHERE run_id IN (SELECT unnest(?::VARCHAR[])) ORDER BY format",
        [list(run_ids)],
    )["format"].tolist()
    out = {}
    for fmt in fmts:
        pairs = load_attention_pairs(store, run_ids, fmt)
        if not len(pairs):
            continue
        result = fit_pairs(pairs, run_ids, dataclasses.replace(settings, format=fmt), fit_id=fit_id)
        if result.pooling == "per_branch":
            # the rule then uses each branch's own line: the verdict is theirs (every branch must pass)
            for name, f in result.layers.items():
                reasons = [f"{br}: {r}" for br, line in sorted(f.per_branch.items()) for r in distrust(line, result.settings)]
                result.layers[name] = dataclasses.replace(f, trusted=not reasons, reason="; ".join(reasons))
        out[fmt] = result
    return out


def fit_routes(store, run_ids: Sequence[str], settings: FitSettings = FitSettings(),
               fit_id: str | None = None) -> dict[str, FitResult]:
    """One :class:`FitResult` per route the runs recorded in ``layer_steps`` other than ``settings.format``, in
    :data:`sixbit_tune.routes.PROFILE_ROUTES` order, each fitted by :func:`fit_pairs` (routes without a pair are
    left out)."""
    from sixbit_tune.routes import PROFILE_ROUTES

    recorded = set(store.query(
        "SELECT DISTINCT format FROM layer_steps WHERE run_id IN (SELECT unnest(?::VARCHAR[]))", [list(run_ids)],
    )["format"])
    out = {}
    for fmt in PROFILE_ROUTES:
        if fmt == settings.format or fmt not in recorded:
            continue
        pairs = load_pairs(store, run_ids, fmt)
        if len(pairs):
            out[fmt] = fit_pairs(pairs, run_ids, dataclasses.replace(settings, format=fmt), fit_id=fit_id)
    return out


def fit_store(store, run_ids: Sequence[str] | None = None, settings: FitSettings = FitSettings()) -> FitResult:
    """Fit every layer of the chosen profile runs (see :func:`default_profile_runs`), every other recorded route
    (:attr:`FitResult.routes`), and the attention of every block where the runs recorded attention errors
    (:attr:`FitResult.attention`), all under one fit id."""
    run_ids = default_profile_runs(store, run_ids)
    result = fit_pairs(load_pairs(store, run_ids, settings.format), run_ids, settings)
    result.routes = fit_routes(store, run_ids, settings, fit_id=result.fit_id)
    result.attention = fit_attention(store, run_ids, settings, fit_id=result.fit_id)
    return result


def write_fit(writer, result: FitResult) -> str:
    """Record a fit in the store's ``predictors`` table (one row per layer and route, pooled form: the fit's own
    format and every fit of :attr:`FitResult.routes`), and its attention fits in ``attn_predictors``
    (:func:`write_attention_fit`); returns the fit id.

    Every row carries the same settings: those of the fit's own format (its untrusted reasons and per-branch lines),
    and under ``"routes"`` a summary of each other route's fit (pooling chosen and its evidence, layers, trusted)."""
    rows = [
        {
            "layer": f.layer,
            "format": fit.settings.format,
            "alpha": f.pooled.alpha,
            "beta": f.pooled.beta,
            "r2": f.pooled.r2,
            "n": f.pooled.n,
            "trusted": f.trusted,
        }
        for fit in (result, *result.routes.values())
        for f in fit.layers.values()
    ]
    settings = result.settings_json()
    settings["untrusted"] = {f.layer: f.reason for f in result.layers.values() if not f.trusted}
    settings["per_branch"] = {
        f.layer: {b: dataclasses.asdict(lf) for b, lf in f.per_branch.items()} for f in result.layers.values()
    }
    if result.routes:
        settings["routes"] = {
            fmt: {"pooling_chosen": fit.pooling, "pooling_evidence": fit.pooling_evidence,
                  "layers": len(fit.layers), "trusted": len(fit.trusted)}
            for fmt, fit in result.routes.items()
        }
    fit_id = writer.write_predictors(rows, run_ids=result.run_ids, fit_id=result.fit_id, settings=settings)
    for att in result.attention.values():
        write_attention_fit(writer, att, fit_id)
    return fit_id


def write_attention_fit(writer, result: FitResult, fit_id: str) -> None:
    """Record one attention format's fit in ``attn_predictors``: per block, one row per branch with the line that
    branch uses (its own when the fit chose per-branch lines, else the pooled one) and the block's trust verdict.
    The fit's settings, pooling evidence and both forms of every line are kept in the rows' ``settings``."""
    per_branch = result.pooling == "per_branch"
    rows = []
    for f in result.layers.values():
        for branch, own in sorted(f.per_branch.items()):
            line = own if per_branch else f.pooled
            rows.append({
                "block_index": f.block_index, "branch": branch, "format": result.settings.format,
                "alpha": line.alpha, "beta": line.beta, "r2": line.r2, "n": line.n, "rmse": line.rmse,
                "mean_err": line.mean_y, "ss_tot": line.ss_tot, "pooled": not per_branch, "trusted": f.trusted,
            })
    settings = result.settings_json()
    settings["untrusted"] = {f.layer: f.reason for f in result.layers.values() if not f.trusted}
    settings["pooled"] = {f.layer: dataclasses.asdict(f.pooled) for f in result.layers.values()}
    settings["per_branch"] = {
        f.layer: {b: dataclasses.asdict(lf) for b, lf in f.per_branch.items()} for f in result.layers.values()
    }
    writer.write_attn_predictors(rows, run_ids=result.run_ids, fit_id=fit_id, settings=settings)


@dataclass(frozen=True)
class Predictors:
    """A fit as read back from the store: what policies are built from.

    Attributes:
        fit_id, run_ids: which fit, from which profile runs.
        layers: ``layer -> (alpha, beta, r2, n, trusted)``.
        untrusted_mode: static mode for untrusted layers (from the fit's settings).
        pooling: the pooling the fit chose.
    """

    fit_id: str
    run_ids: list[str]
    layers: dict[str, tuple[float, float, float, int, bool]]
    untrusted_mode: str = "int8"
    pooling: str = "pooled"

    def dynamic_layers(self) -> dict[str, tuple[float, float, float, int]]:
        return {k: v[:4] for k, v in self.layers.items() if v[4]}

    def static_layers(self) -> dict[str, str]:
        return {k: self.untrusted_mode for k, v in self.layers.items() if not v[4]}


def read_predictors(store, fit_id: str | None = None, fmt: str = "nvfp4") -> Predictors:
    """Read a fit (default: the latest) back from the store.

    Raises:
        ValueError: the store has no fit, or no fit ``fit_id``.
    """
    import json

    fit_id = fit_id or store.latest_fit_id()
    if fit_id is None:
        raise ValueError("the store has no fitted predictors: run `sixbit-tune fit --store PATH` first")
    df = store.predictors(fit_id)
    df = df[df["format"] == fmt]
    if len(df) == 0:
        raise ValueError(f"no {fmt} predictors for fit {fit_id!r} in the store")
    raw = df["settings"].iloc[0]
    settings = json.loads(raw) if isinstance(raw, str) else (raw or {})
    layers = {
        str(r.layer): (float(r.alpha), float(r.beta), float(r.r2), int(r.n), bool(r.trusted))
        for r in df.itertuples(index=False)
    }
    return Predictors(
        fit_id=fit_id,
        run_ids=[str(x) for x in df["run_ids"].iloc[0]],
        layers=layers,
        untrusted_mode=settings.get("untrusted_mode", "int8"),
        pooling=settings.get("pooling_chosen", "pooled"),
    )


@dataclass(frozen=True)
class AttentionPredictors:
    """The attention predictors of one fit and attention format, as read back from the store.

    Attributes:
        fit_id, run_ids: which fit, from which profile runs.
        format: the attention format whose error is predicted (``"fp8"`` or ``"int8"``).
        pooling: ``"pooled"`` (every branch of a block has the same line) or ``"per_branch"``.
        blocks: ``block index -> {branch -> LineFit}``, the line each guidance branch uses.
        trusted: ``block index -> whether its predictor may drive the attention rule``.
        reasons: ``block index -> why it is not trusted`` (untrusted blocks only).
    """

    fit_id: str
    run_ids: list[str]
    format: str
    pooling: str
    blocks: dict[int, dict[str, LineFit]]
    trusted: dict[int, bool]
    reasons: dict[int, str] = field(default_factory=dict)


def attention_predictors(store, fit_id: str | None = None, fmt: str | None = None) -> AttentionPredictors:
    """Read a fit's attention predictors (default: the latest fit; ``fmt`` default: ``"fp8"`` when the fit has
    it, else its only format).

    Raises:
        ValueError: no fit, or the fit has no attention predictors (of format ``fmt``); the message says which
            formats it has.
    """
    import json

    fit_id = fit_id or store.latest_fit_id()
    if fit_id is None:
        raise ValueError("the store has no fitted predictors: run `sixbit-tune fit --store PATH` first")
    df = store.attn_predictors(fit_id)
    have = sorted(set(df["format"]))
    if fmt is None:
        fmt = "fp8" if "fp8" in have or not have else have[0]
    df = df[df["format"] == fmt]
    if len(df) == 0:
        raise ValueError(
            f"fit {fit_id!r} has no {fmt} attention predictors"
            + (f" (it has {have})" if have else ": its profile runs recorded no attention errors (profile with "
               "--attention-formats fp8 and at least 2 steps, then fit again)")
        )
    raw = df["settings"].iloc[0]
    settings = json.loads(raw) if isinstance(raw, str) else (raw or {})
    blocks: dict[int, dict[str, LineFit]] = {}
    trusted: dict[int, bool] = {}
    for r in df.itertuples(index=False):
        b = int(r.block_index)
        blocks.setdefault(b, {})[str(r.branch)] = LineFit(
            float(r.alpha), float(r.beta), float(r.r2), int(r.n), float(r.rmse), float(r.mean_err), float(r.ss_tot)
        )
        trusted[b] = bool(r.trusted)
    reasons = {int(k): str(v) for k, v in (settings.get("untrusted") or {}).items()}
    return AttentionPredictors(
        fit_id=fit_id,
        run_ids=[str(x) for x in df["run_ids"].iloc[0]],
        format=fmt,
        pooling=settings.get("pooling_chosen", "pooled"),
        blocks=dict(sorted(blocks.items())),
        trusted=dict(sorted(trusted.items())),
        reasons=reasons,
    )
