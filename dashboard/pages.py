"""The dashboard's pages: thin Streamlit renderers over :mod:`~sixbit_tune.dashboard.data` (queries) and
:mod:`~sixbit_tune.dashboard.figures` (Plotly figures).

Caching: the store view is a ``st.cache_resource`` (one in-memory DuckDB over the part files, shared by sessions;
every query takes its own cursor); query results are ``st.cache_data`` keyed on the function, its arguments and
:func:`~sixbit_tune.dashboard.data.fingerprint` of the stores' part files, so data written by a running profile or
search shows up on the next rerun while unchanged data is never queried twice.

Where a page's data does not exist yet, it says which command produces it (``st.info``) instead of failing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st
from sixbit_tune.dashboard import data, figures
from sixbit_tune.dashboard.export import check_export_name, export_policy

from sixbit_tune.routes import PROFILE_ROUTES, V1_FORMATS
from sixbit_tune.store import Store

# ------------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class Settings:
    """What ``sixbit-tune dashboard`` passed to the app (after ``--`` on the ``streamlit run`` line)."""

    stores: dict[str, Path]
    policies_dir: Path
    optuna_storage: str | None = None


def parse_args(argv: Sequence[str]) -> Settings:
    """Parse the app's own arguments: ``--store PATH`` (repeatable), ``--policies-dir``, ``--optuna-storage``.

    Raises:
        ValueError: no ``--store`` (or the same store twice).
    """
    p = argparse.ArgumentParser(prog="sixbit-tune dashboard app", add_help=False, exit_on_error=False)
    p.add_argument("--store", action="append", default=[])
    p.add_argument("--policies-dir", default="policies")
    p.add_argument("--optuna-storage", default=None)
    try:
        ns, _unknown = p.parse_known_args(list(argv))
    except argparse.ArgumentError as e:
        raise ValueError(str(e)) from None
    if not ns.store:
        raise ValueError("no store given: start the dashboard with `sixbit-tune dashboard --store PATH`")
    return Settings(data.store_labels(ns.store), Path(ns.policies_dir).absolute(), ns.optuna_storage)


def settings() -> Settings:
    """The app's settings from ``sys.argv`` (shows an error and stops the page when they are unusable)."""
    try:
        return parse_args(sys.argv[1:])
    except ValueError as e:
        st.error(str(e))
        st.stop()
        raise


@st.cache_resource(show_spinner=False)
def _open(path: str) -> Store:
    return Store.open(path, read_only=True)


def current_store(cfg: Settings) -> str:
    """The label of the store the pages show (a sidebar choice when several were given)."""
    chosen = st.session_state.get("store_label")
    return chosen if chosen in cfg.stores else next(iter(cfg.stores))


def store_view(cfg: Settings, label: str | None = None) -> Store:
    """The cached read-only view of one store; an unreadable store stops the page with the reason."""
    label = label or current_store(cfg)
    try:
        return _open(str(cfg.stores[label]))
    except (FileNotFoundError, ValueError) as e:
        st.error(f"cannot open the store {label}: {e}")
    except Exception as e:  # StoreSchemaError and friends: the message says what to run
        st.error(f"cannot open the store {label} ({type(e).__name__}): {e}")
    st.stop()
    raise RuntimeError("unreachable")


@st.cache_data(show_spinner=False, max_entries=512)
def _cached(fn: str, path: str, token: str, args: tuple, kwargs: tuple) -> Any:
    return getattr(data, fn)(_open(path), *args, **dict(kwargs))


def query(cfg: Settings, fn: str, *args: Any, **kwargs: Any) -> Any:
    """``data.<fn>(store, *args, **kwargs)`` on the current store, cached until its part files change."""
    path = cfg.stores[current_store(cfg)]
    return _cached(fn, str(path), data.fingerprint([path]), tuple(args), tuple(sorted(kwargs.items())))


@st.cache_data(show_spinner=False, max_entries=16)
def _gpu_comparison(items: tuple[tuple[str, str], ...], token: str) -> pd.DataFrame:
    return data.gpu_comparison({label: _open(path) for label, path in items})


@st.cache_data(show_spinner=False, max_entries=64)
def _importance(trials: pd.DataFrame, study: str, root: str, storage: str | None, token: str) -> data.Importance:
    return data.param_importance(trials, study, root, storage)


# ------------------------------------------------------------------------------------------------ helpers

PROFILE_HINT = ("No profile data yet. Record some with `sixbit-tune profile --model SPEC --prompt TEXT --store "
                "PATH` (e.g. `--model tiny:wan --steps 4` for a quick look).")
FIT_HINT = "No fitted predictors yet. Fit them from a profile with `sixbit-tune fit --store PATH`."
SEARCH_HINT = ("No search trials yet. Run a search with `sixbit-tune search --store PATH --model SPEC` "
               "(after `profile` and `fit`).")


def _pick_run(cfg: Settings, key: str) -> str | None:
    runs = query(cfg, "profile_runs")
    if runs.empty:
        st.info(PROFILE_HINT)
        return None
    labels = {r.run_id: f"{r.run_id} · {r.model_spec} · {r.steps} steps, {r.prompts} prompts" for r in runs.itertuples()}
    return st.selectbox("profile run", list(labels), format_func=labels.get, key=key)


def _pick_branch(cfg: Settings, run_id: str, key: str) -> str | None:
    branches = query(cfg, "run_branches", run_id)
    choice = st.selectbox("guidance branch", ["both (mean)", *branches], key=key)
    return None if choice.startswith("both") else choice


def _pick_study(cfg: Settings, key: str) -> str | None:
    studies = query(cfg, "studies")
    if studies.empty:
        st.info(SEARCH_HINT)
        return None
    labels = {r.study: f"{r.study} · {r.complete}/{r.trials} complete" for r in studies.itertuples()}
    return st.selectbox("study", list(labels), format_func=labels.get, key=key)


def _fmt_bytes(v: Any) -> str:
    if v is None or pd.isna(v):
        return "-"
    v = float(v)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{v:,.1f} {unit}" if unit != "B" else f"{v:,.0f} B"
        v /= 1024
    return str(v)


def _plot(fig, key: str) -> None:
    st.plotly_chart(fig, key=key)


# ------------------------------------------------------------------------------------------------ pages


def runs_page() -> None:
    """What was profiled, with which model, settings, GPU and versions."""
    cfg = settings()
    store_view(cfg)
    st.title("Runs")
    df = query(cfg, "runs_overview")
    if df.empty:
        st.info(PROFILE_HINT)
        return
    c = st.columns(4)
    c[0].metric("runs", len(df))
    c[1].metric("profile runs", int((df["kind"] == "profile").sum()))
    c[2].metric("models", df["model_spec"].nunique())
    c[3].metric("GPUs", df["gpu"].nunique())
    st.dataframe(df.drop(columns=["store"]), hide_index=True, key="runs_table")
    run = st.selectbox("run settings", df["run_id"].tolist(), key="runs_detail")
    st.json(query(cfg, "run_settings", run), expanded=1)


def sensitivity_page() -> None:
    """out_err per layer × step for NVFP4 and INT8 (the paper's Figure 1)."""
    cfg = settings()
    store_view(cfg)
    st.title("Sensitivity: quantization error per layer and step")
    run = _pick_run(cfg, "sens_run")
    if run is None:
        return
    cols = st.columns(2)
    with cols[0]:
        branch = _pick_branch(cfg, run, "sens_branch")
    with cols[1]:
        log = st.checkbox("log colour scale", value=True, key="sens_log")
    summary = query(cfg, "format_summary", run)
    if summary.empty:
        st.info(f"This run recorded no layer errors: profile with `--formats {','.join(PROFILE_ROUTES)}`.")
        return
    st.dataframe(summary, hide_index=True, key="sens_summary")
    layer_col, attn_col = st.columns([3, 2])
    recorded = set(summary["format"])
    with layer_col:
        # the fast and robust formats always get a map (or say how to record them), every other route where recorded
        for fmt in [f for f in PROFILE_ROUTES if f in V1_FORMATS or f in recorded]:
            grid = query(cfg, "layer_error_grid", run, fmt, branch)
            if grid.empty:
                st.info(f"No {fmt.upper()} errors in this run: profile with `--formats {','.join(PROFILE_ROUTES)}`.")
                continue
            _plot(figures.error_heatmap(grid, fmt, log=log), key=f"sens_{fmt}")
    with attn_col:
        _attention_maps(cfg, run, branch, log)


def _attention_maps(cfg: Settings, run: str, branch: str | None, log: bool) -> None:
    """attn_err per block × step of each profiled attention format, beside the layer maps."""
    if query(cfg, "attention_table") is None:
        st.info("No attention was profiled: this store has no attention error table (it predates it). Profile "
                "again with `sixbit-tune profile` into a new store to record attn_err per block and step.")
        return
    formats = query(cfg, "attention_formats", run)
    if not formats:
        st.info("No attention was profiled in this run: its profile recorded no attn_err (its attention formats "
                "were off). Profile again with the default attention formats to see 8-bit attention's error.")
        return
    for fmt in formats:
        _plot(figures.attention_heatmap(query(cfg, "attention_grid", run, fmt, branch), fmt, log=log),
              key=f"sens_attn_{fmt}")
    st.caption("attn_err = ‖O_a − O‖₂/‖O‖₂ of each block's self-attention in the 8-bit format against the model's "
               "own attention output, mean over prompts" + (" and branches." if branch is None else "."))


def predictor_page() -> None:
    """Γ_{t−1} against NVFP4 out_err with the fitted line, and the R² distribution (the paper's Figure 3)."""
    cfg = settings()
    store_view(cfg)
    st.title("Predictor: NVFP4 error from the previous step's Γ")
    fits = query(cfg, "fits")
    if fits.empty:
        st.info(FIT_HINT if not query(cfg, "profile_runs").empty else PROFILE_HINT + " Then: " + FIT_HINT)
        return
    labels = {r.fit_id: f"{r.fit_id} · {r.layers} layers, {r.trusted} trusted" for r in fits.itertuples()}
    fit_id = st.selectbox("fit", list(labels), format_func=labels.get, key="pred_fit")
    layers = query(cfg, "fit_layers", fit_id)
    by_r2 = layers.sort_values("r2", ascending=False)["layer"].tolist()
    layer = st.selectbox("layer (highest R² first)", by_r2, key="pred_layer")
    row = layers[layers["layer"] == layer].iloc[0]
    run_ids = tuple(str(r) for r in row["run_ids"])
    pairs = query(cfg, "predictor_pairs", run_ids, layer)
    c = st.columns(2)
    with c[0]:
        _plot(figures.predictor_scatter(pairs, layer, row["alpha"], row["beta"], row["r2"]), key="pred_scatter")
    with c[1]:
        _plot(figures.r2_histogram(layers), key="pred_r2")
    st.caption(f"fit on profile runs {', '.join(run_ids)}; untrusted layers run the fit's static format in policies")
    st.dataframe(layers.drop(columns=["run_ids"]), hide_index=True, key="pred_table")


def temporal_page() -> None:
    """delta_cos and delta_change per block × step (the paper's Figure 4)."""
    cfg = settings()
    store_view(cfg)
    st.title("Temporal redundancy of the blocks' residual updates")
    run = _pick_run(cfg, "temp_run")
    if run is None:
        return
    branch = _pick_branch(cfg, run, "temp_branch")
    grid = query(cfg, "block_delta_grid", run, branch)
    c = st.columns(2)
    with c[0]:
        _plot(figures.block_heatmap(grid, "delta_cos", "delta_cos = cos(Δ_t, Δ_{t−1}), block × step"), "temp_cos")
    with c[1]:
        _plot(figures.block_heatmap(grid, "delta_change", "delta_change = ‖Δ_t − Δ_{t−1}‖₂/‖Δ_{t−1}‖₂, block × step"),
              "temp_change")
    with st.expander("Γ per block × step"):
        _plot(figures.block_heatmap(grid, "gamma", "Γ = ‖Y−X‖₁/‖X‖₁, block × step"), "temp_gamma")


def search_page() -> None:
    """Pareto front, trials, parameter importance, hypervolume."""
    cfg = settings()
    store_view(cfg)
    st.title("Search")
    study = _pick_study(cfg, "search_study")
    if study is None:
        return
    trials = query(cfg, "study_trials", study)
    done = trials[trials["state"] == "COMPLETE"]
    c = st.columns(4)
    c[0].metric("trials", len(trials))
    c[1].metric("completed", len(done))
    c[2].metric("feasible", int(done["feasible"].fillna(True).astype(bool).sum()))
    c[3].metric("Pareto front", int(trials["pareto"].sum()))
    if done.empty:
        st.info("No trial of this study has completed yet; the page fills in as the search runs.")
    _plot(figures.pareto_figure(trials), "search_pareto")
    cols = st.columns(2)
    with cols[0]:
        _plot(figures.hypervolume_figure(data.hypervolume_history(trials)), "search_hv")
    with cols[1]:
        root = str(cfg.stores[current_store(cfg)])
        imp = _importance(trials, study, root, cfg.optuna_storage, data.fingerprint([root], ["trials"]))
        _plot(figures.importance_figure(imp.table), "search_importance")
        st.caption(f"Importance source: {imp.source}")
    st.subheader("Trials")
    st.dataframe(trials, hide_index=True, key="search_table")


def _trial_label(r) -> str:
    tag = "★ Pareto" if r.pareto else ("feasible" if (r.feasible is None or pd.isna(r.feasible) or r.feasible)
                                       else "below floor")
    ref = f" · {r.reference}" if isinstance(r.reference, str) else ""
    return f"#{r.number} · {r.latency_ms:.1f} ms · {r.psnr_db:.2f} dB · {tag}{ref}"


def policy_page() -> None:
    """A trial's precision and skip maps, its figures against the baseline, sample frames, and export."""
    cfg = settings()
    store_view(cfg)
    st.title("Policy")
    study = _pick_study(cfg, "pol_study")
    if study is None:
        return
    label = current_store(cfg)
    trials = query(cfg, "study_trials", study)
    done = trials[trials["state"] == "COMPLETE"].sort_values(["pareto", "latency_ms"], ascending=[False, True])
    if done.empty:
        st.info("No trial of this study has completed yet: its policies appear here as the search runs.")
        return
    labels = {int(r.number): _trial_label(r) for r in done.itertuples()}
    number = st.selectbox("trial", list(labels), format_func=labels.get, key="pol_trial")
    trial = done[done["number"] == number].iloc[0]
    policy = query(cfg, "trial_policy", study, number)
    if policy is None:
        st.info("This trial stored no policy (the search mirrors it into the store when the trial completes).")
        return

    st.subheader("Measured against the unquantized baseline")
    c = st.columns(4)
    sp = trial["speedup"]
    c[0].metric("latency", f"{trial['latency_ms']:.1f} ms", **data.speed_delta(None if pd.isna(sp) else float(sp)))
    c[1].metric("memory", _fmt_bytes(trial["memory_bytes"]), help=str(trial.get("memory_metric") or ""))
    c[2].metric("PSNR vs baseline", f"{trial['psnr_db']:.2f} dB")
    c[3].metric("NVFP4 / skipped", f"{_share(trial['nvfp4_share'])} / {_share(trial['skip_share'])}")
    st.dataframe(data.measured_vs_baseline(trial.to_dict()), hide_index=True, key="pol_measured")

    dmpq, tdc = policy.get("dmpq", {}), policy.get("tdc", {})
    st.caption(
        f"τ = {dmpq.get('threshold')}, first step {dmpq.get('first_step', dmpq.get('first_step_format'))}; "
        f"TDC δ = {tdc.get('tolerance')}, "
        f"warmup {tdc.get('warmup')}, cooldown {tdc.get('cooldown')}, max_skips {tdc.get('max_skips')}, cache "
        f"{tdc.get('cache_dtype')}; target {policy.get('target')}"
    )
    st.dataframe(data.policy_summary(policy), hide_index=True, key="pol_modes")

    st.subheader("Precision and skip maps")
    runs = query(cfg, "matching_profile_runs", (policy.get("model") or {}).get("config_hash"))
    if runs.empty:
        st.info("No profile run of this model in the store to replay the policy on: " + PROFILE_HINT)
    else:
        run = st.selectbox("replayed on profile run", runs["run_id"].tolist(), key="pol_run")
        try:
            precision, skips = query(cfg, "policy_maps", policy, run)
        except ValueError as e:
            st.info(str(e))
        else:
            c = st.columns(2)
            with c[0]:
                _plot(figures.precision_map_figure(precision), "pol_precision")
            with c[1]:
                _plot(figures.skip_map_figure(skips), "pol_skips")
            st.caption(
                "The policy's DMPQ and TDC rules replayed on the profile run's Γ and Δ statistics, per prompt and "
                "guidance branch (shares over them). At inference a skipped block also changes later inputs, so "
                "the runtime's decisions can differ; the trial's measured NVFP4 and skip shares are above."
            )

    st.subheader("Frames: baseline beside the policy")
    media = data.sample_media(cfg.stores[label], study, number)
    if not media:
        st.info(
            f"The search stored no sample frames or videos for trial {number} (it keeps only the unquantized "
            f"reference outputs, in {cfg.stores[label] / 'references'}, to compute PSNR/SSIM)."
        )
    else:
        c = st.columns(2)
        for path in media:
            with c[0 if path.name.startswith(("reference", "bf16")) else 1]:
                if path.suffix.lower() in (".mp4", ".webm"):
                    st.video(str(path))
                else:
                    st.image(str(path), caption=path.name)

    _export_section(cfg, label, study, number)


def _share(v: Any) -> str:
    return "-" if v is None or pd.isna(v) else f"{100 * float(v):.0f}%"


def _export_section(cfg: Settings, label: str, study: str, number: int) -> None:
    st.subheader("Export")
    st.caption(f"Writes the trial's policy (validated, with provenance and measured figures) into {cfg.policies_dir} "
               "with the same exporter as `sixbit-tune export`, and records it in the store.")
    name = st.text_input("policy name", value=f"{study}-trial{number}", key="pol_export_name")
    try:
        file_name = check_export_name(name)
    except ValueError as e:
        st.error(str(e))
        return
    if st.button("Export policy", key="pol_export"):
        try:
            path, payload, ok = export_policy(cfg.stores[label], study, number, name, cfg.policies_dir,
                                              cfg.optuna_storage)
        except Exception as e:  # the exporter's message says what is wrong (study storage, trial state, schema)
            st.error(f"export failed ({type(e).__name__}): {e}")
            return
        st.session_state["pol_exported"] = {"path": str(path), "payload": payload, "ok": ok, "file": file_name}
    done = st.session_state.get("pol_exported")
    if done and done["file"] == file_name:
        st.success(f"wrote {done['path']}" + ("" if done["ok"] else " (below the study's quality floor)"))
        st.download_button("Download policy JSON", data=done["payload"], file_name=file_name,
                           mime="application/json", on_click="ignore", key="pol_download")
        with st.expander("policy JSON"):
            st.json(json.loads(done["payload"]), expanded=False)


def _cell(setting: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int | float) and ("bytes" in setting or "memory" in setting):
        return _fmt_bytes(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _shown(table: pd.DataFrame, label_col: str = "setting") -> pd.DataFrame:
    """A side-by-side table with every value as display text (one column mixes numbers and words)."""
    out = table.copy()
    for col in out.columns:
        if col in ("section", label_col):
            continue
        out[col] = [_cell(str(k), v) for k, v in zip(out[label_col], out[col])]
    return out


def _rows_height(rows: int) -> int:
    """Pixel height that shows a table's header and ``rows`` rows without scrolling (Streamlit rows are 35 px)."""
    return 35 * (rows + 1) + 3


@st.cache_data(show_spinner=False, max_entries=16)
def _gpu_data(items: tuple[tuple[str, str], ...], policies_dir: str, token: str):
    stores = {label: _open(path) for label, path in items}
    trials = data.gpu_trials(stores)
    overview = data.gpu_overview(stores, trials)
    candidates, problems = data.gpu_policies(stores, trials, policies_dir)
    return trials, overview, candidates, problems


GPUS_HINT = "Compare GPUs by opening one store per GPU: `sixbit-tune dashboard --store runs/h100 --store runs/h200`."


def gpus_page() -> None:
    """Each GPU's search and chosen policy side by side, and what differs between them."""
    cfg = settings()
    for label in cfg.stores:
        store_view(cfg, label)
    st.title("GPUs")
    items = tuple((label, str(path)) for label, path in cfg.stores.items())
    token = data.fingerprint(list(cfg.stores.values())) + data.policies_token(cfg.policies_dir)
    trials, overview, candidates, problems = _gpu_data(items, str(cfg.policies_dir), token)
    if trials.empty:
        st.info(SEARCH_HINT + " " + GPUS_HINT)
    elif len(candidates) == 1:
        st.info(f"One GPU in the opened store(s): {next(iter(candidates))}; its search and chosen policy are shown "
                f"below. {GPUS_HINT}")
    if not overview.empty:
        st.dataframe(overview, hide_index=True, key="gpus_overview",
                     column_config={"gpu_memory_bytes": st.column_config.NumberColumn(format="%d")})
    for msg in problems:
        st.warning(f"left out (not a readable policy): {msg}")

    chosen: dict[str, data.ChosenPolicy] = {}
    if candidates:
        st.subheader("Chosen policy per GPU")
        st.caption("Candidates, best first: the policies exported into the GPU's store, the policy files in "
                   f"{cfg.policies_dir} made for this GPU and model, the fastest feasible trial of each search.")
        cols = st.columns(len(candidates))
        for i, (gpu, cands) in enumerate(candidates.items()):
            with cols[i]:
                if not cands:
                    st.info(f"{gpu}: no feasible completed trial and no exported policy yet.")
                    continue
                k = st.selectbox(gpu, range(len(cands)), format_func=lambda j, c=cands: c[j].source,
                                 key=f"gpus_choice_{i}")
                chosen[gpu] = cands[k]
    _plot(figures.gpu_fronts_figure(trials, data.chosen_points(trials, chosen)), "gpus_fronts")
    if not chosen:
        return

    side = data.policy_side_by_side(chosen, overview)
    st.subheader("Chosen policies side by side")
    st.dataframe(_shown(side), hide_index=True, key="gpus_side_by_side", height=_rows_height(len(side)))
    routes = data.route_counts(chosen)
    st.caption("Layers per stored weight format and per route (weight/activation) in each chosen policy.")
    st.dataframe(routes, hide_index=True, key="gpus_routes")
    layers = data.layer_decisions(chosen)

    st.subheader("What differs")
    if len(chosen) < 2:
        st.info(f"Only {next(iter(chosen))} has a chosen policy: nothing to compare with. {GPUS_HINT}")
    else:
        diff = data.differing_settings(side)
        if diff.empty:
            st.success("The chosen policies agree on every knob and measured figure.")
        else:
            st.dataframe(_shown(diff), hide_index=True, key="gpus_diff", height=_rows_height(len(diff)))
        changed = layers[layers["differs"]]
        st.caption(f"{len(changed)} of {len(layers)} in-block layers take different routes.")
        if not changed.empty:
            st.dataframe(changed.drop(columns=["differs"]), hide_index=True, key="gpus_layer_diff")
    menus = data.menu_comparison(chosen)
    st.markdown("**Menus: the routes each GPU runs and their measured speed**")
    if menus.empty:
        st.info("The chosen policies carry no menu (policies before schema 2 record no routes or route speeds); "
                "the measured figures above are the whole-model ones.")
    else:
        st.dataframe(data.menu_side_by_side(menus), hide_index=True, key="gpus_menus")
    with st.expander("Every in-block layer's route per GPU"):
        st.dataframe(layers, hide_index=True, key="gpus_layers")
    with st.expander("Per store"):
        comp = _gpu_comparison(items, data.fingerprint(list(cfg.stores.values())))
        _plot(figures.gpu_comparison_figure(comp), "gpus_figure")
        st.dataframe(comp, hide_index=True, key="gpus_table")


PAGES = (
    (runs_page, "Runs", "runs"),
    (sensitivity_page, "Sensitivity", "sensitivity"),
    (predictor_page, "Predictor", "predictor"),
    (temporal_page, "Temporal redundancy", "temporal"),
    (search_page, "Search", "search"),
    (policy_page, "Policy", "policy"),
    (gpus_page, "GPUs", "gpus"),
)
"""(page function, title, url path) of every page, in navigation order."""


def main() -> None:
    """The app: page config, navigation over :data:`PAGES`."""
    st.set_page_config(page_title="sixbit-tune", layout="wide")
    nav = st.navigation(
        [st.Page(fn, title=title, url_path=path, default=i == 0) for i, (fn, title, path) in enumerate(PAGES)]
    )
    with st.sidebar:
        cfg = settings()
        if len(cfg.stores) > 1:
            st.selectbox("store", list(cfg.stores), key="store_label",
                         help="the store the pages show; the GPUs page compares them all")
        st.caption("stores: " + ", ".join(f"{k} ({v})" for k, v in cfg.stores.items()))
        if st.button("Refresh", key="refresh"):
            st.cache_data.clear()
    nav.run()
