"""The figure builders on the real store's data: the right traces, shapes and values, and no exception on empty
frames (each then says what is missing)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from dashboard_helpers import STEPS
from sixbit_tune.dashboard import data, figures

from sixbit_tune.store import Store


@pytest.fixture(scope="module")
def store(dash_store):
    s = Store.open(dash_store, read_only=True)
    yield s
    s.close()


@pytest.fixture(scope="module")
def run(store):
    return store.runs(kind="profile")["run_id"].iloc[0]


@pytest.fixture(scope="module")
def trials(store):
    return data.study_trials(store, store.trials()["study"].iloc[0])


def _annotation(fig: go.Figure) -> str:
    return " ".join(a.text for a in fig.layout.annotations)


@pytest.mark.parametrize("fmt", ["nvfp4", "int8"])
def test_error_heatmap_layers_by_steps(store, run, fmt):
    grid = data.layer_error_grid(store, run, fmt)
    fig = figures.error_heatmap(grid, fmt, log=False)
    (hm,) = fig.data
    assert isinstance(hm, go.Heatmap)
    z = np.asarray(hm.z, dtype=float)
    assert z.shape == (grid["layer"].nunique(), STEPS)
    assert list(hm.x) == list(range(STEPS))
    first = grid[grid["layer"] == hm.y[0]].sort_values("step")["out_err"].to_numpy()
    np.testing.assert_allclose(z[0], first)
    logged = figures.error_heatmap(grid, fmt, log=True)
    np.testing.assert_allclose(np.asarray(logged.data[0].z, dtype=float), np.log10(z))
    assert fmt.upper() in fig.layout.title.text


def test_predictor_scatter_has_points_per_branch_and_the_fitted_line(store):
    fit_id = data.fits(store)["fit_id"].iloc[0]
    layers = data.fit_layers(store, fit_id)
    row = layers.iloc[0]
    pairs = data.predictor_pairs(store, list(row["run_ids"]), row["layer"])
    fig = figures.predictor_scatter(pairs, row["layer"], row["alpha"], row["beta"], row["r2"])
    markers = [t for t in fig.data if t.mode == "markers"]
    assert sorted(t.name for t in markers) == ["cond", "uncond"]
    assert sum(len(t.x) for t in markers) == len(pairs)
    (line,) = [t for t in fig.data if t.mode == "lines"]
    np.testing.assert_allclose(line.y, row["alpha"] * np.asarray(line.x) + row["beta"])
    assert f"{row['r2']:.3f}" in line.name


def test_r2_histogram_counts_every_layer(store):
    layers = data.fit_layers(store, data.fits(store)["fit_id"].iloc[0])
    fig = figures.r2_histogram(layers)
    assert sum(len(t.x) for t in fig.data) == len(layers)
    assert {t.name for t in fig.data} <= {"trusted", "not trusted (static format)"}


@pytest.mark.parametrize("value", ["delta_cos", "delta_change", "gamma"])
def test_block_heatmap_blocks_by_steps(store, run, value):
    grid = data.block_delta_grid(store, run)
    fig = figures.block_heatmap(grid, value)
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (grid["block_index"].nunique(), STEPS)
    if value != "gamma":
        assert np.isnan(z[:, 0]).all() and np.isfinite(z[:, 1:]).all()


def test_pareto_figure_highlights_the_front(trials):
    fig = figures.pareto_figure(trials)
    (front,) = [t for t in fig.data if t.name == "Pareto front (feasible)"]
    assert len(front.x) == int(trials["pareto"].sum())
    assert sum(len(t.x) for t in fig.data if t.mode == "markers") == int((trials["state"] == "COMPLETE").sum())


def test_hypervolume_and_importance_figures(trials, dash_store):
    hv = data.hypervolume_history(trials)
    fig = figures.hypervolume_figure(hv)
    assert list(fig.data[0].y) == pytest.approx(hv["hypervolume"].tolist())
    imp = data.param_importance(trials, trials["study"].iloc[0], dash_store)
    fig = figures.importance_figure(imp.table)
    assert {t.name for t in fig.data} == set(imp.table["objective"])


def test_policy_map_figures(store, run, trials):
    number = int(trials[trials["reference"] == "static_nvfp4"]["number"].iloc[0])
    policy = data.trial_policy(store, trials["study"].iloc[0], number)
    precision, skips = data.policy_maps(store, policy, run)
    pf = figures.precision_map_figure(precision)
    z = np.asarray(pf.data[0].z, dtype=float)
    assert z.shape == (len(policy["dmpq"]["layers"]), STEPS) and (z == 1.0).all()
    sf = figures.skip_map_figure(skips)
    assert np.asarray(sf.data[0].z, dtype=float).shape == (skips["block_index"].nunique(), STEPS)


def test_gpu_comparison_figure(dash_store, second_store):
    stores = data.open_stores([dash_store, second_store])
    try:
        comp = data.gpu_comparison(stores)
    finally:
        for s in stores.values():
            s.close()
    fig = figures.gpu_comparison_figure(comp)
    speed = [t for t in fig.data if t.name == "speedup"][0]
    assert len(speed.x) == 2 and list(speed.y) == pytest.approx(comp["speedup"].tolist())


def test_every_builder_accepts_empty_frames():
    empty = pd.DataFrame
    cases = [
        figures.error_heatmap(empty(columns=["layer", "block_index", "step", "out_err"]), "nvfp4"),
        figures.predictor_scatter(empty(columns=["gamma_prev", "out_err", "branch"]), "l", None, None, None),
        figures.r2_histogram(empty(columns=["r2", "trusted"])),
        figures.block_heatmap(empty(columns=["block_index", "step", "delta_cos"]), "delta_cos"),
        figures.pareto_figure(empty(columns=["state", "pareto"])),
        figures.hypervolume_figure(empty(columns=["number", "hypervolume"])),
        figures.importance_figure(empty(columns=["objective", "param", "importance"])),
        figures.precision_map_figure(empty(columns=["layer", "block_index", "step", "nvfp4_share"])),
        figures.skip_map_figure(empty(columns=["block_index", "step", "skip_share"])),
        figures.gpu_comparison_figure(empty(columns=["store", "gpu", "latency_ms"])),
    ]
    for fig in cases:
        assert isinstance(fig, go.Figure) and len(fig.data) == 0 and _annotation(fig)
