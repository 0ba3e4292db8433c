"""The search space: τ (DMPQ threshold), δ (TDC tolerance) and the cache window, with ranges from the profile.

* τ ranges over the predicted NVFP4 errors α_j·Γ + β_j of the trusted layers at every profiled (run, prompt,
  branch, step) of their block: from just below the 1st percentile (nearly every dynamic layer-call INT8) to just
  above the 99th (nearly every one NVFP4).
* δ ranges from 0 (never skip) to the 95th percentile of the profiled ``delta_change``.
* ``warmup`` and ``cooldown`` from 0 to half the steps; ``max_skips`` from 1 to max(2, steps // 3).

The space is derived once, when a study is created, and stored with the study (``user_attrs["space"]``): every
worker and every resumed run searches exactly the same space.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

PARAMS = ("tau", "delta", "warmup", "cooldown", "max_skips")
SPACE_VERSION = 1


@dataclass(frozen=True)
class SearchSpace:
    """Ranges of the five searched knobs (all inclusive)."""

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
    version: int = SPACE_VERSION

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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SearchSpace:
        return cls(**d)

    def suggest(self, trial) -> dict:
        """Ask an Optuna trial for one point; returns ``{name: value}`` in :data:`PARAMS` order."""
        return {
            "tau": trial.suggest_float("tau", self.tau_low, self.tau_high),
            "delta": trial.suggest_float("delta", self.delta_low, self.delta_high),
            "warmup": trial.suggest_int("warmup", 0, self.warmup_max),
            "cooldown": trial.suggest_int("cooldown", 0, self.cooldown_max),
            "max_skips": trial.suggest_int("max_skips", self.max_skips_low, self.max_skips_high),
        }

    def corner(self, tau: float, delta: float = 0.0) -> dict:
        """A point of the space with the given τ, δ and the middle of the window knobs."""
        return {
            "tau": min(max(tau, self.tau_low), self.tau_high),
            "delta": min(max(delta, self.delta_low), self.delta_high),
            "warmup": self.warmup_max // 2,
            "cooldown": self.cooldown_max // 2,
            "max_skips": self.max_skips_low,
        }


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

    def as_dict(df) -> dict:
        if len(df) == 0 or df["q"].iloc[0] is None or int(df["n"].iloc[0]) == 0:
            return {}
        return {f"q{int(round(q * 100)):02d}": float(v) for q, v in zip(qs, df["q"].iloc[0])} | {
            "n": int(df["n"].iloc[0])
        }

    return as_dict(pred), as_dict(dc)


def derive_space(tau_q: dict, delta_q: dict, steps: int) -> SearchSpace:
    """The space for ``steps`` denoising steps from the profile quantiles (see the module docstring).

    Without trusted predictors (``tau_q`` empty) τ still ranges over [0, 1] but changes nothing (no layer is
    dynamic); without any ``delta_change`` (single-step profiles) δ ranges over [0, 0.5].
    """
    if tau_q:
        lo, hi = tau_q["q01"], tau_q["q99"]
        span = max(hi - lo, 1e-6, 0.02 * abs(hi))
        tau_low, tau_high = max(0.0, lo - 0.05 * span), hi + 0.05 * span
    else:
        tau_low, tau_high = 0.0, 1.0
    if delta_q and delta_q.get("q95", 0.0) > 0:
        delta_high = delta_q["q95"]
    else:
        delta_high = 0.5
    half = max(0, steps // 2)
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
    )
