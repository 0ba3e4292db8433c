"""The GPUs page and the attention maps: the data functions on two real stores recorded as two GPUs' searches
(``gpu_stores``), the figures, and the pages under AppTest."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from dashboard_helpers import H100, H200, MODEL, PROMPTS, TRIALS, new_app, open_page, retarget, texts
from sixbit_tune.dashboard import data, figures

from sixbit_tune import policy as P
from sixbit_tune.store import Store


@pytest.fixture
def two(gpu_stores):
    stores = data.open_stores([gpu_stores["h200"], gpu_stores["h100"]])
    yield stores
    for s in stores.values():
        s.close()


def _raw_trials(path) -> pd.DataFrame:
    with Store.open(path, read_only=True) as s:
        t = s.trials()
    t["feasible"] = t["quality"].map(lambda q: json.loads(q)["feasible"] if isinstance(q, str) else True)
    return t


def _dominates(a, b) -> bool:
    """a dominates b under (latency min, memory min, PSNR max)."""
    la, lb = (a["latency_ms"], a["memory_bytes"], -a["psnr_db"]), (b["latency_ms"], b["memory_bytes"], -b["psnr_db"])
    return all(x <= y for x, y in zip(la, lb)) and any(x < y for x, y in zip(la, lb))


# ------------------------------------------------------------------------------------------------ data


def test_trials_carry_their_gpu_and_a_front_per_gpu(two, gpu_stores):
    t = data.gpu_trials(two)
    assert t.groupby("gpu").size().to_dict() == {H200["name"]: TRIALS, H100["name"]: TRIALS + 1}
    assert set(t["series"]) == {H200["name"], H100["name"]}  # one search per GPU: the series is the GPU
    for gpu, path in ((H200["name"], gpu_stores["h200"]), (H100["name"], gpu_stores["h100"])):
        g = t[t["gpu"] == gpu]
        raw = _raw_trials(path).set_index("number")
        assert g.set_index("number")["latency_ms"].to_dict() == pytest.approx(raw["latency_ms"].to_dict())
        ok = g[(g["state"] == "COMPLETE") & g["feasible"].fillna(True)]
        assert g["pareto"].any()
        for _, r in ok.iterrows():  # the front by its definition, among this GPU's feasible trials only
            dominated = any(_dominates(o, r) for _, o in ok.iterrows())
            assert bool(r["pareto"]) == (not dominated), (gpu, r["number"])
        assert not g.loc[~g["feasible"].fillna(True), "pareto"].any()


def test_gpu_overview_has_each_gpus_facts_and_best_figures(two, gpu_stores):
    t = data.gpu_trials(two)
    o = data.gpu_overview(two, t).set_index("gpu")
    assert list(o.index) == [H200["name"], H100["name"]]
    for gpu, path, n in ((H200, gpu_stores["h200"], TRIALS), (H100, gpu_stores["h100"], TRIALS + 1)):
        row = o.loc[gpu["name"]]
        assert row["gpu_memory_bytes"] == gpu["memory_bytes"]
        assert row["compute_capability"] == gpu["compute_capability"] and row["driver"] == gpu["driver"]
        raw = _raw_trials(path)
        ok = raw[(raw["state"] == "COMPLETE") & raw["feasible"]]
        assert row["trials"] == n and row["feasible"] == len(ok)
        assert row["fastest_feasible_ms"] == pytest.approx(ok["latency_ms"].min())
        assert row["best_speedup"] == pytest.approx(ok["speedup"].max())


def test_one_gpu_alone(gpu_stores):
    with Store.open(gpu_stores["h200"], read_only=True) as s:
        stores = {"h200": s}
        t = data.gpu_trials(stores)
        cands, problems = data.gpu_policies(stores, t)
    assert list(cands) == [H200["name"]] and not problems
    assert cands[H200["name"]][0].source.startswith("fastest feasible trial")


def test_candidates_exported_files_and_fastest_trial(two, gpu_stores, tmp_path):
    # the policies folder: the H100 export, an H200 policy of the same model, one of another model, a broken one
    policies = tmp_path / "policies"
    shutil.copytree(gpu_stores["policies"], policies)
    h100_export = P.load(policies / "reference-h100.json")
    h200_file = retarget(h100_export, H200)
    P.save(h200_file, policies / "tuned-elsewhere-h200.json")
    other = h200_file.replace(model=P.ModelInfo(h200_file.model.cls, "wan", "0" * 64, h200_file.model.blocks))
    P.save(other, policies / "other-model-h200.json")
    (policies / "broken.json").write_text('{"schema_version": 1, "model": ')
    t = data.gpu_trials(two)
    cands, problems = data.gpu_policies(two, t, policies)

    h100 = cands[H100["name"]]
    assert [c.source for c in h100][0] == "exported reference-h100 (store h100)"
    assert not any("reference-h100.json" in c.source for c in h100)  # the exported file is listed once
    assert h100[0].policy == h100_export and h100[0].measured == {
        k: v for k, v in h100_export.measured.to_dict().items() if v is not None}
    assert h100[-1].source.startswith("fastest feasible trial")
    h200 = [c.source for c in cands[H200["name"]]]
    assert h200[0] == "policies/tuned-elsewhere-h200.json"
    assert not any("other-model" in s for s in h200)
    raw = _raw_trials(gpu_stores["h200"])
    fastest = raw[(raw["state"] == "COMPLETE") & raw["feasible"]].sort_values("latency_ms").iloc[0]
    trial = cands[H200["name"]][1]
    assert trial.trial == int(fastest["number"]) and trial.measured["latency_ms"] == pytest.approx(
        fastest["latency_ms"])
    assert len(problems) == 1 and "broken.json" in problems[0]


def _chosen(two, gpu_stores):
    t = data.gpu_trials(two)
    cands, _ = data.gpu_policies(two, t, gpu_stores["policies"])
    return t, {g: c[0] for g, c in cands.items()}


def test_side_by_side_and_what_differs(two, gpu_stores):
    t, chosen = _chosen(two, gpu_stores)
    overview = data.gpu_overview(two, t)
    side = data.policy_side_by_side(chosen, overview)
    assert list(side.columns) == ["section", "setting", H200["name"], H100["name"]]
    v = side.set_index(["section", "setting"])
    pols = {g: c.policy for g, c in chosen.items()}
    for g, p in pols.items():
        assert v.loc[("TDC", "tolerance δ"), g] == pytest.approx(p.tdc.tolerance)
        assert v.loc[("TDC", "cache_dtype"), g] == p.tdc.cache_dtype
        assert v.loc[("DMPQ", "threshold τ"), g] == pytest.approx(p.dmpq.threshold)
        stored = v.loc["DMPQ"].filter(regex="^layers storing", axis=0)[g]
        assert stored.notna().all()  # a weight format the policy does not store counts 0
        assert stored.sum() == len(p.dmpq.layers) == v.loc[("DMPQ", "in-block layers"), g]
        for k in ("latency_ms", "psnr_db", "nvfp4_share"):
            assert v.loc[("measured", k), g] == pytest.approx(chosen[g].measured[k])
    assert v.loc[("device", "GPU memory"), H200["name"]] == H200["memory_bytes"]

    diff = data.differing_settings(side).set_index(["section", "setting"])
    assert ("device", "GPU memory") in diff.index  # the two GPUs' memory always differs
    assert ("target", "GPU") not in diff.index and ("policy", "source") not in diff.index
    a, b = pols[H200["name"]], pols[H100["name"]]
    for knob in ("tolerance", "warmup", "cooldown", "max_skips", "cache_dtype", "refresh_robust"):
        setting = "tolerance δ" if knob == "tolerance" else knob
        assert (("TDC", setting) in diff.index) == (getattr(a.tdc, knob) != getattr(b.tdc, knob)), knob
    assert (("DMPQ", "threshold τ") in diff.index) == (a.dmpq.threshold != b.dmpq.threshold)
    assert len(diff) >= 2  # the GPU memory and the two searches' different choices


def test_layer_routes_and_counts(two, gpu_stores):
    _, chosen = _chosen(two, gpu_stores)
    layers = data.layer_decisions(chosen)
    layers = layers[~layers["layer"].str.startswith("attention of block")]
    pols = {g: c.policy for g, c in chosen.items()}
    names = set(pols[H200["name"]].dmpq.layers)
    assert set(layers["layer"]) == names
    for _, r in layers.iterrows():
        routes = [data.layer_route(pols[g].dmpq.layers[r["layer"]])[1] for g in pols]
        assert list(r[list(pols)]) == routes
        assert r["differs"] == (routes[0] != routes[1])
    blocks = [int(n.split(".")[1]) for n in layers["layer"]]
    assert blocks == sorted(blocks)
    counts = data.route_counts(chosen)
    for g, p in pols.items():
        for what in ("weight", "route"):
            assert counts.loc[counts["what"] == what, g].sum() == len(p.dmpq.layers)
        route_of = pd.Series([data.layer_route(lp)[1] for lp in p.dmpq.layers.values()]).value_counts()
        mine = counts[counts["what"] == "route"].set_index("value")[g]
        assert mine[mine > 0].to_dict() == route_of.to_dict()


def test_layer_route_of_each_schema_1_spelling():
    def route(mode, **kw):
        return data.layer_route(P.LayerPolicy(mode, 64, 64, **kw))

    weight, dyn = route("dynamic", alpha=0.5, beta=0.01)
    assert weight.startswith("nvfp4") and dyn.startswith("nvfp4/nvfp4 | ") and dyn.endswith("int8 (dynamic)")
    assert route("nvfp4") == ("nvfp4", "nvfp4/nvfp4")
    assert route("int8") == ("int8", "int8/int8")
    assert route("none") == ("none", "none (model dtype)")


@pytest.mark.skipif(not hasattr(P, "MenuEntry"), reason="the policy schema has no routes per layer yet (schema 1)")
def test_layer_route_of_schema_2_layers():
    def lp(**kw):
        return P.LayerPolicy(in_features=64, out_features=64, **kw)

    assert data.layer_route(lp(weight="nvfp4", fast="nvfp4", robust="fp8", mode="robust")) == ("nvfp4", "nvfp4/fp8")
    assert data.layer_route(lp(weight="fp8")) == ("fp8", "fp8/fp8")
    assert data.layer_routes(lp(weight="nvfp4", fast="nvfp4", robust="fp8", mode="dynamic", alpha=0.5, beta=0.0)) == (
        "nvfp4", ("nvfp4/nvfp4", "nvfp4/fp8"))


@pytest.mark.skipif(not hasattr(P, "MenuEntry"), reason="the policy schema has no GPU menus yet (schema 1)")
def test_menus_and_route_speeds_compared(two, gpu_stores):
    _, chosen = _chosen(two, gpu_stores)
    m = data.menu_comparison(chosen)
    for _, r in m.iterrows():  # the layers of each GPU's policy that may take each route of its menu
        layers = chosen[r["gpu"]].policy.dmpq.layers.values()
        assert r["layers"] == sum(r["route"] in data.layer_routes(lp)[1] for lp in layers)
    speeds = {H200["name"]: 1.62, H100["name"]: 1.50}
    for g, c in chosen.items():
        menu = {"fp8/fp8": P.MenuEntry("torch-scaled-mm", tflops=1166.0, speedup=speeds[g]),
                "int8/int8": P.MenuEntry("triton", tflops=None, speedup=None)}
        target = P.Target(c.policy.target.gpu, c.policy.target.compute_capability, menu)
        chosen[g] = data.ChosenPolicy(g, c.source, c.policy.replace(target=target), c.measured)
    m = data.menu_comparison(chosen)
    assert set(m["route"]) == {"fp8/fp8", "int8/int8"}
    fp8 = m[m["route"] == "fp8/fp8"].set_index("gpu")
    assert fp8.loc[H100["name"], "speedup"] == pytest.approx(1.50)
    assert fp8.loc[H200["name"], "tflops"] == pytest.approx(1166.0)
    assert (fp8["implementation"] == "torch-scaled-mm").all()
    side = data.policy_side_by_side(chosen)
    assert side.set_index("setting").loc["menu routes", H100["name"]] == "fp8/fp8, int8/int8"
    wide = data.menu_side_by_side(m).set_index("route")
    assert wide.loc["fp8/fp8", f"{H200['name']}: speedup"] == pytest.approx(1.62)
    assert wide.loc["fp8/fp8", f"{H100['name']}: speedup"] == pytest.approx(1.50)
    assert list(wide.columns[:2]) == [f"{H200['name']}: layers", f"{H200['name']}: implementation"]


@pytest.mark.skipif(not hasattr(P, "Attention"), reason="the policy schema has no attention section yet")
def test_attention_choices_compared(two, gpu_stores):
    _, chosen = _chosen(two, gpu_stores)
    h200, h100 = chosen[H200["name"]], chosen[H100["name"]]
    line = {"pooled": (0.5, 0.01, 0.9, 12)}
    att = P.Attention(threshold=0.05, format="fp8",
                      blocks={"0": P.AttentionBlock("dynamic", line), "1": P.AttentionBlock("8bit")})
    chosen[H100["name"]] = data.ChosenPolicy(h100.gpu, h100.source, h100.policy.replace(attention=att),
                                             h100.measured)
    chosen[H200["name"]] = data.ChosenPolicy(h200.gpu, h200.source, h200.policy.replace(attention=None),
                                             h200.measured)
    side = data.policy_side_by_side(chosen).set_index(["section", "setting"])
    assert side.loc[("attention", "8-bit attention"), H100["name"]] == "on"
    assert side.loc[("attention", "8-bit attention"), H200["name"]] == "off"
    blocks = h100.policy.model.blocks
    assert side.loc[("attention", "blocks dynamic"), H100["name"]] == 1
    assert side.loc[("attention", "blocks bf16"), H100["name"]] == blocks - 2
    assert side.loc[("attention", "blocks bf16"), H200["name"]] == blocks
    diff = data.differing_settings(side.reset_index()).set_index(["section", "setting"])
    assert ("attention", "threshold τ_a") in diff.index and ("attention", "format") in diff.index
    layers = data.layer_decisions(chosen).set_index("layer")
    assert layers.loc["attention of block 0", H100["name"]] == "attention dynamic"
    assert layers.loc["attention of block 0", H200["name"]] == "attention bf16"
    assert layers.loc["attention of block 0", "differs"]
    if blocks > 2:
        assert not layers.loc[f"attention of block {blocks - 1}", "differs"]


def test_chosen_points_sit_on_their_search(two, gpu_stores):
    t, chosen = _chosen(two, gpu_stores)
    pts = data.chosen_points(t, chosen).set_index("gpu")
    for g, c in chosen.items():
        assert pts.loc[g, "series"] == g
        assert pts.loc[g, "latency_ms"] == pytest.approx(c.measured["latency_ms"])
        hit = t[(t["gpu"] == g) & (t["number"] == c.trial)]
        assert pts.loc[g, "memory_bytes"] == hit["memory_bytes"].iloc[0]
    fig = figures.gpu_fronts_figure(t, data.chosen_points(t, chosen))
    names = {tr.name for tr in fig.data if tr.showlegend}
    assert {H200["name"], H100["name"], "chosen policy"} <= names
    xs = np.concatenate([np.asarray(tr.x, dtype=float) for tr in fig.data if tr.mode == "markers"])
    assert set(t.loc[t["state"] == "COMPLETE", "latency_ms"].round(6)) <= set(np.round(xs, 6))
    assert fig.layout.xaxis.matches == "x2" or fig.layout.xaxis2.matches == "x"  # shared latency axis


def test_fronts_figure_without_trials():
    fig = figures.gpu_fronts_figure(data.gpu_trials({}))
    assert "no completed trials" in fig.layout.annotations[0].text


# ------------------------------------------------------------------------------------------------ attention


@pytest.fixture(scope="module")
def no_attention_store(tmp_path_factory):
    """A real profile (1 prompt x 2 steps) with attention errors off."""
    from sixbit_tune.profiling.runner import ProfileConfig, profile

    path = tmp_path_factory.mktemp("noattn") / "store"
    profile(ProfileConfig(model=MODEL, prompts=[PROMPTS[0]], store=str(path), steps=2, device="cpu",
                          progress=False, attention_formats=()))
    return path


def test_attention_grid_means_over_prompts_and_branches(dash_store):
    with Store.open(dash_store, read_only=True) as s:
        assert data.attention_table(s) in data.ATTENTION_TABLES
        run = data.profile_runs(s)["run_id"].iloc[0]
        formats = data.attention_formats(s, run)
        raw = s.query(f"SELECT * FROM {data.attention_table(s)} WHERE run_id = ?", [run])
        assert formats and formats == sorted(raw["format"].unique())
        grid = data.attention_grid(s, run, formats[0])
        cond = data.attention_grid(s, run, formats[0], "cond")
    raw = raw[raw["format"] == formats[0]]
    want = raw.groupby(["block_index", "step"])["attn_err"].mean()
    assert grid.set_index(["block_index", "step"])["attn_err"].to_dict() == pytest.approx(want.to_dict())
    want_cond = raw[raw["branch"] == "cond"].groupby(["block_index", "step"])["attn_err"].mean()
    assert cond.set_index(["block_index", "step"])["attn_err"].to_dict() == pytest.approx(want_cond.to_dict())
    fig = figures.attention_heatmap(grid, formats[0])
    assert np.nanmax(fig.data[0].customdata) == pytest.approx(want.max())


def test_a_run_without_attention_errors(no_attention_store):
    with Store.open(no_attention_store, read_only=True) as s:
        run = data.profile_runs(s)["run_id"].iloc[0]
        assert data.attention_formats(s, run) == []
        assert data.attention_grid(s, run, "fp8").empty
    assert "no fp8 attention errors" in figures.attention_heatmap(pd.DataFrame(), "fp8").layout.annotations[0].text


# ------------------------------------------------------------------------------------------------ pages


def _clean(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, texts(at.error)


def _frame(at, columns: set[str]) -> pd.DataFrame:
    hits = [d.value for d in at.dataframe if columns <= set(d.value.columns)]
    assert hits, [list(d.value.columns) for d in at.dataframe]
    return hits[0]


def test_gpus_page_two_gpus_side_by_side(gpu_stores, app_argv):
    app_argv(gpu_stores["h200"], gpu_stores["h100"], policies_dir=gpu_stores["policies"])
    at = open_page(new_app(), "gpus")
    _clean(at)
    assert "One GPU" not in texts(at.info)
    (fig,) = [json.loads(c.proto.spec) for c in at.get("plotly_chart")
              if "Pareto fronts per GPU" in json.loads(c.proto.spec)["layout"]["title"]["text"]]
    assert {H200["name"], H100["name"], "chosen policy"} <= {t.get("name") for t in fig["data"]}
    overview = _frame(at, {"gpu", "front", "gpu_memory_bytes"})
    assert overview["gpu"].tolist() == [H200["name"], H100["name"]]
    side = _frame(at, {"section", "setting", H200["name"], H100["name"]})
    src = side.set_index("setting").loc["source"]
    assert src[H100["name"]] == "exported reference-h100 (store h100)"
    assert src[H200["name"]].startswith("fastest feasible trial")
    diffs = [d.value for d in at.dataframe if {"section", "setting"} <= set(d.value.columns)]
    assert len(diffs) == 2 and "GPU memory" in diffs[1]["setting"].tolist()
    assert "in-block layers take different routes" in texts(at.caption)
    menu_cols = {f"{H200['name']}: implementation", f"{H100['name']}: implementation"}
    assert "carry no menu" in texts(at.info) or any(menu_cols <= set(d.value.columns) for d in at.dataframe)
    # choose the H100's fastest trial instead of its export: the table follows
    box = at.selectbox(key="gpus_choice_1")
    assert box.label == H100["name"]
    box.set_value(len(box.options) - 1).run()
    _clean(at)
    side = _frame(at, {"section", "setting", H100["name"]})
    assert side.set_index("setting").loc["source", H100["name"]].startswith("fastest feasible trial")


def test_gpus_page_with_one_gpu_says_so(gpu_stores, app_argv, tmp_path):
    app_argv(gpu_stores["h100"], policies_dir=tmp_path / "none")
    at = open_page(new_app(), "gpus")
    _clean(at)
    assert f"One GPU in the opened store(s): {H100['name']}" in texts(at.info)
    assert "nothing to compare" in texts(at.info)
    side = _frame(at, {"section", "setting", H100["name"]})
    assert len(side.columns) == 3


def test_gpus_page_names_an_unreadable_policy_file(gpu_stores, app_argv, tmp_path):
    policies = tmp_path / "policies"
    shutil.copytree(gpu_stores["policies"], policies)
    (policies / "broken.json").write_text("{not json")
    app_argv(gpu_stores["h200"], gpu_stores["h100"], policies_dir=policies)
    at = open_page(new_app(), "gpus")
    assert not at.exception
    assert "broken.json" in texts(at.warning)
    assert _frame(at, {"section", "setting", H100["name"]}) is not None


def test_sensitivity_page_shows_attention_beside_the_layer_maps(dash_store, app_argv):
    app_argv(dash_store)
    at = open_page(new_app(), "sensitivity")
    _clean(at)
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]
    assert any("attention error (attn_err)" in t for t in titles), titles
    assert any("NVFP4" in t for t in titles)


def test_sensitivity_page_without_attention_says_so(no_attention_store, app_argv):
    app_argv(no_attention_store)
    at = open_page(new_app(), "sensitivity")
    _clean(at)
    assert "No attention was profiled" in texts(at.info)
