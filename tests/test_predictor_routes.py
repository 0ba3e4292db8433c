"""The fit over every profiled route: a line per (layer, route) on a real profile of tiny:wan, written beside the
NVFP4 lines under one fit id, and a search on a store profiled with every route deciding as on one profiled with the
version-3 formats (NVFP4, INT8) only."""

from __future__ import annotations

import json
import math

import pytest
from tiny_profile import MODEL, PROMPTS, STEPS

from sixbit_tune.predictor import fit_line, fit_store, load_pairs, read_predictors, write_fit
from sixbit_tune.routes import PROFILE_DEFAULT_ROUTES
from sixbit_tune.store import Store


@pytest.fixture(scope="module")
def v3_store(tmp_path_factory):
    """The shared tiny profile (same model, prompts, steps, seed) recording only NVFP4 and INT8, fitted."""
    from sixbit_tune.profiling.runner import ProfileConfig, profile

    path = tmp_path_factory.mktemp("v3formats") / "store"
    profile(ProfileConfig(model=MODEL, prompts=list(PROMPTS), store=str(path), steps=STEPS, device="cpu",
                          formats=("nvfp4", "int8"), progress=False))
    with Store.open(path) as store:
        write_fit(store.writer(), fit_store(store))
    return path


def test_a_line_per_layer_and_route(profiled_tiny_store):
    with Store.open(profiled_tiny_store, read_only=True) as store:
        recorded = set(store.query("SELECT DISTINCT format FROM layer_steps")["format"])
        assert recorded == set(PROFILE_DEFAULT_ROUTES)
        result = fit_store(store)
        assert result.settings.format == "nvfp4"
        assert list(result.routes) == [f for f in PROFILE_DEFAULT_ROUTES if f != "nvfp4"]
        for fmt, fit in result.routes.items():
            assert fit.fit_id == result.fit_id and fit.settings.format == fmt
            pairs = load_pairs(store, result.run_ids, fmt)
            assert set(fit.layers) == set(result.layers) == set(pairs["layer"])
            for layer, g in pairs.groupby("layer"):
                line = fit_line(g["gamma_prev"].to_numpy(), g["out_err"].to_numpy())
                assert fit.layers[layer].pooled == line, (fmt, layer)


def test_write_fit_records_every_route_with_one_settings(profiled_tiny_store, tmp_path):
    import shutil

    path = tmp_path / "store"
    shutil.copytree(profiled_tiny_store, path)
    with Store.open(path) as store:
        result = fit_store(store)
        fit_id = write_fit(store.writer(), result)
        df = store.predictors(fit_id)
        assert sorted(set(df["format"])) == sorted(PROFILE_DEFAULT_ROUTES)
        assert len(df) == len(result.layers) * len(PROFILE_DEFAULT_ROUTES)
        for r in df.itertuples(index=False):
            fit = result if r.format == "nvfp4" else result.routes[r.format]
            line = fit.layers[r.layer].pooled
            assert (r.alpha, r.beta, r.r2, r.n) == (line.alpha, line.beta, line.r2, line.n)
            assert bool(r.trusted) == fit.layers[r.layer].trusted
        assert df["settings"].nunique() == 1  # every row carries the NVFP4 fit's settings, whatever it is read by
        settings = json.loads(df["settings"].iloc[0])
        assert settings["format"] == "nvfp4" and set(settings["per_branch"]) == set(result.layers)
        assert settings["routes"]["nvfp4/int8"]["layers"] == len(result.layers)
        assert settings["routes"]["nvfp4/int8"]["pooling_chosen"] == result.routes["nvfp4/int8"].pooling
        # what policies are built from is the NVFP4 fit
        preds = read_predictors(store, fit_id)
        assert preds.layers == {k: (f.pooled.alpha, f.pooled.beta, f.pooled.r2, f.pooled.n, f.trusted)
                                for k, f in result.layers.items()}
        assert read_predictors(store, fit_id, "nvfp4/int8").layers["blocks.0.attn1.to_q"][3] > 0


def test_fit_summary_names_every_route(profiled_tiny_store, tmp_path):
    from sixbit_tune.commands.fit import summarize

    with Store.open(profiled_tiny_store, read_only=True) as store:
        result = fit_store(store)
    text = summarize(result, result.fit_id)
    for fmt in result.routes:
        assert f"route {fmt}: {len(result.layers)} layers, R² median" in text


def test_nvfp4_fit_and_search_unchanged_by_the_new_routes(profiled_tiny_store, v3_store, tmp_path):
    """The same profile with every route recorded and with NVFP4 and INT8 only: the same NVFP4 predictors, and a
    search (same seed) samples the same parameters and builds the same policies from them."""
    import shutil

    from sixbit_tune.models.specs import load_pipeline
    from sixbit_tune.search.config import SearchConfig
    from sixbit_tune.search.study import run_search

    new = tmp_path / "new"
    shutil.copytree(profiled_tiny_store, new)
    old = tmp_path / "old"
    shutil.copytree(v3_store, old)
    with Store.open(new, read_only=True) as a, Store.open(old, read_only=True) as b:
        fmts = [set(s.query("SELECT DISTINCT format FROM predictors")["format"]) for s in (a, b)]
        assert fmts == [set(PROFILE_DEFAULT_ROUTES), {"nvfp4", "int8"}]
        pa, pb = read_predictors(a), read_predictors(b)
        assert pa.layers == pb.layers and pa.untrusted_mode == pb.untrusted_mode and pa.pooling == pb.pooling
    pipe = load_pipeline(MODEL)
    trials = {}
    for name, path in (("new", new), ("old", old)):
        config = SearchConfig(store=str(path), model=MODEL, trials=4, prompts=(PROMPTS[0],), repeats=1,
                              warmup_runs=0, quality_floor_db=25.0, device="cpu", progress=False, study="routes")
        study = run_search(config, pipe=pipe, log=lambda *_: None)
        trials[name] = study.get_trials(deepcopy=False)
        with Store.open(path, read_only=True) as store:
            rows = store.trials("routes")
        trials[name + "_policies"] = [json.loads(p) for p in rows["policy"]]
    assert len(trials["new"]) == 4 and len(trials["new_policies"]) == 4
    assert [t.params for t in trials["new"]] == [t.params for t in trials["old"]]
    assert [t.state for t in trials["new"]] == [t.state for t in trials["old"]]
    for t_new, t_old in zip(trials["new"], trials["old"]):
        if t_new.values is not None:
            assert math.isclose(t_new.values[2], t_old.values[2], rel_tol=1e-9)  # PSNR
    for p_new, p_old in zip(trials["new_policies"], trials["old_policies"]):
        assert p_new["dmpq"] == p_old["dmpq"] and p_new.get("tdc") == p_old.get("tdc")
