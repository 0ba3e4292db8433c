"""The search space derived from profile quantiles."""

from __future__ import annotations

import optuna
import pytest

from sixbit_tune.search.space import SearchSpace, derive_space


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
