"""The search space derived from profile quantiles."""

from __future__ import annotations

import optuna
import pytest

from sixbit_tune.policy import TDC
from sixbit_tune.search.policies import tdc_options
from sixbit_tune.search.space import PARAMS, SearchSpace, derive_space


def test_space_spans_the_predicted_errors_and_delta_change():
    tau_q = {"q01": 0.08, "q99": 0.2, "n": 100}
    delta_q = {"q95": 0.3, "n": 50}
    sp = derive_space(tau_q, delta_q, steps=10)
    assert sp.tau_low < 0.08 < 0.2 < sp.tau_high
    assert (sp.delta_low, sp.delta_high) == (0.0, 0.3)
    assert (sp.warmup_max, sp.cooldown_max, sp.max_skips_low, sp.max_skips_high) == (5, 5, 1, 3)
    assert SearchSpace.from_dict(sp.to_dict()) == sp
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        p = sp.suggest(study.ask())
        assert sp.tau_low <= p["tau"] <= sp.tau_high and 0 <= p["delta"] <= 0.3
        assert 0 <= p["warmup"] <= 5 and 1 <= p["max_skips"] <= 3
    c = sp.corner(-1.0, 5.0)
    assert c["tau"] == sp.tau_low and c["delta"] == sp.delta_high


def test_space_without_profile_evidence_and_bad_ranges():
    sp = derive_space({}, {}, steps=4)
    assert (sp.tau_low, sp.tau_high, sp.delta_high) == (0.0, 1.0, 0.5)
    with pytest.raises(ValueError, match="tau_low"):
        SearchSpace(0.5, 0.5, 0.0, 1.0, 1, 1, 1, 2)


def test_space_searches_the_cache_knobs_and_survives_json():
    import json

    sp = derive_space({"q01": 0.08, "q99": 0.2, "n": 100}, {"q95": 0.3, "n": 50}, steps=10)
    assert sp.version == 2
    assert sp.cache_dtypes == ("bfloat16", "float8_e4m3fn") and sp.extrapolate_max == sp.refresh_robust_max == 1
    assert SearchSpace.from_dict(json.loads(json.dumps(sp.to_dict()))) == sp
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        p = sp.suggest(trial)
        assert list(p) == [k for k in PARAMS if k != "attn_tau"] and p == trial.params  # no attention predictors
        seen.add((p["cache_dtype"], p["extrapolate"], p["refresh_robust"]))
        study.tell(trial, 0.0)
    assert seen == {(d, e, r) for d in ("bfloat16", "float8_e4m3fn") for e in (0, 1) for r in (0, 1)}
    # A trial's knobs reach the policy's TDC section.
    opts = tdc_options({"warmup": 1, "cooldown": 2, "max_skips": 3, "cache_dtype": "float8_e4m3fn", "extrapolate": 1,
                        "refresh_robust": 1})
    tdc = TDC(tolerance=0.1, **opts)
    assert (tdc.cache_dtype, tdc.extrapolate, tdc.refresh_robust, tdc.max_skips) == ("float8_e4m3fn", 1, 1, 3)


def test_refresh_robust_is_not_searched_without_dynamic_layers():
    sp = derive_space({}, {"q95": 0.3, "n": 50}, steps=10)
    assert sp.refresh_robust_max == 0
    trial = optuna.create_study().ask()
    p = sp.suggest(trial)
    assert p["refresh_robust"] == trial.params["refresh_robust"] == 0 and p == trial.params


def test_a_version_1_space_searches_what_it_searched_before():
    v1 = derive_space({"q01": 0.08, "q99": 0.2, "n": 100}, {"q95": 0.3, "n": 50}, steps=10).to_dict()
    for k in ("cache_dtypes", "extrapolate_max", "refresh_robust_max"):
        del v1[k]
    v1["version"] = 1
    sp = SearchSpace.from_dict(v1)
    trial = optuna.create_study().ask()
    p = sp.suggest(trial)
    assert set(p) == set(trial.params) == {"tau", "delta", "warmup", "cooldown", "max_skips"}
    assert set(sp.corner(0.1)) == {"tau", "delta", "warmup", "cooldown", "max_skips"}
    # The options of a version-1 trial's parameters (no cache knobs) are today's defaults.
    assert tdc_options({"warmup": 1, "cooldown": 2, "max_skips": 3}) == {
        "warmup": 1, "cooldown": 2, "max_skips": 3, "cache_dtype": "bfloat16", "extrapolate": 0, "refresh_robust": 0}


def test_corner_is_enqueueable_with_the_cache_knobs():
    sp = derive_space({"q01": 0.08, "q99": 0.2, "n": 100}, {"q95": 0.3, "n": 50}, steps=10)
    study = optuna.create_study()
    study.enqueue_trial(sp.corner(0.1))
    p = sp.suggest(study.ask())
    assert (p["cache_dtype"], p["extrapolate"], p["refresh_robust"]) == ("bfloat16", 0, 0)


@pytest.mark.parametrize(("change", "match"), [
    ({"cache_dtypes": ["float64"]}, "cache_dtypes"),
    ({"cache_dtypes": []}, "cache_dtypes"),
    ({"cache_dtypes": ["bfloat16", "bfloat16"]}, "cache_dtypes"),
    ({"cache_dtypes": "bfloat16"}, "cache_dtypes"),
    ({"extrapolate_max": 2}, "extrapolate_max"),
    ({"refresh_robust_max": -1}, "refresh_robust_max"),
    ({"version": 3}, "newer sixbit-tune"),
])
def test_bad_cache_knob_ranges_are_refused(change, match):
    d = derive_space({}, {}, steps=4).to_dict() | change
    with pytest.raises(ValueError, match=match):
        SearchSpace.from_dict(d)
