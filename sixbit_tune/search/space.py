"""The search space: τ (DMPQ threshold), δ (TDC tolerance), the cache window and the cache's storage and output
knobs, with ranges from the profile.

* τ ranges over the predicted NVFP4 errors α_j·Γ + β_j of the trusted layers at every profiled (run, prompt,
  branch, step) of their block: from just below the 1st percentile (nearly every dynamic layer-call INT8) to just
  above the 99th (nearly every one NVFP4).
* δ ranges from 0 (never skip) to the 95th percentile of the profiled ``delta_change``.
* ``warmup`` and ``cooldown`` from 0 to half the steps; ``max_skips`` from 1 to max(2, steps // 3).
* ``cache_dtype`` among :data:`CACHE_DTYPE_CHOICES` (bf16, or FP8 E4M3 with a per-token scale at about half the
  bytes), ``extrapolate`` 0 or 1 (the cached Δ, or its first-order extrapolation), and ``refresh_robust`` 0 or 1
  (the recompute after a skip on the robust route) where the profile has trusted predictors (without dynamic
  layers it changes nothing, so it is not searched).

* ``attn_tau``, the threshold of the attention rule (a block's 8-bit attention runs when its predicted error
  α·Γ + β is under it), where the fit has trusted attention predictors: over their predicted errors at every
  profiled (run, prompt, branch, step) of their block, from just below the 1st percentile (nearly every
  computation in bf16) to just above the 99th (nearly every one 8-bit). Spaces without attention predictors (and
  those stored before attention was searched) ask for no ``attn_tau``: the policies keep the model's attention.

A cache-only space (``dmpq`` false, for searches that keep every linear unquantized) asks for no τ and fixes
``refresh_robust`` at 0 (without quantized layers it changes nothing).

Versions: a version-1 space (stored by studies created before the cache knobs existed) asks the trial for none of
the cache knobs (its policies take bf16, 0 and 0), so a resumed version-1 study searches exactly what it searched
before.

The space is derived once, when a study is created, and stored with the study (``user_attrs["space"]``): every
worker and every resumed run searches exactly the same space.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

PARAMS = ("tau", "delta", "warmup", "cooldown", "max_skips", "cache_dtype", "extrapolate", "refresh_robust",
          "attn_tau")
SPACE_VERSION = 2
#: The cache storages a version-2 space searches (each a ``tdc.cache_dtype`` of the policy schema).
CACHE_DTYPE_CHOICES = ("bfloat16", "float8_e4m3fn")


@dataclass(frozen=True)
class SearchSpace:
    """Ranges of the searched knobs (all inclusive). ``cache_dtypes`` with one entry, ``extrapolate_max`` 0 and
    ``refresh_robust_max`` 0 fix that knob (a one-value distribution). ``dmpq`` false: τ is not searched (the
    policies keep every linear unquantized); the τ range is kept as evidence only."""

    tau_low: float
    tau_high: float
    delta_low: float
    delta_high: float
    warmup_max: int
    cooldown_max: int
    max_skips_low: int
    max_skips_high: int
    tau_quantiles: dict | None = None  # evidence: quantiles of predicted errors
    delta_quantiles: dict | None = None  # evidence: quantiles of delta_change
    cache_dtypes: tuple[str, ...] = ("bfloat16",)
    extrapolate_max: int = 0
    refresh_robust_max: int = 0
    version: int = SPACE_VERSION
    dmpq: bool = True
    attn_tau_low: float | None = None  # None: attention is not searched
    attn_tau_high: float | None = None
    attn_format: str | None = None  # the attention format whose predictors the space was derived from
    attn_quantiles: dict | None = None  # evidence: quantiles of predicted attention errors

    def __post_init__(self) -> None:
        for name in ("tau_low", "tau_high", "delta_low", "delta_high"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"SearchSpace.{name} must be finite, got {getattr(self, name)}")
        if not self.tau_low < self.tau_high:
            raise ValueError(f"SearchSpace: tau_low {self.tau_low} must be < tau_high {self.tau_high}")
        if not 0.0 <= self.delta_low < self.delta_high:
            raise ValueError(f"SearchSpace: need 0 <= delta_low < delta_high, got {self.delta_low}, {self.delta_high}")
        if min(self.warmup_max, self.cooldown_max) < 0 or not 1 <= self.max_skips_low <= self.max_skips_high:
            raise ValueError(f"SearchSpace: bad integer ranges {self}")
        from sixbit_tune.policy import CACHE_DTYPES

        if isinstance(self.cache_dtypes, str) or not isinstance(self.cache_dtypes, list | tuple):
            raise ValueError(f"SearchSpace.cache_dtypes must be a list of names, got {self.cache_dtypes!r}")
        object.__setattr__(self, "cache_dtypes", tuple(self.cache_dtypes))  # JSON brings a list back
        bad = [d for d in self.cache_dtypes if d not in CACHE_DTYPES]
        if bad or not self.cache_dtypes or len(set(self.cache_dtypes)) != len(self.cache_dtypes):
            raise ValueError(f"SearchSpace.cache_dtypes must be distinct names among {CACHE_DTYPES}, got "
                             f"{list(self.cache_dtypes)}")
        for name in ("extrapolate_max", "refresh_robust_max"):
            if getattr(self, name) not in (0, 1) or isinstance(getattr(self, name), bool):
                raise ValueError(f"SearchSpace.{name} must be 0 or 1, got {getattr(self, name)!r}")
        if not isinstance(self.dmpq, bool):
            raise ValueError(f"SearchSpace.dmpq must be true or false, got {self.dmpq!r}")
        if not self.dmpq and self.refresh_robust_max:
            raise ValueError("SearchSpace: a cache-only space (dmpq false) cannot search refresh_robust")
        if (self.attn_tau_low is None) != (self.attn_tau_high is None) or (
                self.attn_tau_low is not None and not (math.isfinite(self.attn_tau_low)
                                                       and math.isfinite(self.attn_tau_high)
                                                       and self.attn_tau_low < self.attn_tau_high)):
            raise ValueError(f"SearchSpace: attn_tau_low/attn_tau_high must both be None or finite with low < high, "
                             f"got {self.attn_tau_low}, {self.attn_tau_high}")
        if not isinstance(self.version, int) or not 1 <= self.version <= SPACE_VERSION:
            raise ValueError(f"SearchSpace version {self.version!r} is not one this sixbit-tune reads "
                             f"(1..{SPACE_VERSION}); a newer sixbit-tune made it")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SearchSpace:
        return cls(**d)

    def suggest(self, trial) -> dict:
        """Ask an Optuna trial for one point; returns ``{name: value}`` of exactly the knobs asked (so it equals
        ``trial.params``), in :data:`PARAMS` order. A version-2 space asks for all of them (a fixed knob is a
        one-value distribution); a version-1 space for the first five only (the policy takes the cache knobs'
        defaults: :func:`sixbit_tune.search.policies.tdc_options`). A cache-only space asks for no τ."""
        point = {"tau": trial.suggest_float("tau", self.tau_low, self.tau_high)} if self.dmpq else {}
        point |= {
            "delta": trial.suggest_float("delta", self.delta_low, self.delta_high),
            "warmup": trial.suggest_int("warmup", 0, self.warmup_max),
            "cooldown": trial.suggest_int("cooldown", 0, self.cooldown_max),
            "max_skips": trial.suggest_int("max_skips", self.max_skips_low, self.max_skips_high),
        }
        if self.version >= 2:
            point["cache_dtype"] = trial.suggest_categorical("cache_dtype", list(self.cache_dtypes))
            point["extrapolate"] = trial.suggest_int("extrapolate", 0, self.extrapolate_max)
            point["refresh_robust"] = trial.suggest_int("refresh_robust", 0, self.refresh_robust_max)
        if self.attn_tau_low is not None:
            point["attn_tau"] = trial.suggest_float("attn_tau", self.attn_tau_low, self.attn_tau_high)
        return point

    def corner(self, tau: float, delta: float = 0.0) -> dict:
        """A point of the space with the given τ, δ, the middle of the window knobs and (version 2) the first cache
        dtype, no extrapolation and no robust refresh: the knobs :meth:`suggest` asks for (an enqueued trial)."""
        point = {
            "tau": min(max(tau, self.tau_low), self.tau_high),
            "delta": min(max(delta, self.delta_low), self.delta_high),
            "warmup": self.warmup_max // 2,
            "cooldown": self.cooldown_max // 2,
            "max_skips": self.max_skips_low,
        }
        if self.version >= 2:
            point.update(cache_dtype=self.cache_dtypes[0], extrapolate=0, refresh_robust=0)
        if self.attn_tau_low is not None:
            point["attn_tau"] = self.attn_tau_low  # the model's own attention nearly everywhere
        return point


_Q = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)


def profile_quantiles(store, fit_id: str, run_ids: list[str]) -> tuple[dict, dict]:
    """Quantiles of the predicted errors (trusted NVFP4 predictors of ``fit_id``) and of ``delta_change``."""
    qs = list(_Q)
    pred = store.query(
        """
        WITH lb AS (SELECT DISTINCT layer, block_index FROM layer_steps WHERE list_contains($runs, run_id)),
             p AS (SELECT layer, alpha, beta FROM predictors
                   WHERE fit_id = $fit AND format = 'nvfp4' AND trusted)
        SELECT quantile_cont(p.alpha * b.gamma + p.beta, $qs) AS q, count(*) AS n
        FROM p JOIN lb USING (layer)
        JOIN block_steps AS b ON b.block_index = lb.block_index AND list_contains($runs, b.run_id)
        """,
        {"runs": list(run_ids), "fit": fit_id, "qs": qs},
    )
    dc = store.query(
        "SELECT quantile_cont(delta_change, $qs) AS q, count(*) AS n FROM block_steps "
        "WHERE delta_change IS NOT NULL AND list_contains($runs, run_id)",
        {"runs": list(run_ids), "qs": qs},
    )
    return _quantiles(pred), _quantiles(dc)


def _quantiles(df) -> dict:
    """``{"q01": …, "q99": …, "n": …}`` from a one-row query result of ``quantile_cont(…, _Q) AS q, count(*) AS n``
    (empty when it counted nothing)."""
    if len(df) == 0 or df["q"].iloc[0] is None or int(df["n"].iloc[0]) == 0:
        return {}
    return {f"q{int(round(q * 100)):02d}": float(v) for q, v in zip(_Q, df["q"].iloc[0])} | {
        "n": int(df["n"].iloc[0])}


def attention_quantiles(store, fit_id: str, run_ids: list[str]) -> tuple[dict, str | None]:
    """Quantiles of the predicted attention errors (trusted attention predictors of ``fit_id``, in the format
    :func:`sixbit_tune.predictor.attention_predictors` chooses) and that format; ``({}, None)`` without any."""
    from sixbit_tune.predictor import attention_predictors

    try:
        fmt = attention_predictors(store, fit_id).format
    except ValueError:  # the fit has no attention predictors
        return {}, None
    qs = list(_Q)
    df = store.query(
        """
        WITH p AS (SELECT block_index, branch, alpha, beta FROM attn_predictors
                   WHERE fit_id = $fit AND format = $fmt AND trusted)
        SELECT quantile_cont(p.alpha * b.gamma + p.beta, $qs) AS q, count(*) AS n
        FROM p JOIN block_steps AS b ON b.block_index = p.block_index AND b.branch = p.branch
        WHERE list_contains($runs, b.run_id) AND b.gamma IS NOT NULL
        """,
        {"runs": list(run_ids), "fit": fit_id, "fmt": fmt, "qs": qs},
    )
    q = _quantiles(df)
    return (q, fmt) if q else ({}, None)


def _range(q: dict) -> tuple[float, float]:
    """From just below the 1st to just above the 99th percentile (5% of the span either side, at least 0)."""
    lo, hi = q["q01"], q["q99"]
    span = max(hi - lo, 1e-6, 0.02 * abs(hi))
    return max(0.0, lo - 0.05 * span), hi + 0.05 * span


def derive_space(tau_q: dict, delta_q: dict, steps: int, dmpq: bool = True, attn_q: dict | None = None,
                 attn_format: str | None = None) -> SearchSpace:
    """The space for ``steps`` denoising steps from the profile quantiles (see the module docstring); ``dmpq``
    false gives the cache-only space; ``attn_q`` (:func:`attention_quantiles`) adds the attention threshold.

    Without trusted predictors (``tau_q`` empty) τ still ranges over [0, 1] but changes nothing (no layer is
    dynamic); without any ``delta_change`` (single-step profiles) δ ranges over [0, 0.5].
    """
    if tau_q:
        tau_low, tau_high = _range(tau_q)
    else:
        tau_low, tau_high = 0.0, 1.0
    if delta_q and delta_q.get("q95", 0.0) > 0:
        delta_high = delta_q["q95"]
    else:
        delta_high = 0.5
    half = max(0, steps // 2)
    attn_low, attn_high = _range(attn_q) if attn_q else (None, None)
    return SearchSpace(
        tau_low=float(tau_low),
        tau_high=float(tau_high),
        delta_low=0.0,
        delta_high=float(delta_high),
        warmup_max=half,
        cooldown_max=half,
        max_skips_low=1,
        max_skips_high=max(2, steps // 3),
        tau_quantiles=tau_q or None,
        delta_quantiles=delta_q or None,
        cache_dtypes=CACHE_DTYPE_CHOICES,
        extrapolate_max=1,
        refresh_robust_max=1 if tau_q and dmpq else 0,
        dmpq=dmpq,
        attn_tau_low=attn_low,
        attn_tau_high=attn_high,
        attn_format=attn_format if attn_q else None,
        attn_quantiles=attn_q or None,
    )
