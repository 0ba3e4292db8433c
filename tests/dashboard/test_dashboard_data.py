"""The dashboard's data functions against a real profiled, fitted and searched store, each checked against an
independent computation (pandas over the store's plain readers, or hand-worked numbers)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from dashboard_helpers import PROMPTS, STEPS, TRIALS
from sixbit_tune.dashboard import data

from sixbit_tune import policy as P
from sixbit_tune.store import Store


@pytest.fixture
def store(dash_store):
    s = Store.open(dash_store, read_only=True)
    yield s
    s.close()


def _profile_run(store) -> str:
    return store.runs(kind="profile")["run_id"].iloc[0]


def _study(store) -> str:
    return store.trials()["study"].iloc[0]


# ------------------------------------------------------------------------------------------------ stores


def test_store_labels_are_short_and_unique(tmp_path):
    a, b = tmp_path / "x" / "h200", tmp_path / "y" / "h200"
    labels = data.store_labels([a, b])
    assert list(labels) == ["x/h200", "y/h200"]
    assert data.store_labels([tmp_path / "h200", tmp_path / "b200"]) == {
        "h200": tmp_path / "h200", "b200": tmp_path / "b200"}
    with pytest.raises(ValueError, match="twice"):
        data.store_labels([a, a])
    with pytest.raises(ValueError, match="--store"):
        data.store_labels([])


def test_fingerprint_changes_only_when_parts_change(store_copy):
    before = data.fingerprint([store_copy])
    assert data.fingerprint([store_copy]) == before
    trials_before = data.fingerprint([store_copy], ["trials"])
    with Store.open(store_copy) as s:
        s.writer("t").write_trial("other-study", 0, state="RUNNING")
    assert data.fingerprint([store_copy]) != before
    assert data.fingerprint([store_copy], ["trials"]) != trials_before
    assert data.fingerprint([store_copy], ["block_steps"]) == data.fingerprint([store_copy], ["block_steps"])


# ------------------------------------------------------------------------------------------------ runs


def test_runs_overview_reports_model_settings_and_counts(store):
    df = data.runs_overview(store)
    prof = df[df["kind"] == "profile"]
    assert len(prof) == 1
    r = prof.iloc[0]
    assert r["model_spec"] == "tiny:wan" and r["model_class"] == "WanTransformer3DModel"
    assert r["steps"] == STEPS and r["prompts"] == len(PROMPTS)
    assert r["gpu"] == "CPU (no GPU)" and r["torch"].startswith("2.")
    assert r["block_rows"] == len(store.block_steps([r["run_id"]]))
    assert r["layer_rows"] == len(store.layer_steps([r["run_id"]]))
    assert data.run_settings(store, r["run_id"])["steps"] == STEPS
    assert data.run_settings(store, "no-such-run") == {}


def test_profile_runs_lists_runs_with_block_data(store):
    runs = data.profile_runs(store)
    assert len(runs) == 1
    assert runs["steps"].iloc[0] == STEPS and runs["prompts"].iloc[0] == len(PROMPTS)
    assert runs["blocks"].iloc[0] == store.block_steps()["block_index"].nunique()


# ------------------------------------------------------------------------------------------------ sensitivity


@pytest.mark.parametrize("fmt", ["nvfp4", "int8"])
@pytest.mark.parametrize("branch", [None, "cond"])
def test_layer_error_grid_is_the_mean_over_prompts_and_branches(store, fmt, branch):
    run = _profile_run(store)
    grid = data.layer_error_grid(store, run, fmt, branch)
    raw = store.layer_steps([run], formats=[fmt])
    if branch:
        raw = raw[raw["branch"] == branch]
    expect = raw.groupby(["layer", "step"])["out_err"].mean()
    got = grid.set_index(["layer", "step"])["out_err"]
    assert len(grid) == raw["layer"].nunique() * STEPS
    pd.testing.assert_series_equal(got.sort_index(), expect.sort_index(), check_names=False, rtol=1e-12)
    assert (grid["n"] == (len(PROMPTS) if branch else 2 * len(PROMPTS))).all()
    assert list(grid["block_index"]) == sorted(grid["block_index"])


def test_nvfp4_errors_exceed_int8_errors(store):
    s = data.format_summary(store, _profile_run(store)).set_index("format")
    assert s.loc["nvfp4", "median_out_err"] > 2 * s.loc["int8", "median_out_err"]


def test_user_values_are_bound_not_spliced(store):
    run = _profile_run(store)
    evil = "x' OR '1'='1"
    assert data.layer_error_grid(store, evil, "nvfp4").empty
    assert data.layer_error_grid(store, run, evil).empty
    assert data.block_delta_grid(store, run, evil).empty
    assert data.study_trials(store, evil).empty
    assert data.trial_policy(store, evil, 0) is None
    assert data.predictor_pairs(store, [evil], "blocks.0.attn1.to_q").empty


# ------------------------------------------------------------------------------------------------ predictor


def test_fit_and_pairs_match_the_predictor_module(store):
    from sixbit_tune.predictor import load_pairs

    fits = data.fits(store)
    assert len(fits) == 1
    fit_id = fits["fit_id"].iloc[0]
    layers = data.fit_layers(store, fit_id)
    assert len(layers) == fits["layers"].iloc[0] == store.predictors(fit_id)["layer"].nunique()
    assert fits["trusted"].iloc[0] == int(layers["trusted"].sum())
    layer = layers["layer"].iloc[0]
    run_ids = list(layers["run_ids"].iloc[0])
    pairs = data.predictor_pairs(store, run_ids, layer)
    ref = load_pairs(store, run_ids)
    ref = ref[ref["layer"] == layer].reset_index(drop=True)
    pd.testing.assert_frame_equal(pairs.reset_index(drop=True), ref)
    # the stored fit is the least-squares line through exactly these pairs
    alpha, beta = np.polyfit(pairs["gamma_prev"], pairs["out_err"], 1)
    row = layers.iloc[0]
    assert row["alpha"] == pytest.approx(alpha, rel=1e-6, abs=1e-9)
    assert row["beta"] == pytest.approx(beta, rel=1e-6, abs=1e-9)
    assert row["n"] == len(pairs) == len(PROMPTS) * 2 * (STEPS - 1)


# ------------------------------------------------------------------------------------------------ temporal


def test_block_delta_grid_matches_pandas(store):
    run = _profile_run(store)
    grid = data.block_delta_grid(store, run)
    raw = store.block_steps([run])
    expect = raw.groupby(["block_index", "step"])[["gamma", "delta_cos", "delta_change"]].mean()
    got = grid.set_index(["block_index", "step"])[["gamma", "delta_cos", "delta_change"]]
    pd.testing.assert_frame_equal(got.sort_index(), expect.sort_index(), rtol=1e-12)
    assert grid.loc[grid["step"] == 0, "delta_cos"].isna().all()
    assert grid.loc[grid["step"] > 0, "delta_cos"].between(-1, 1).all()


# ------------------------------------------------------------------------------------------------ search


def test_study_trials_expand_params_and_mark_the_pareto_front(store):
    studies = data.studies(store)
    assert len(studies) == 1 and studies["trials"].iloc[0] == TRIALS
    t = data.study_trials(store, _study(store))
    assert len(t) == TRIALS and (t["state"] == "COMPLETE").all()
    assert {"param_tau", "param_delta", "param_warmup"} <= set(t.columns)
    assert set(t["reference"].dropna()) == {"static_int8", "static_nvfp4", "dmpq_no_cache"}
    ok = t[t["feasible"].astype(bool)]
    assert t["pareto"].any()
    loss = np.stack([ok["latency_ms"], ok["memory_bytes"], -ok["psnr_db"]], axis=1)
    for i, on_front in enumerate(ok["pareto"]):
        dominated = any((loss[j] <= loss[i]).all() and (loss[j] < loss[i]).any() for j in range(len(ok)) if j != i)
        assert on_front == (not dominated)
    assert not t.loc[~t["feasible"].astype(bool), "pareto"].any()


def test_pareto_mask_hand_worked():
    df = pd.DataFrame({"latency_ms": [1.0, 2.0, 2.0, 3.0, None], "memory_bytes": [5, 1, 2, 5, 1],
                       "psnr_db": [30.0, 30.0, 30.0, 29.0, 50.0]})
    # row 2 is dominated by row 1; row 3 by row 0; row 4 lacks a latency
    assert data.pareto_mask(df).tolist() == [True, True, False, False, False]


def test_hypervolume_history_hand_worked():
    # two objectives for clarity: (latency min, psnr max); normalised to [0, 1]; reference 1.1
    objectives = (("latency_ms", "min"), ("psnr_db", "max"))
    df = pd.DataFrame({"number": [0, 1, 2, 3], "state": ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"],
                       "feasible": [True, None, True, False], "latency_ms": [10.0, None, 20.0, 1.0],
                       "psnr_db": [30.0, None, 40.0, 99.0]})
    hv = data.hypervolume_history(df, objectives)
    # normalised losses: trial 0 -> (0, 1), trial 2 -> (1, 0); trial 3 is infeasible and ignored
    assert hv["hypervolume"].tolist() == pytest.approx([1.1 * 0.1, 1.1 * 0.1, 1.1 * 0.1 + 0.1 * 1.0, 0.21])


def test_hypervolume_history_of_the_study_is_monotone(store):
    hv = data.hypervolume_history(data.study_trials(store, _study(store)))
    assert len(hv) == TRIALS
    assert (np.diff(hv["hypervolume"]) >= -1e-12).all() and hv["hypervolume"].iloc[-1] > 0


def test_param_importance_from_the_optuna_storage(store, dash_store):
    t = data.study_trials(store, _study(store))
    imp = data.param_importance(t, _study(store), dash_store)
    assert "Optuna storage" in imp.source and str(dash_store / "optuna.journal") in imp.source
    assert list(imp.table.columns) == ["objective", "param", "importance"]
    assert set(imp.table["objective"]) <= {"latency_ms", "memory_bytes", "psnr_db"}
    assert len(imp.table) > 0 and (imp.table["importance"] >= 0).all()


def test_param_importance_falls_back_to_the_store(store, tmp_path):
    t = data.study_trials(store, _study(store))
    imp = data.param_importance(t, _study(store), tmp_path)  # a folder without optuna.journal
    assert "store's mirrored trials" in imp.source and "no optuna.journal" in imp.source
    assert len(imp.table) > 0
    imp2 = data.param_importance(t, _study(store), tmp_path, storage=str(tmp_path / "missing.journal"))
    assert "not usable" in imp2.source and len(imp2.table) > 0


def test_store_fallback_keeps_categorical_knobs():
    """The store's mirrored trials rebuild an Optuna study with string knobs (``cache_dtype``) as categoricals."""
    import pandas as pd

    rows = [dict(state="COMPLETE", latency_ms=10.0 + i, memory_bytes=100.0 * (i % 2 + 1), psnr_db=30.0 + i,
                 param_delta=0.1 * i, param_max_skips=i % 3 + 1,
                 param_cache_dtype=("bfloat16", "float8_e4m3fn")[i % 2]) for i in range(6)]
    study = data._study_from_trials(pd.DataFrame(rows), [n for n, _ in data.OBJECTIVES])
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 6
    assert [t.params["cache_dtype"] for t in trials] == [r["param_cache_dtype"] for r in rows]
    assert {t.params["max_skips"] for t in trials} == {1, 2, 3}


# ------------------------------------------------------------------------------------------------ policy


def _trial_policy(store, reference: str) -> tuple[dict, pd.Series]:
    t = data.study_trials(store, _study(store))
    row = t[t["reference"] == reference].iloc[0]
    return data.trial_policy(store, _study(store), int(row["number"])), row


@pytest.mark.parametrize("corner, share", [("static_int8", 0.0), ("static_nvfp4", 1.0)])
def test_policy_maps_of_static_corners(store, corner, share):
    policy, _ = _trial_policy(store, corner)
    precision, skips = data.policy_maps(store, policy, _profile_run(store))
    assert len(precision) == len(policy["dmpq"]["layers"]) * STEPS
    assert (precision["nvfp4_share"] == share).all()
    assert (skips["skip_share"] == 0).all()  # corners have TDC off


def test_policy_maps_dmpq_matches_the_rule_on_the_profile(store):
    policy, _ = _trial_policy(store, "dmpq_no_cache")
    run = _profile_run(store)
    precision, skips = data.policy_maps(store, policy, run)
    assert (skips["skip_share"] == 0).all()
    pol = P.load(policy)
    assert data.run_settings(store, run).get("cfg_mode") != "batched"  # every (prompt, branch) decides alone
    tau = pol.dmpq.threshold
    blocks = store.block_steps([run])
    checked = 0
    for name, lp in pol.dmpq.layers.items():
        got = precision[precision["layer"] == name].set_index("step")["nvfp4_share"]
        if lp.mode != "dynamic":
            acts = {getattr(lp, lp.mode) if hasattr(lp, "fast") else lp.mode}
            assert (got == (1.0 if acts == {"nvfp4"} else 0.0)).all()
            continue
        block = int(name.split(".")[1])
        b = blocks[blocks["block_index"] == block]
        first = getattr(pol.dmpq, "first_step", None) or ("fast" if pol.dmpq.first_step_format == "nvfp4" else "")
        assert got[0] == float(first == "fast")
        for t in range(1, STEPS):
            prev = b[b["step"] == t - 1]
            fast = []
            for branch, g in zip(prev["branch"], prev["gamma"]):
                line = lp.line(branch) if hasattr(lp, "line") else lp
                fast.append(line.alpha * g + line.beta <= tau)
            assert got[t] == pytest.approx(np.mean(fast))
            checked += 1
    assert checked > 0


def test_policy_maps_tdc_window_and_skip_cap(store):
    policy, _ = _trial_policy(store, "dmpq_no_cache")
    policy = json.loads(json.dumps(policy))
    policy["tdc"].update({"tolerance": 1e9, "warmup": 1, "cooldown": 1, "max_skips": 1})
    _, skips = data.policy_maps(store, policy, _profile_run(store))
    by_step = skips.groupby("step")["skip_share"].mean()
    # step 0: nothing cached; step 1: only one computation so far (no change rate yet); step 2: skipped
    # everywhere (huge tolerance); step 3 is in the cooldown.
    assert by_step.tolist() == [0.0, 0.0, 1.0, 0.0]
    policy["tdc"].update({"cooldown": 0, "max_skips": 1})
    _, skips = data.policy_maps(store, policy, _profile_run(store))
    # after a skip at step 2 the block must compute again at step 3 (max_skips 1): never skip forever
    assert skips.groupby("step")["skip_share"].mean().tolist() == [0.0, 0.0, 1.0, 0.0]
    policy["tdc"].update({"max_skips": 2})
    _, skips = data.policy_maps(store, policy, _profile_run(store))
    assert skips.groupby("step")["skip_share"].mean().tolist() == [0.0, 0.0, 1.0, 1.0]


def test_matching_profile_runs_by_config_hash(store):
    policy, _ = _trial_policy(store, "static_int8")
    assert len(data.matching_profile_runs(store, policy["model"]["config_hash"])) == 1
    assert data.matching_profile_runs(store, "0" * 64).empty


def test_measured_vs_baseline(store):
    _, row = _trial_policy(store, "static_nvfp4")
    m = data.measured_vs_baseline(row.to_dict()).set_index("figure")
    lat = m.loc["latency (ms)"]
    assert lat["baseline"] == pytest.approx(row["speedup"] * row["latency_ms"])
    assert lat["ratio"] == pytest.approx(1 / row["speedup"])
    assert m.loc["NVFP4 share of layer calls", "policy"] == pytest.approx(1.0)


def test_policy_summary_counts_routes(store):
    policy, _ = _trial_policy(store, "static_int8")
    s = data.policy_summary(policy)
    assert s.set_index("route")["layers"].to_dict() == {"int8/int8": len(policy["dmpq"]["layers"])}
    assert s["weight"].tolist() == ["int8"]
    dynamic = data.study_trials(store, _study(store))
    dynamic = dynamic[dynamic["reference"].isna() & (dynamic["state"] == "COMPLETE")]
    for number in dynamic["number"]:
        p = data.trial_policy(store, _study(store), int(number))
        s = data.policy_summary(p)
        assert s["layers"].sum() == len(p["dmpq"]["layers"])
        assert set(s["mode"]) == {lp["mode"] for lp in p["dmpq"]["layers"].values()}


def test_sample_media(tmp_path):
    assert data.sample_media(tmp_path, "s", 3) == []
    folder = tmp_path / data.SAMPLES_DIR / "s" / "3"
    folder.mkdir(parents=True)
    (folder / "reference-0.png").write_bytes(b"x")
    (folder / "policy-0.png").write_bytes(b"x")
    (folder / "notes.txt").write_text("x")
    assert [p.name for p in data.sample_media(tmp_path, "s", 3)] == ["policy-0.png", "reference-0.png"]


# ------------------------------------------------------------------------------------------------ GPUs


def test_gpu_comparison_side_by_side(dash_store, second_store):
    both = data.open_stores([dash_store, second_store])
    try:
        comp = data.gpu_comparison(both)
    finally:
        for s in both.values():
            s.close()
    assert comp["store"].tolist() == ["h200", "b200"]
    assert (comp["choice"] == "fastest feasible trial").all()
    assert (comp["trials"] == TRIALS).all()
    with Store.open(dash_store, read_only=True) as s:
        t = s.trials()
    feasible = t[t["quality"].map(lambda q: json.loads(q)["feasible"])]
    assert comp["latency_ms"].iloc[0] == pytest.approx(feasible["latency_ms"].min())
