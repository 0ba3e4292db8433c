"""The predictor fit: closed-form least squares, the store join Γ_{t−1} → out_err_t, pooling and trust."""

from __future__ import annotations

import numpy as np
import pytest

from sixbit_tune.predictor import (
    FitSettings,
    fit_line,
    fit_store,
    r2_report,
    read_predictors,
    write_fit,
)


def test_fit_line_matches_numpy_polyfit():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.1, 2.0, 200)
    y = 0.3 * x + 0.05 + rng.normal(0, 0.01, 200)
    f = fit_line(x, y)
    slope, intercept = np.polyfit(x, y, 1)
    assert f.alpha == pytest.approx(slope, rel=1e-10)
    assert f.beta == pytest.approx(intercept, rel=1e-10)
    r = np.corrcoef(x, y)[0, 1]
    assert f.r2 == pytest.approx(r * r, rel=1e-10)
    assert f.n == 200


def test_fit_line_degenerate_cases_are_defined():
    const_x = fit_line([1.0, 1.0, 1.0], [0.1, 0.2, 0.3])
    assert (const_x.alpha, const_x.r2) == (0.0, 0.0) and const_x.beta == pytest.approx(0.2)
    const_y = fit_line([1.0, 2.0, 3.0], [0.5, 0.5, 0.5])
    assert const_y.alpha == 0.0 and const_y.beta == pytest.approx(0.5) and const_y.r2 == 1.0
    assert fit_line([], []).n == 0
    with pytest.raises(ValueError, match="NaN"):
        fit_line([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="length"):
        fit_line([1.0, 2.0], [1.0])


def _synthetic_store(tmp_path, per_branch_slopes: bool):
    """A real store with block_steps/layer_steps whose out_err follows known lines of the previous step's gamma."""
    from sixbit_tune.store import Store

    rng = np.random.default_rng(1)
    store = Store.create(tmp_path / "store")
    w = store.writer()
    run = w.begin_run("profile", "synthetic", config_hash="h0", settings={"steps": 6})
    blocks, layers, steps, prompts = 2, {"l0": (0, 0.4, 0.02), "l1": (1, 0.1, 0.05), "noisy": (1, 0.0, 0.08)}, 6, 3
    bs, ls = [], []
    gamma = {}
    for p in range(prompts):
        for br in ("cond", "uncond"):
            for t in range(steps):
                for b in range(blocks):
                    g = float(rng.uniform(0.05, 1.0))
                    gamma[p, br, t, b] = g
                    bs.append(dict(prompt_index=p, branch=br, step=t, block_index=b, gamma=g,
                                   delta_change=None if t == 0 else float(rng.uniform(0, 0.3))))
                for name, (b, a, c) in layers.items():
                    if t == 0:
                        err = 0.05
                    else:
                        slope = a * (2.0 if (per_branch_slopes and br == "uncond") else 1.0)
                        noise = rng.normal(0, 0.03) if name == "noisy" else rng.normal(0, 1e-4)
                        err = slope * gamma[p, br, t - 1, b] + c + noise
                    ls.append(dict(prompt_index=p, branch=br, step=t, block_index=b, layer=name,
                                   format="nvfp4", out_err=abs(err)))
                    ls.append(dict(prompt_index=p, branch=br, step=t, block_index=b, layer=name,
                                   format="int8", out_err=0.01))
    w.write_block_steps(bs, run_id=run)
    w.write_layer_steps(ls, run_id=run)
    w.finish_run(run)
    return store, run


def test_fit_store_recovers_known_lines_and_flags_noise(tmp_path):
    store, run = _synthetic_store(tmp_path, per_branch_slopes=False)
    result = fit_store(store, settings=FitSettings(min_r2=0.5, min_n=8))
    assert result.run_ids == [run]
    l0 = result.layers["l0"]
    # pairs: 3 prompts x 2 branches x 5 steps (step >= 1)
    assert l0.pooled.n == 30 and l0.block_index == 0
    assert l0.pooled.alpha == pytest.approx(0.4, abs=2e-3) and l0.pooled.beta == pytest.approx(0.02, abs=2e-3)
    assert l0.pooled.r2 > 0.99 and l0.trusted
    assert result.layers["l1"].pooled.alpha == pytest.approx(0.1, abs=2e-3)
    noisy = result.layers["noisy"]
    assert not noisy.trusted and "R²" in noisy.reason
    assert set(l0.per_branch) == {"cond", "uncond"} and l0.per_branch["cond"].n == 15
    assert result.pooling == "pooled"  # branches follow the same line

    fit_id = write_fit(store.writer(), result)
    back = read_predictors(store)
    assert back.fit_id == fit_id and back.run_ids == [run]
    assert back.layers["l0"][0] == pytest.approx(l0.pooled.alpha)
    assert set(back.dynamic_layers()) == {"l0", "l1"} and back.static_layers() == {"noisy": "int8"}


def test_pooling_choice_follows_the_data(tmp_path):
    store, _ = _synthetic_store(tmp_path, per_branch_slopes=True)
    result = fit_store(store)
    ev = result.pooling_evidence
    assert ev["median_r2_per_branch"] > ev["median_r2_pooled"] + 0.05
    assert result.pooling == "per_branch"
    assert result.layers["l0"].per_branch["uncond"].alpha == pytest.approx(0.8, abs=5e-3)
    forced = fit_store(store, settings=FitSettings(pooling="pooled"))
    assert forced.pooling == "pooled"


def test_fit_store_without_profile_says_what_to_run(tmp_path):
    from sixbit_tune.store import Store

    store = Store.create(tmp_path / "empty")
    with pytest.raises(ValueError, match="sixbit-tune profile"):
        fit_store(store)


def test_r2_report_has_quantiles_and_histogram():
    text = r2_report(np.array([0.1, 0.5, 0.9, 0.95, 1.0]))
    assert "5 layers" in text and "q50=0.900" in text
    assert text.count("\n") == 10 and "[0.9, 1.0]     3 " in text


def test_fit_command_records_the_fit_and_prints_the_r2_distribution(tmp_path, capsys):
    from sixbit_tune.cli import main

    store, run = _synthetic_store(tmp_path, per_branch_slopes=False)
    assert main(["fit", "--store", str(store.path), "--min-r2", "0.9", "--max-rel-rmse", "0.0"]) == 0
    out = capsys.readouterr().out
    assert f"from profile runs {run}" in out and "R² over 3 layers" in out and "-> pooled" in out
    assert "not trusted: 1 (policies run these as static INT8)" in out and "noisy: R²=" in out
    assert "route int8: 3 layers" in out
    df = store.predictors(store.latest_fit_id())
    assert sorted(set(df["format"])) == ["int8", "nvfp4"]  # a line per layer for every recorded route
    int8 = df[df["format"] == "int8"]
    assert sorted(int8["layer"]) == ["l0", "l1", "noisy"] and list(int8["beta"]) == pytest.approx([0.01] * 3)
    df = df[df["format"] == "nvfp4"]
    assert sorted(df["layer"]) == ["l0", "l1", "noisy"]
    assert dict(zip(df["layer"], df["trusted"])) == {"l0": True, "l1": True, "noisy": False}
    assert main(["fit", "--store", str(tmp_path / "nowhere")]) != 0
