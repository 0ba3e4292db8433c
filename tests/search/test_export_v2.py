"""Search policies and exports speak schema version 2: per-branch predictor lines where the fit chose them; an
exported trial policy (version 1 or 2 in the trial) is written as version 2."""

from __future__ import annotations

import json

import optuna
from optuna.distributions import FloatDistribution

from sixbit_tune import policy as P
from sixbit_tune.predictor import FitSettings, fit_store, read_predictors, write_fit
from sixbit_tune.search.export import trial_policy
from sixbit_tune.search.policies import fit_lines
from sixbit_tune.store import Store


def test_fit_lines_keep_the_per_branch_lines_the_fit_chose(store_copy):
    with Store.open(store_copy) as store:
        per_branch = fit_store(store, settings=FitSettings(pooling="per_branch"))
        branch_id = write_fit(store.writer(), per_branch)
        pooled = fit_store(store, settings=FitSettings(pooling="pooled"))
        pooled_id = write_fit(store.writer(), pooled)
        dynamic = read_predictors(store, branch_id).dynamic_layers()
        assert dynamic
        got = fit_lines(store, branch_id, dynamic)
        for name, lines in got.items():
            fit = per_branch.layers[name].per_branch
            assert set(lines) == set(fit) and len(lines) >= 2
            for branch, (alpha, beta, r2, n) in lines.items():
                assert (alpha, beta, r2, n) == (fit[branch].alpha, fit[branch].beta, fit[branch].r2, fit[branch].n)
        assert fit_lines(store, pooled_id, read_predictors(store, pooled_id).dynamic_layers()) == \
            read_predictors(store, pooled_id).dynamic_layers()
        # The lines build a valid version-2 layer with one line per branch.
        name, lines = next(iter(got.items()))
        lp = P.LayerPolicy("nvfp4", 16, 16, mode="dynamic", predictor=lines)
        assert set(lp.predictor) == set(lines) and "pooled" not in lp.predictor


def _study_with(policy_dict: dict) -> optuna.Study:
    study = optuna.create_study(directions=["minimize", "maximize"])
    study.add_trial(optuna.trial.create_trial(
        params={"tau": 0.1}, distributions={"tau": FloatDistribution(0.0, 1.0)}, values=[10.0, 30.0],
        user_attrs={"policy": policy_dict, "figures": {"latency_ms": 10.0, "psnr_db": 30.0}}))
    return study


def test_an_exported_trial_policy_is_version_2(tmp_path):
    from policy_helpers import make_v1_dict

    for stored in (make_v1_dict(), P.load(make_v1_dict()).to_dict()):
        policy, ok = trial_policy(_study_with(stored), 0)
        assert ok and policy.schema_version == 2
        path = P.save(policy, tmp_path / "p.json")
        data = json.loads(path.read_text())
        assert data["schema_version"] == 2
        assert data["dmpq"]["layers"]["blocks.0.attn1.to_q"]["robust"] == "int8"
        assert P.load(path).measured.latency_ms == 10.0
