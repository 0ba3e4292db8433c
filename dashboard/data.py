"""The dashboard's data: plain functions from a :class:`~sixbit_tune.store.Store` to pandas DataFrames.

No Streamlit here (the pages cache and render what these return; tests call them directly). Every aggregation over
the fact tables (``block_steps``, ``layer_steps``) runs in DuckDB with ``GROUP BY``; Python only reshapes results
whose size is bounded by (layers or blocks) × steps, or by the number of trials. Every value a user selects reaches
DuckDB as a bound parameter, never inside the SQL text.

Names are the store's column names (``gamma``, ``delta_change``, ``delta_cos``, ``out_err``, ``act_err``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sixbit_tune.store import Store

#: Search objectives as the dashboard compares them: (column, direction). ``memory_bytes`` is the memory the search
#: optimised (``quality.memory_bytes``: the measured peak, ``max_memory_allocated`` on a GPU, torch's CPU allocator peak
#: plus the pipeline's parameters on the CPU; ``quality.memory_metric`` names which).
OBJECTIVES: tuple[tuple[str, str], ...] = (("latency_ms", "min"), ("memory_bytes", "min"), ("psnr_db", "max"))

#: Where a search may keep sample outputs of a trial (images or videos), relative to the store folder.
SAMPLES_DIR = "samples"
MEDIA_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".mp4", ".webm")


# ------------------------------------------------------------------------------------------------ stores


def store_labels(paths: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """Short unique labels for store folders: the folder name, prefixed by parents only where names collide.

    Raises:
        ValueError: no paths, or the same folder twice.
    """
    roots = [Path(p).expanduser().absolute() for p in paths]
    if not roots:
        raise ValueError("give at least one --store PATH")
    if len(set(roots)) != len(roots):
        raise ValueError(f"the same store was given twice: {[str(r) for r in roots]}")
    depth = 1
    while True:
        labels = ["/".join(r.parts[-depth:]) for r in roots]
        if len(set(labels)) == len(labels) or depth >= max(len(r.parts) for r in roots):
            return dict(zip(labels, roots))
        depth += 1


def open_stores(paths: Sequence[str | os.PathLike]) -> dict[str, Store]:
    """Each store opened read-only, by :func:`store_labels` label.

    The stores are kept apart rather than read as one union (``Store.open_many``): the union merges entity rows
    by key, so two GPUs' studies of the same (default) name would hide each other's trials.
    """
    return {label: Store.open(path, read_only=True) for label, path in store_labels(paths).items()}


def fingerprint(roots: Sequence[str | os.PathLike], tables: Sequence[str] | None = None) -> str:
    """A cheap token that changes whenever a part file appears, disappears or changes in the given tables.

    Built from the names, sizes and mtimes of the part files (one ``scandir`` per table folder, no file is read),
    so cached query results can be keyed on it and new data written by a running profile or search shows up.
    """
    from sixbit_tune.store import TABLES

    h = hashlib.sha256()
    for root in roots:
        root = Path(root)
        for table in tables or TABLES:
            h.update(f"\0{root}/{table}".encode())
            try:
                entries = sorted(
                    (e.name, e.stat().st_size, e.stat().st_mtime_ns)
                    for e in os.scandir(root / table)
                    if e.name.endswith(".parquet")
                )
            except FileNotFoundError:
                continue
            for name, size, mtime in entries:
                h.update(f"{name}:{size}:{mtime};".encode())
    return h.hexdigest()[:24]


def _json(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, str):
        return json.loads(v)
    return v


# ------------------------------------------------------------------------------------------------ runs


def runs_overview(store: Store) -> pd.DataFrame:
    """One row per run: what was profiled (model, settings), on which GPU, with which versions, and how much data.

    Columns: store, run_id, kind, status, model_spec, model_class, family, gpu, compute_capability, driver, steps,
    prompts, height, width, frames, guidance, dtype, seed, torch, diffusers, sixbit_tune, host, block_rows,
    layer_rows, created, updated, error.
    """
    return store.query(
        """
        WITH b AS (SELECT store, run_id, count(*) AS n FROM block_steps GROUP BY ALL),
             l AS (SELECT store, run_id, count(*) AS n FROM layer_steps GROUP BY ALL)
        SELECT r.store, r.run_id, r.kind, r.status, r.model_spec, r.model_class, r.family,
               coalesce(r.gpu_name, 'CPU (no GPU)') AS gpu, r.gpu_compute_capability AS compute_capability,
               r.gpu_driver AS driver,
               TRY_CAST(r.settings->>'steps' AS INTEGER) AS steps,
               json_array_length(r.settings->'prompts') AS prompts,
               TRY_CAST(r.settings->>'height' AS INTEGER) AS height,
               TRY_CAST(r.settings->>'width' AS INTEGER) AS width,
               TRY_CAST(r.settings->>'frames' AS INTEGER) AS frames,
               TRY_CAST(r.settings->>'guidance' AS DOUBLE) AS guidance,
               r.settings->>'dtype' AS dtype, r.seed,
               r.versions->>'torch' AS torch, r.versions->>'diffusers' AS diffusers,
               r.versions->>'sixbit_tune' AS sixbit_tune, r.host,
               coalesce(b.n, 0) AS block_rows, coalesce(l.n, 0) AS layer_rows,
               r.created, r.updated, r.error
        FROM runs AS r
        LEFT JOIN b ON b.store = r.store AND b.run_id = r.run_id
        LEFT JOIN l ON l.store = r.store AND l.run_id = r.run_id
        ORDER BY r.created, r.run_id
        """
    )


def run_settings(store: Store, run_id: str) -> dict:
    """The full ``settings`` JSON of one run ({} when unknown)."""
    df = store.query("SELECT settings FROM runs WHERE run_id = ?", [run_id])
    return (_json(df["settings"].iloc[0]) or {}) if len(df) else {}


def profile_runs(store: Store) -> pd.DataFrame:
    """Runs with profile data (block statistics), newest first: store, run_id, model_spec, status, steps, blocks."""
    return store.query(
        """
        SELECT r.store, r.run_id, r.model_spec, r.model_class, r.config_hash, r.status, r.created,
               s.steps, s.blocks, s.prompts
        FROM runs AS r
        JOIN (SELECT run_id, max(step) + 1 AS steps, count(DISTINCT block_index) AS blocks,
                     count(DISTINCT prompt_index) AS prompts
              FROM block_steps GROUP BY run_id) AS s ON s.run_id = r.run_id
        ORDER BY r.created DESC, r.run_id
        """
    )


# ------------------------------------------------------------------------------------------------ sensitivity


def layer_error_grid(store: Store, run_id: str, fmt: str, branch: str | None = None) -> pd.DataFrame:
    """Mean ``out_err``/``act_err`` per (layer, step) of one run and format, over prompts (and branches unless
    ``branch`` picks one). Columns: layer, block_index, step, out_err, act_err, n; ordered by block, layer, step.

    Only prompts whose rows are complete count: the profiler writes a prompt's layer rows before its block rows,
    so layer rows of a prompt without block rows belong to a prompt still in flight (or one whose profile failed).
    """
    return store.query(
        """
        SELECT layer, min(block_index) AS block_index, step, avg(out_err) AS out_err, avg(act_err) AS act_err,
               count(*) AS n
        FROM layer_steps
        WHERE run_id = $run AND format = $fmt AND ($branch IS NULL OR branch = $branch)
          AND prompt_index IN (SELECT DISTINCT prompt_index FROM block_steps WHERE run_id = $run)
        GROUP BY layer, step
        ORDER BY block_index, layer, step
        """,
        {"run": run_id, "fmt": fmt, "branch": branch},
    )


def run_branches(store: Store, run_id: str) -> list[str]:
    """Guidance branches recorded for a run."""
    df = store.query("SELECT DISTINCT branch FROM block_steps WHERE run_id = ? ORDER BY branch", [run_id])
    return [str(b) for b in df["branch"]]


def format_summary(store: Store, run_id: str) -> pd.DataFrame:
    """Per format: median, mean and max ``out_err`` over every recorded (layer, step, prompt, branch) of the
    prompts whose rows are complete (see :func:`layer_error_grid`)."""
    return store.query(
        """
        SELECT format, median(out_err) AS median_out_err, avg(out_err) AS mean_out_err, max(out_err) AS max_out_err,
               count(*) AS n
        FROM layer_steps
        WHERE run_id = $run AND prompt_index IN (SELECT DISTINCT prompt_index FROM block_steps WHERE run_id = $run)
        GROUP BY format ORDER BY format
        """,
        {"run": run_id},
    )


# ------------------------------------------------------------------------------------------------ predictor


def fits(store: Store) -> pd.DataFrame:
    """One row per fit, newest first: store, fit_id, layers, trusted, median_r2, run_ids, created."""
    return store.query(
        """
        SELECT store, fit_id, count(*) AS layers, count(*) FILTER (WHERE trusted) AS trusted,
               median(r2) AS median_r2, any_value(run_ids) AS run_ids, min(created) AS created
        FROM predictors WHERE format = 'nvfp4'
        GROUP BY store, fit_id
        ORDER BY created DESC, fit_id
        """
    )


def fit_layers(store: Store, fit_id: str) -> pd.DataFrame:
    """The NVFP4 predictors of one fit: layer, alpha, beta, r2, n, trusted, run_ids (ordered by layer)."""
    return store.query(
        "SELECT layer, alpha, beta, r2, n, trusted, run_ids FROM predictors "
        "WHERE fit_id = ? AND format = 'nvfp4' ORDER BY layer",
        [fit_id],
    )


def predictor_pairs(store: Store, run_ids: Sequence[str], layer: str) -> pd.DataFrame:
    """The (Γ_{t−1}, NVFP4 out_err_t) pairs of one layer over the fit's profile runs, exactly as the fit used them
    (the query is :data:`sixbit_tune.predictor.PAIRS_SQL`, filtered to ``layer``)."""
    from sixbit_tune.predictor import PAIRS_SQL

    return store.query(f"SELECT * FROM ({PAIRS_SQL}) WHERE layer = ?", ["nvfp4", list(run_ids), layer])


# ------------------------------------------------------------------------------------------------ temporal


def block_delta_grid(store: Store, run_id: str, branch: str | None = None) -> pd.DataFrame:
    """Mean ``gamma``, ``delta_cos``, ``delta_change`` per (block, step) of one run over prompts (and branches
    unless ``branch`` picks one). Columns: block_index, block, step, gamma, delta_cos, delta_change, n."""
    return store.query(
        """
        SELECT block_index, any_value(block) AS block, step, avg(gamma) AS gamma, avg(delta_cos) AS delta_cos,
               avg(delta_change) AS delta_change, count(*) AS n
        FROM block_steps
        WHERE run_id = $run AND ($branch IS NULL OR branch = $branch)
        GROUP BY block_index, step
        ORDER BY block_index, step
        """,
        {"run": run_id, "branch": branch},
    )


# ------------------------------------------------------------------------------------------------ search


def studies(store: Store) -> pd.DataFrame:
    """One row per (store, study): trials by state, first and last write."""
    return store.query(
        """
        SELECT store, study, count(*) AS trials, count(*) FILTER (WHERE state = 'COMPLETE') AS complete,
               count(*) FILTER (WHERE state = 'FAIL') AS failed, count(*) FILTER (WHERE state = 'RUNNING') AS running,
               any_value(gpu) AS gpu, min(created) AS created, max(updated) AS updated
        FROM trials GROUP BY store, study ORDER BY updated DESC, study
        """
    )


def study_trials(store: Store, study: str) -> pd.DataFrame:
    """Trials of one study with the objectives as columns, parameters expanded (``param_<name>``), the feasibility
    flag the search recorded, and ``pareto`` (non-dominated among feasible COMPLETE trials, :data:`OBJECTIVES`).

    Columns: store, study, number, state, latency_ms, memory_bytes, psnr_db, ssim, speedup, peak_memory_bytes,
    weight_bytes, cache_bytes, nvfp4_share, skip_share, feasible, reference, fail_reason, gpu, nvfp4_path,
    created, updated, param_*, pareto.
    """
    df = store.query(
        """
        SELECT store, study, number, state, latency_ms,
               coalesce(TRY_CAST(quality->>'memory_bytes' AS BIGINT), peak_memory_bytes) AS memory_bytes,
               psnr_db, ssim, speedup, peak_memory_bytes, weight_bytes, cache_bytes, nvfp4_share, skip_share,
               TRY_CAST(quality->>'feasible' AS BOOLEAN) AS feasible, quality->>'reference' AS reference,
               quality->>'memory_metric' AS memory_metric, fail_reason, gpu, nvfp4_path, kernel_path,
               CAST(params AS VARCHAR) AS params, created, updated
        FROM trials
        WHERE study = $study
        ORDER BY number
        """,
        {"study": study},
    )
    params = pd.DataFrame([_json(p) or {} for p in df["params"]], index=df.index)
    df = pd.concat([df.drop(columns=["params"]), params.add_prefix("param_")], axis=1)
    done = (df["state"] == "COMPLETE") & (df["feasible"].fillna(True).astype(bool))
    df["pareto"] = False
    if done.any():
        df.loc[done, "pareto"] = pareto_mask(df.loc[done])
    return df


def pareto_mask(df: pd.DataFrame, objectives: Sequence[tuple[str, str]] = OBJECTIVES) -> np.ndarray:
    """Non-dominated rows of ``df`` under ``objectives`` ((column, "min"|"max")); rows with a missing objective are
    never on the front. A row is dominated when another is no worse in every objective and better in one."""
    x = _loss_matrix(df, objectives)
    ok = np.isfinite(x).all(axis=1)
    mask = np.zeros(len(df), dtype=bool)
    for i in np.flatnonzero(ok):
        others = x[ok]
        dominated = np.any(np.all(others <= x[i], axis=1) & np.any(others < x[i], axis=1))
        mask[i] = not dominated
    return mask


def _loss_matrix(df: pd.DataFrame, objectives: Sequence[tuple[str, str]]) -> np.ndarray:
    cols = []
    for col, direction in objectives:
        v = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)
        cols.append(v if direction == "min" else -v)
    return np.stack(cols, axis=1) if cols else np.zeros((len(df), 0))


def hypervolume_history(trials: pd.DataFrame, objectives: Sequence[tuple[str, str]] = OBJECTIVES) -> pd.DataFrame:
    """Hypervolume of the feasible COMPLETE trials after each trial (by number), objectives normalised to [0, 1]
    by their min and max over those trials, reference point 1.1 in every (minimised) objective.

    Columns: number, hypervolume (0 until the first feasible trial). Empty when no trial completed.
    """
    from optuna._hypervolume import compute_hypervolume  # Optuna's WFG implementation

    t = trials.sort_values("number")
    done = (t["state"] == "COMPLETE").to_numpy() & t["feasible"].fillna(True).astype(bool).to_numpy()
    loss = _loss_matrix(t, objectives)
    done &= np.isfinite(loss).all(axis=1)
    if not done.any():
        return pd.DataFrame({"number": pd.Series(dtype="int64"), "hypervolume": pd.Series(dtype=float)})
    lo, hi = loss[done].min(axis=0), loss[done].max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    norm = (loss - lo) / span
    ref = np.full(loss.shape[1], 1.1)
    hv, seen = [], []
    for i in range(len(t)):
        if done[i]:
            seen.append(norm[i])
        hv.append(float(compute_hypervolume(np.array(seen), ref)) if seen else 0.0)
    return pd.DataFrame({"number": t["number"].to_numpy(), "hypervolume": hv})


@dataclass(frozen=True)
class Importance:
    """Parameter importances per objective, and where they came from (``source`` is shown on the page)."""

    table: pd.DataFrame  # columns: objective, param, importance
    source: str


def optuna_storage_url(store_root: str | os.PathLike, storage: str | None = None) -> str | None:
    """The Optuna storage of a store's searches: ``storage`` when given, else ``<store>/optuna.journal`` when that
    file exists, else None (not reachable)."""
    if storage:
        return storage
    journal = Path(store_root) / "optuna.journal"
    return str(journal) if journal.is_file() else None


def param_importance(
    trials: pd.DataFrame, study: str, store_root: str | os.PathLike | None, storage: str | None = None
) -> Importance:
    """``optuna.importance.get_param_importances`` per objective on the study in its Optuna storage when it is
    reachable; otherwise on an in-memory study rebuilt from the store's mirrored COMPLETE trials, whose parameter
    distributions are inferred from the observed ranges (the ``source`` says which)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = [c for c, _ in OBJECTIVES]
    url = optuna_storage_url(store_root, storage) if store_root is not None else storage
    loaded = None
    why = "no Optuna storage given and no optuna.journal in the store"
    if url is not None:
        try:
            from sixbit_tune.search.export import load_study

            loaded = load_study(store_root, study, url)
            source = f"optuna.importance on study {study!r} in its Optuna storage ({url})"
        except Exception as e:  # an unreachable or foreign storage falls back to the store's trials
            why = f"Optuna storage {url} not usable ({type(e).__name__}: {e})"
    if loaded is None:
        loaded = _study_from_trials(trials, names)
        source = f"computed from the store's mirrored trials with optuna.importance ({why}; distributions inferred " \
                 "from the observed parameter ranges)"
    complete = [t for t in loaded.get_trials(deepcopy=False) if t.state.name == "COMPLETE" and t.values]
    rows = []
    if len(complete) >= 2:
        for i, (name, direction) in enumerate(OBJECTIVES):
            sign = 1.0 if direction == "min" else -1.0  # the evaluators rank parameters for LOW target values
            try:
                imp = optuna.importance.get_param_importances(
                    loaded, target=lambda t, i=i, sign=sign: sign * t.values[i]
                )
            except (ValueError, RuntimeError, ZeroDivisionError) as e:
                source += f"; {name}: not computable ({e})"
                continue
            rows += [{"objective": name, "param": p, "importance": float(v)} for p, v in imp.items()]
    table = pd.DataFrame(rows, columns=["objective", "param", "importance"])
    return Importance(table, source)


def _study_from_trials(trials: pd.DataFrame, names: Sequence[str]):
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    study = optuna.create_study(directions=["minimize" if d == "min" else "maximize" for _, d in OBJECTIVES])
    done = trials[(trials["state"] == "COMPLETE")].dropna(subset=list(names))
    pcols = [c for c in trials.columns if c.startswith("param_")]
    dists = {}
    for c in pcols:
        raw = done[c].dropna()
        if raw.empty:
            continue
        if any(isinstance(x, str) for x in raw):  # a categorical knob (e.g. tdc cache_dtype)
            dists[c[6:]] = CategoricalDistribution(sorted({str(x) for x in raw}))
            continue
        v = pd.to_numeric(raw, errors="coerce").dropna()
        if v.empty:
            continue
        if (v == v.round()).all() and not any(isinstance(x, float) for x in raw):
            dists[c[6:]] = IntDistribution(int(v.min()), int(v.max()))
        else:
            dists[c[6:]] = FloatDistribution(float(v.min()), float(v.max()))

    def value(d, x):
        if isinstance(d, CategoricalDistribution):
            return str(x)
        return int(x) if isinstance(d, IntDistribution) else float(x)

    for _, r in done.iterrows():
        params = {p: value(d, r[f"param_{p}"]) for p, d in dists.items() if pd.notna(r[f"param_{p}"])}
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={p: dists[p] for p in params}, values=[float(r[n]) for n in names]
        ))
    return study


# ------------------------------------------------------------------------------------------------ policy


def trial_policy(store: Store, study: str, number: int) -> dict | None:
    """The policy JSON (dict) a trial measured, or None when the trial stored none."""
    df = store.query(
        "SELECT CAST(policy AS VARCHAR) AS policy FROM trials WHERE study = $study AND number = $number",
        {"study": study, "number": int(number)},
    )
    return _json(df["policy"].iloc[0]) if len(df) else None


def matching_profile_runs(store: Store, config_hash: str | None) -> pd.DataFrame:
    """Profile runs with block statistics of the model ``config_hash`` (all profile runs when None), newest first."""
    runs = profile_runs(store)
    if config_hash is not None:
        runs = runs[runs["config_hash"] == config_hash]
    return runs.reset_index(drop=True)


def policy_maps(store: Store, policy: Mapping[str, Any], run_id: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Replay a policy's DMPQ and TDC rules on one profile run's block statistics.

    The decisions are made by the runtime's own rule functions (:mod:`sixbit_tune.rules`), once per transformer call
    as the runtime would make them: for a batched-CFG model (the run's ``cfg_mode``) one call holds a prompt's
    guidance branches together and decides for all of them jointly (a layer runs NVFP4 only if every branch's
    prediction allows it, a block is skipped only if every branch's accumulated change allows it); otherwise each
    (prompt, branch) is a call of its own. Each call runs through the run's steps with its own TDC state: a skip
    adds the block's last per-step change rate to its accumulated change, and a full computation resets it. The
    profile computed every block at every step, so the change rate after a full computation at step t is the sum
    of the profiled per-step changes since the last full computation spread over the gap
    (:func:`sixbit_tune.rules.tdc_rate`); at inference, skipped blocks also change later inputs. The maps are
    therefore the policy's decisions on the profiled trajectories, not a recording.

    Layers are placed on blocks by the block index the profiler recorded for them (``layer_steps``), else by the
    block names recorded in ``block_steps`` (a layer belongs to the block whose name prefixes it); the indices
    are the model adapter's (HunyuanVideo's single-stream blocks follow the dual-stream ones). Layers of blocks
    the run did not record are left out.

    Returns:
        ``(precision, skips)``: precision has columns layer, block_index, block, step, mode, nvfp4_share (share of
        the (prompt, branch) rows that ran the layer in NVFP4 among those that computed the block; NaN where every
        row skipped it or the layer stays in the model dtype), computed_share; skips has block_index, block, step,
        skip_share.

    Raises:
        ValueError: the run has no block statistics.
    """
    from sixbit_tune import policy as P
    from sixbit_tune import rules

    pol = P.Policy.from_dict(dict(policy))
    series = store.query(
        "SELECT prompt_index, branch, block_index, block, step, gamma, delta_change FROM block_steps "
        "WHERE run_id = ? ORDER BY prompt_index, branch, block_index, step",
        [run_id],
    )
    if series.empty:
        raise ValueError(f"run {run_id!r} has no block statistics")
    rows = series[["prompt_index", "branch"]].drop_duplicates().reset_index(drop=True)
    blocks = [int(b) for b in np.sort(series["block_index"].unique())]
    names = series.dropna(subset=["block"]).drop_duplicates("block_index").set_index("block_index")["block"]
    block_name = {b: (str(names[b]) if b in names.index else None) for b in blocks}
    steps = int(series["step"].max()) + 1
    shape = (len(rows), len(blocks), steps)
    gamma = np.full(shape, np.nan)
    change = np.full(shape, np.nan)
    ri = pd.MultiIndex.from_frame(rows).get_indexer(pd.MultiIndex.from_frame(series[["prompt_index", "branch"]]))
    bi = np.searchsorted(blocks, series["block_index"].to_numpy())
    si = series["step"].to_numpy()
    gamma[ri, bi, si] = series["gamma"].to_numpy(dtype=float)
    change[ri, bi, si] = pd.to_numeric(series["delta_change"], errors="coerce").to_numpy(dtype=float)

    # One call = the rows decided together.
    if run_settings(store, run_id).get("cfg_mode") == "batched":
        calls = [list(g.index) for _, g in rows.groupby("prompt_index", sort=True)]
    else:
        calls = [[i] for i in range(len(rows))]

    tdc = pol.tdc
    allowed = None if tdc.blocks is None else set(tdc.blocks)
    window = [rules.tdc_in_window(t, tdc.warmup, tdc.cooldown, steps) for t in range(steps)]
    skip = np.zeros(shape, dtype=bool)
    # gamma_prev[c][j][t]: per row of call c, Γ of block j at its last full computation before step t (None: none)
    gamma_prev: list[list[list[list[float] | None]]] = []
    for call in calls:
        per_block = []
        for j, b in enumerate(blocks):
            acc: list[float] | None = None
            consec, rate, last = 0, None, None
            g_last: list[float] | None = None
            seen: list[list[float] | None] = []
            for t in range(steps):
                seen.append(g_last)
                new = rules.tdc_skip(acc, rate, consec, tolerance=tdc.tolerance, max_skips=tdc.max_skips,
                                     in_window=window[t], has_cache=last is not None,
                                     cacheable=allowed is None or b in allowed, rows=len(call))
                if new is not None:
                    skip[call, j, t] = True
                    acc, consec = new, consec + 1
                    continue
                acc, consec = None, 0
                if last is not None:
                    total = change[call, j, last + 1 : t + 1].sum(axis=1)
                    if np.isfinite(total).all():
                        rate = rules.tdc_rate(total.tolist(), t - last)
                last, g_last = t, gamma[call, j, t].tolist()
            per_block.append(seen)
        gamma_prev.append(per_block)

    computed = ~skip
    skips = pd.DataFrame(
        [
            {"block_index": b, "block": block_name[b], "step": t, "skip_share": float(skip[:, j, t].mean())}
            for j, b in enumerate(blocks)
            for t in range(steps)
        ],
        columns=["block_index", "block", "step", "skip_share"],
    )
    layer_blocks = _layer_blocks(store, run_id, pol.dmpq.layers, block_name)
    block_pos = {b: j for j, b in enumerate(blocks)}
    tau = pol.dmpq.threshold
    first = _first_step_role(pol.dmpq)
    n_rows = len(rows)
    branches = rows["branch"].tolist()
    prec = []
    for name, lp in pol.dmpq.layers.items():
        b = layer_blocks.get(name)
        if b not in block_pos:
            continue
        j = block_pos[b]
        dynamic, nvfp4, quantized = _nvfp4_roles(lp)
        for t in range(steps):
            n_comp = int(computed[:, j, t].sum())
            n_fast = 0
            for c, call in enumerate(calls):
                if not computed[call[0], j, t]:
                    continue
                role = "fast"
                if dynamic:
                    g = gamma_prev[c][j][t]
                    alpha, beta = _decision_line(lp, branches[call[0]] if len(call) == 1 else None)
                    role = first if not g else ("fast" if rules.dmpq_fast(alpha, beta, g, tau) else "robust")
                n_fast += len(call) if nvfp4[role] else 0
            share = n_fast / n_comp if n_comp and quantized else math.nan
            prec.append({"layer": name, "block_index": b, "block": block_name[b], "step": t, "mode": lp.mode,
                         "nvfp4_share": share, "computed_share": n_comp / n_rows})
    precision = pd.DataFrame(
        prec, columns=["layer", "block_index", "block", "step", "mode", "nvfp4_share", "computed_share"]
    )
    return precision, skips


def _first_step_role(dmpq: Any) -> str:
    """The route role ("fast" | "robust") of dynamic layers at the first step: ``dmpq.first_step`` (schema 2), else
    the role of schema 1's ``first_step_format`` (NVFP4 is the fast route)."""
    role = getattr(dmpq, "first_step", None)
    if role in ("fast", "robust"):
        return role
    return "fast" if getattr(dmpq, "first_step_format", None) == "nvfp4" else "robust"


def _nvfp4_roles(lp: Any) -> tuple[bool, dict[str, bool], bool]:
    """(dynamic, {role: the route of that role runs NVFP4 activations}, quantized) of one layer policy: schema 2
    layers by their ``fast`` and ``robust`` activation formats and their ``mode``, schema 1 layers by ``mode``
    (a dynamic layer's fast route is NVFP4)."""
    mode = getattr(lp, "mode", None)
    if getattr(lp, "weight", None) is None:  # schema 1
        if mode == "dynamic":
            return True, {"fast": True, "robust": False}, True
        return False, {"fast": mode == "nvfp4", "robust": mode == "nvfp4"}, mode != "none"
    if lp.weight == "none":
        return False, {"fast": False, "robust": False}, False
    acts = {"fast": lp.fast == "nvfp4", "robust": lp.robust == "nvfp4"}
    if mode == "dynamic":
        return True, acts, True
    return False, {"fast": acts[mode], "robust": acts[mode]}, True


def _decision_line(lp: Any, branch: str | None) -> tuple[float, float]:
    """(alpha, beta) a dynamic layer decides with: its line for ``branch`` where the policy keeps lines per guidance
    branch and the call holds that branch alone, else its one decision line."""
    line_of = getattr(lp, "line", None)
    if branch is not None and callable(line_of):
        line = line_of(branch)
        if line is not None:
            return line.alpha, line.beta
    return lp.alpha, lp.beta


def _layer_blocks(store: Store, run_id: str, layers: Sequence[str], block_name: Mapping[int, str | None]) -> dict:
    """Block index of each policy layer: the one the profiler recorded for it in the run's ``layer_steps`` (the
    model adapter's), else that of the recorded block whose name prefixes the layer name (``block + "."``)."""
    recorded = store.query("SELECT DISTINCT layer, block_index FROM layer_steps WHERE run_id = ?", [run_id])
    out = {str(n): int(b) for n, b in zip(recorded["layer"], recorded["block_index"])}
    by_name = {name: b for b, name in block_name.items() if name}
    for layer in layers:
        if layer in out:
            continue
        for name, b in by_name.items():
            if layer.startswith(name + "."):
                out[layer] = b
                break
    return out


def policy_summary(policy: Mapping[str, Any]) -> pd.DataFrame:
    """Per route (:func:`layer_route`, e.g. ``"int8/int8"`` or ``"nvfp4/nvfp4 | nvfp4/int8 (dynamic)"``) and stored
    weight format, how many in-block layers a policy gives it. Columns: route, weight, mode, layers."""
    from sixbit_tune import policy as P

    pol = P.load(dict(policy))
    rows = [(*reversed(layer_route(lp)), lp.mode) for lp in pol.dmpq.layers.values()]
    df = pd.DataFrame(rows, columns=["route", "weight", "mode"])
    return df.value_counts().rename("layers").reset_index().sort_values(["layers", "route"], ascending=[False, True],
                                                                        ignore_index=True)


def measured_vs_baseline(trial: Mapping[str, Any]) -> pd.DataFrame:
    """A trial's measured figures beside the unquantized (bf16/model-dtype) baseline.

    The baseline latency is ``speedup × latency_ms`` (the search stores the speedup against its measured baseline);
    PSNR and SSIM of the baseline are against itself (identical output: PSNR capped at 100 dB, SSIM 1).
    Columns: figure, baseline, policy, ratio (policy / baseline, for latency and memory only).
    """

    def num(k):
        v = trial.get(k)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    lat, sp = num("latency_ms"), num("speedup")
    base_lat = lat * sp if lat is not None and sp is not None else None
    rows = [
        ("latency (ms)", base_lat, lat),
        (f"memory ({trial.get('memory_metric') or 'bytes'})", None, num("memory_bytes")),
        ("PSNR vs baseline (dB)", 100.0, num("psnr_db")),
        ("SSIM vs baseline", 1.0, num("ssim")),
        ("NVFP4 share of layer calls", 0.0, num("nvfp4_share")),
        ("skipped share of block calls", 0.0, num("skip_share")),
    ]
    df = pd.DataFrame(rows, columns=["figure", "baseline", "policy"])
    df["ratio"] = [p / b if (b and p is not None and i < 2) else None for i, (_, b, p) in enumerate(rows)]
    return df


def speed_delta(speedup: float | None) -> dict[str, Any]:
    """How a policy's speed-up against its baseline reads as the ``delta`` of a latency metric: keyword arguments
    for ``st.metric`` (``delta``, ``delta_color``).

    A speed-up above 1 reads as a gain (``"+80% speed (1.80× faster than baseline)"``: green, arrow up), one below 1
    as a loss (``"-55% speed (2.22× slower than baseline)"``: the leading minus makes it red with the arrow down),
    one that rounds to 1.00× as no change (grey). None or NaN gives no delta.
    """
    if speedup is None or (isinstance(speedup, float) and math.isnan(speedup)):
        return {"delta": None, "delta_color": "off"}
    sp = float(speedup)
    if sp <= 0 or not math.isfinite(sp):
        raise ValueError(f"a speed-up must be a positive finite number, got {speedup!r}")
    if round(sp, 2) == 1.0:
        return {"delta": "same speed as baseline (1.00×)", "delta_color": "off"}
    pct = (sp - 1.0) * 100.0
    if sp > 1.0:
        return {"delta": f"+{pct:.0f}% speed ({sp:.2f}× faster than baseline)", "delta_color": "normal"}
    return {"delta": f"-{-pct:.0f}% speed ({1.0 / sp:.2f}× slower than baseline)", "delta_color": "normal"}


def sample_media(store_root: str | os.PathLike, study: str, number: int) -> list[Path]:
    """Sample outputs a search kept for one trial: image/video files under ``<store>/samples/<study>/<number>/``
    (names starting with ``reference`` or ``bf16`` are the unquantized output). Empty when none were stored."""
    folder = Path(store_root) / SAMPLES_DIR / study / str(int(number))
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in MEDIA_SUFFIXES and p.is_file())


# ------------------------------------------------------------------------------------------------ GPUs


def gpu_comparison(stores: Mapping[str, Store]) -> pd.DataFrame:
    """Per store (one per GPU or machine, by label): the GPU(s) it ran on and its chosen policy's figures.

    The chosen policy is the latest exported one (``policies`` table) when the store has one, else the fastest
    feasible COMPLETE trial. Columns: store, gpu, runs, trials, choice ("exported <name>" or "fastest feasible
    trial"), study, number, latency_ms, speedup, memory_bytes, psnr_db, nvfp4_share, skip_share, tau, delta.
    """
    cols = ["store", "gpu", "runs", "trials", "choice", "study", "number", "latency_ms", "speedup", "memory_bytes",
            "psnr_db", "nvfp4_share", "skip_share", "tau", "delta"]
    out = []
    for label, store in stores.items():
        g = store.query(
            "SELECT string_agg(DISTINCT coalesce(gpu_name, 'CPU (no GPU)'), ', ') AS gpu, count(*) AS runs FROM runs"
        ).iloc[0]
        t = store.query(
            """
            SELECT study, number, latency_ms, speedup,
                   coalesce(TRY_CAST(quality->>'memory_bytes' AS BIGINT), peak_memory_bytes) AS memory_bytes,
                   psnr_db, nvfp4_share, skip_share, TRY_CAST(params->>'tau' AS DOUBLE) AS tau,
                   TRY_CAST(params->>'delta' AS DOUBLE) AS delta, gpu,
                   coalesce(TRY_CAST(quality->>'feasible' AS BOOLEAN), true) AS feasible, state
            FROM trials
            """
        )
        exported = store.query("SELECT name, study, trial FROM policies ORDER BY updated")
        row: dict[str, Any] = {"store": label, "gpu": g["gpu"], "runs": int(g["runs"]), "trials": len(t),
                               "choice": None}
        pick = None
        if len(exported):
            last = exported.iloc[-1]
            m = t[(t["study"] == last["study"]) & (t["number"] == last["trial"])]
            if len(m):
                pick, row["choice"] = m.iloc[0], f"exported {last['name']}"
        if pick is None:
            ok = t[(t["state"] == "COMPLETE") & t["feasible"].astype(bool)].sort_values("latency_ms")
            if len(ok):
                pick, row["choice"] = ok.iloc[0], "fastest feasible trial"
        if pick is not None:
            for k in cols[5:]:
                row[k] = pick[k]
            if isinstance(pick["gpu"], str):
                row["gpu"] = pick["gpu"]
        out.append(row)
    return pd.DataFrame(out).reindex(columns=cols)


# ------------------------------------------------------------------------------------------------ per GPU

#: The GPU label of rows measured without a GPU (``trials.gpu`` / ``runs.gpu_name`` NULL).
NO_GPU = "CPU (no GPU)"

#: Names of the store's per-block attention error table (``attn_err`` per run, prompt, branch, step, block and
#: attention format), newest schema first; the first one present is read.
ATTENTION_TABLES = ("attn_steps", "attention")

#: How a schema-1 layer mode stores its weight and which routes ("<weight>/<activation>") it runs.
_V1_WEIGHT = {"dynamic": "nvfp4+int8", "nvfp4": "nvfp4", "int8": "int8", "none": "none"}
_V1_ROUTES = {"dynamic": ("nvfp4/nvfp4", "int8/int8"), "nvfp4": ("nvfp4/nvfp4",), "int8": ("int8/int8",),
              "none": ()}


def gpu_trials(stores: Mapping[str, Store]) -> pd.DataFrame:
    """Every trial of every store, with the GPU it was measured on and its place on its search's Pareto front.

    The front is taken per search (store, study, GPU): trials of different searches were measured against different
    baselines and settings. ``series`` names the search as the GPU comparison shows it: the GPU name, followed by
    ``· <store>/<study>`` where one GPU has several searches.

    Columns: store, study, number, state, gpu, series, latency_ms, memory_bytes, memory_metric, psnr_db, speedup,
    peak_memory_bytes, weight_bytes, nvfp4_share, skip_share, feasible, pareto.
    """
    cols = ["store", "study", "number", "state", "gpu", "series", "latency_ms", "memory_bytes", "memory_metric",
            "psnr_db", "speedup", "peak_memory_bytes", "weight_bytes", "nvfp4_share", "skip_share", "feasible",
            "pareto"]
    frames = []
    for label, store in stores.items():
        t = store.query(
            """
            SELECT study, number, state, coalesce(gpu, $cpu) AS gpu, latency_ms,
                   coalesce(TRY_CAST(quality->>'memory_bytes' AS BIGINT), peak_memory_bytes) AS memory_bytes,
                   quality->>'memory_metric' AS memory_metric, psnr_db, speedup, peak_memory_bytes, weight_bytes,
                   nvfp4_share, skip_share, TRY_CAST(quality->>'feasible' AS BOOLEAN) AS feasible
            FROM trials ORDER BY study, number
            """,
            {"cpu": NO_GPU},
        )
        if t.empty:
            continue
        t.insert(0, "store", label)
        t["pareto"] = False
        for _, g in t.groupby(["study", "gpu"], sort=False):
            done = (g["state"] == "COMPLETE") & g["feasible"].fillna(True).astype(bool)
            if done.any():
                t.loc[g.index[done.to_numpy()], "pareto"] = pareto_mask(g[done])
        frames.append(t)
    if not frames:
        return pd.DataFrame(columns=cols)
    df = pd.concat(frames, ignore_index=True)
    searches = df.groupby("gpu")[["store", "study"]].apply(lambda g: len(g.drop_duplicates()))
    df["series"] = [g if searches[g] == 1 else f"{g} · {s}/{st}" for g, s, st in
                    zip(df["gpu"], df["store"], df["study"])]
    return df.reindex(columns=cols)


def gpu_overview(stores: Mapping[str, Store], trials: pd.DataFrame) -> pd.DataFrame:
    """One row per GPU found in the stores' trials (or, for stores without trials, in their runs): where its
    results are, how many trials and how large its front, its best figures, and the device facts the runs
    recorded (memory, compute capability, driver).

    Columns: gpu, stores, studies, trials, complete, feasible, front, fastest_feasible_ms, best_speedup,
    best_psnr_db, gpu_memory_bytes, compute_capability, driver.
    """
    cols = ["gpu", "stores", "studies", "trials", "complete", "feasible", "front", "fastest_feasible_ms",
            "best_speedup", "best_psnr_db", "gpu_memory_bytes", "compute_capability", "driver"]
    runs = []
    for label, store in stores.items():
        r = store.query(
            """
            SELECT coalesce(gpu_name, $cpu) AS gpu, max(gpu_memory_bytes) AS gpu_memory_bytes,
                   string_agg(DISTINCT gpu_compute_capability, ', ') AS compute_capability,
                   string_agg(DISTINCT gpu_driver, ', ') AS driver
            FROM runs GROUP BY ALL
            """,
            {"cpu": NO_GPU},
        )
        r.insert(0, "store", label)
        runs.append(r)
    runs_df = pd.concat(runs, ignore_index=True) if runs else pd.DataFrame(columns=["store", "gpu"])
    with_trials = set(trials["store"]) if len(trials) else set()
    gpus = list(dict.fromkeys(trials["gpu"])) if len(trials) else []
    gpus += [g for g in dict.fromkeys(runs_df.loc[~runs_df["store"].isin(with_trials), "gpu"]) if g not in gpus]
    out = []
    for gpu in gpus:
        t = trials[trials["gpu"] == gpu] if len(trials) else trials
        r = runs_df[runs_df["gpu"] == gpu]
        done = t[t["state"] == "COMPLETE"] if len(t) else t
        ok = done[done["feasible"].fillna(True).astype(bool)] if len(done) else done
        mem = pd.to_numeric(r.get("gpu_memory_bytes"), errors="coerce") if len(r) else pd.Series(dtype=float)

        out.append({
            "gpu": gpu,
            "stores": ", ".join(dict.fromkeys(list(t["store"]) + list(r["store"]))),
            "studies": int(t[["store", "study"]].drop_duplicates().shape[0]) if len(t) else 0,
            "trials": len(t), "complete": len(done), "feasible": len(ok), "front": int(t["pareto"].sum()) if len(t) else 0,
            "fastest_feasible_ms": _extreme(ok, "latency_ms", "min"), "best_speedup": _extreme(ok, "speedup", "max"),
            "best_psnr_db": _extreme(done, "psnr_db", "max"),
            "gpu_memory_bytes": None if mem.dropna().empty else int(mem.max()),
            "compute_capability": _joined(r, "compute_capability"), "driver": _joined(r, "driver"),
        })
    return pd.DataFrame(out, columns=cols)


def _extreme(frame: pd.DataFrame, col: str, how: str) -> float | None:
    v = pd.to_numeric(frame[col], errors="coerce").dropna() if len(frame) else pd.Series(dtype=float)
    return None if v.empty else float(getattr(v, how)())


def _joined(frame: pd.DataFrame, col: str) -> str | None:
    vals = [str(v) for v in frame[col].dropna()] if len(frame) else []
    return ", ".join(dict.fromkeys(vals)) or None


@dataclass(frozen=True)
class ChosenPolicy:
    """A policy that can stand for a GPU on the GPUs page, and where it comes from.

    ``source`` reads as the page shows it (``"exported chosen (store h100)"``, ``"policies/reference-h200.json"``,
    ``"fastest feasible trial 3 (store h200, study s)"``). ``measured`` holds the policy's ``measured`` block, or
    for a trial that was never exported the figures its search recorded.
    """

    gpu: str
    source: str
    policy: Any  # sixbit_tune.policy.Policy
    measured: Mapping[str, Any]
    path: str | None = None
    store: str | None = None
    study: str | None = None
    trial: int | None = None


def _target_gpu(policy: Any) -> str:
    return getattr(getattr(policy, "target", None), "gpu", None) or NO_GPU


def _measured(policy: Any) -> dict[str, Any]:
    m = getattr(policy, "measured", None)
    if m is None:
        return {}
    d = m.to_dict() if hasattr(m, "to_dict") else dict(m)
    return {k: v for k, v in d.items() if v is not None}


def gpu_policies(
    stores: Mapping[str, Store], trials: pd.DataFrame, policies_dir: str | os.PathLike | None = None
) -> tuple[dict[str, list[ChosenPolicy]], list[str]]:
    """The policies that can stand for each GPU of ``trials`` (:func:`gpu_trials`), best candidate first.

    Candidates, in this order: the policies exported into a store (its ``policies`` table, latest first) whose
    ``target.gpu`` is the GPU; the policy files in ``policies_dir`` whose ``target.gpu`` is the GPU and whose model
    (``model.config_hash``) is one the stores' searches ran (a file holding a policy already exported into a store,
    or recorded there by its path, is listed once); the fastest feasible COMPLETE trial of each of the GPU's
    searches. Every policy is read with :func:`sixbit_tune.policy.load`.

    Returns:
        ``(candidates, problems)``: GPU -> candidates; problems lists the policies that could not be read, each
        with its :class:`~sixbit_tune.errors.PolicyError` message (they are left out, nothing else is).
    """
    from sixbit_tune import policy as P

    gpus = list(dict.fromkeys(trials["gpu"])) if len(trials) else []
    out: dict[str, list[ChosenPolicy]] = {g: [] for g in gpus}
    problems: list[str] = []
    hashes: set[str] = set()
    seen_paths: set[str] = set()

    def read(raw: Any, what: str):
        try:
            return P.load(_json(raw) if isinstance(raw, str) else raw)
        except P.PolicyError as e:
            problems.append(f"{what}: {e}")
            return None

    for label, store in stores.items():
        exported = store.query(
            "SELECT name, study, trial, path, CAST(policy AS VARCHAR) AS policy FROM policies ORDER BY updated DESC"
        )
        for r in exported.itertuples():
            pol = read(r.policy, f"policy {r.name!r} exported into store {label}")
            if pol is None:
                continue
            hashes.add(pol.model.config_hash)
            gpu = _target_gpu(pol)
            if r.path:
                seen_paths.add(str(Path(r.path).absolute()))
            if gpu in out:
                out[gpu].append(ChosenPolicy(gpu, f"exported {r.name} (store {label})", pol, _measured(pol),
                                             r.path, label, r.study, None if pd.isna(r.trial) else int(r.trial)))
    fastest: dict[str, list[ChosenPolicy]] = {g: [] for g in gpus}
    ok = trials[(trials["state"] == "COMPLETE") & trials["feasible"].fillna(True).astype(bool)] if len(trials) \
        else trials
    for (label, study, gpu), g in ok.groupby(["store", "study", "gpu"], sort=False):
        best = g.sort_values("latency_ms").iloc[0]
        number = int(best["number"])
        pol = read(trial_policy(stores[label], study, number), f"trial {number} of study {study!r} (store {label})")
        if pol is None:
            continue
        hashes.add(pol.model.config_hash)
        figures = {k: best[k] for k in ("latency_ms", "speedup", "peak_memory_bytes", "weight_bytes", "psnr_db",
                                        "nvfp4_share", "skip_share") if pd.notna(best[k])}
        fastest[gpu].append(ChosenPolicy(gpu, f"fastest feasible trial {number} (store {label}, study {study})",
                                         pol, _measured(pol) or figures, None, label, study, number))
    if policies_dir is not None and Path(policies_dir).is_dir():
        for path in sorted(Path(policies_dir).glob("*.json"), key=lambda p: (-p.stat().st_mtime, p.name)):
            if path.name == "schema.json" or str(path.absolute()) in seen_paths:
                continue
            pol = read(path, f"policy file {path}")
            if pol is None or pol.model.config_hash not in hashes:
                continue
            gpu = _target_gpu(pol)
            if gpu in out and not any(c.policy == pol for c in out[gpu]):
                out[gpu].append(ChosenPolicy(gpu, f"{Path(policies_dir).name}/{path.name}", pol, _measured(pol),
                                             str(path)))
    for gpu in gpus:
        out[gpu] += fastest[gpu]
    return out, problems


def _obj_dict(v: Any) -> Any:
    """A policy part as plain JSON-like data (policy classes through their ``to_dict``, other dataclasses through
    :func:`dataclasses.asdict`)."""
    if hasattr(v, "to_dict"):
        return v.to_dict()
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return dataclasses.asdict(v)
    return v


def layer_routes(lp: Any) -> tuple[str, tuple[str, ...]]:
    """(stored weight format, the routes ``"<weight>/<activation>"`` the layer may take) of one layer policy, for
    schema 1 (``mode`` only: a dynamic layer kept NVFP4 and INT8 weights) and schema 2 (``weight``, ``fast``,
    ``robust``, ``mode`` dynamic | fast | robust; absent activation formats are the weight's defaults)."""
    mode = getattr(lp, "mode", None)
    weight = getattr(lp, "weight", None)
    if weight is None:
        return _V1_WEIGHT.get(mode, str(mode)), _V1_ROUTES.get(mode, (str(mode),))
    if weight == "none":
        return "none", ()
    fast, robust = getattr(lp, "fast", None), getattr(lp, "robust", None)
    if fast is None or robust is None:
        try:
            from sixbit_tune.routes import DEFAULT_ROUTES
        except ImportError:
            DEFAULT_ROUTES = {}
        d_fast, d_robust = DEFAULT_ROUTES.get(weight, (weight, weight))
        fast, robust = fast or d_fast, robust or d_robust
    if mode == "dynamic":
        return weight, tuple(dict.fromkeys((f"{weight}/{fast}", f"{weight}/{robust}")))
    return weight, (f"{weight}/{robust if mode == 'robust' else fast}",)


def layer_route(lp: Any) -> tuple[str, str]:
    """(stored weight format, route label) of one layer policy: ``"nvfp4/nvfp4"`` for a layer always on one
    route, ``"nvfp4/nvfp4 | nvfp4/int8 (dynamic)"`` for a dynamic one, ``"none (model dtype)"`` for an
    unquantized one (:func:`layer_routes`)."""
    weight, routes = layer_routes(lp)
    if not routes:
        return weight, "none (model dtype)"
    dynamic = getattr(lp, "mode", None) == "dynamic" and len(routes) > 1
    return weight, " | ".join(routes) + (" (dynamic)" if dynamic else "")


def _attention_modes(policy: Any) -> dict[int, str]:
    """Block index -> attention mode ("dynamic" | "8bit" | "bf16") of every block of the policy's model ({} for a
    policy without an attention section in its schema; every block "bf16" where the section is null)."""
    if not hasattr(policy, "attention"):
        return {}
    att = policy.attention
    n = policy.model.blocks
    if att is None:
        return {i: "bf16" for i in range(n)}
    return {i: att.mode_of(i) for i in range(n)}


def _layer_items(policy: Any) -> dict[str, Any]:
    return dict(getattr(getattr(policy, "dmpq", None), "layers", None) or {})


def route_counts(chosen: Mapping[str, ChosenPolicy]) -> pd.DataFrame:
    """Layers per stored weight format and per route, one column per GPU. Columns: what ("weight" | "route"),
    value, then one per GPU (counts, 0 where a GPU's policy has none)."""
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for gpu, c in chosen.items():
        for lp in _layer_items(c.policy).values():
            weight, route = layer_route(lp)
            for key in (("weight", weight), ("route", route)):
                counts.setdefault(key, {}).setdefault(gpu, 0)
                counts[key][gpu] += 1
    rows = [{"what": k[0], "value": k[1], **{g: v.get(g, 0) for g in chosen}} for k, v in counts.items()]
    return pd.DataFrame(rows, columns=["what", "value", *chosen]).sort_values(["what", "value"], ascending=[False, True],
                                                                              ignore_index=True)


def policy_side_by_side(chosen: Mapping[str, ChosenPolicy], overview: pd.DataFrame | None = None) -> pd.DataFrame:
    """The chosen policies of several GPUs side by side: one row per setting or figure, one column per GPU.

    Rows (``section``, ``setting``): source; the device (memory, driver, from the :func:`gpu_overview` rows, when
    given); target (GPU, compute capability, NVFP4 path, menu routes); DMPQ (τ,
    first-step format, weight encoder, layers per weight format, share of in-block layers storing NVFP4 weights);
    attention (threshold and block modes, where the policy has them); TDC (every knob); measured (latency, speed-up,
    peak memory, weight bytes, cache bytes, PSNR, SSIM, NVFP4 share of layer calls, skipped share). Values are the
    policies' own (numbers stay numbers); None where a policy does not say.
    """
    rows: dict[tuple[str, str], dict[str, Any]] = {}

    def put(section: str, setting: str, gpu: str, value: Any) -> None:
        if isinstance(value, np.generic):
            value = value.item()
        rows.setdefault((section, setting), {})[gpu] = _num(value)

    for gpu, c in chosen.items():
        p = c.policy
        put("policy", "source", gpu, c.source)
        put("policy", "model", gpu, f"{p.model.cls} ({p.model.config_hash[:12]})")
        if overview is not None and len(overview):
            dev = overview[overview["gpu"] == gpu]
            put("device", "GPU memory", gpu, None if dev.empty else _num(dev["gpu_memory_bytes"].iloc[0]))
            put("device", "driver", gpu, None if dev.empty else dev["driver"].iloc[0])
        target = p.target
        put("target", "GPU", gpu, target.gpu or NO_GPU)
        put("target", "compute capability", gpu, target.compute_capability)
        put("target", "NVFP4 path", gpu, getattr(target, "nvfp4_path", None))
        menu = _menu(p)
        put("target", "menu routes", gpu, ", ".join(menu) if menu else None)
        dmpq = p.dmpq
        put("DMPQ", "threshold τ", gpu, dmpq.threshold)
        put("DMPQ", "first step", gpu, getattr(dmpq, "first_step", None) or getattr(dmpq, "first_step_format", None))
        put("DMPQ", "NVFP4 weight encoder", gpu, getattr(dmpq, "nvfp4_weight_encoder", None))
        layers = _layer_items(p)
        weights = [layer_route(lp)[0] for lp in layers.values()]
        put("DMPQ", "in-block layers", gpu, len(layers))
        for w in sorted(set(weights)):
            put("DMPQ", f"layers storing {w}", gpu, weights.count(w))
        put("DMPQ", "share of layers storing NVFP4 weights", gpu,
            sum(w.startswith("nvfp4") for w in weights) / len(weights) if weights else None)
        if hasattr(p, "attention"):
            modes = _attention_modes(p)
            put("attention", "8-bit attention", gpu, "on" if any(m != "bf16" for m in modes.values()) else "off")
            att = p.attention
            put("attention", "threshold τ_a", gpu, None if att is None else getattr(att, "threshold", None))
            put("attention", "format", gpu, None if att is None else getattr(att, "format", None))
            for m in ("dynamic", "8bit", "bf16"):
                put("attention", f"blocks {m}", gpu, sum(x == m for x in modes.values()))
        tdc = p.tdc
        for k in ("tolerance", "warmup", "cooldown", "max_skips", "cache_dtype", "extrapolate", "refresh_robust"):
            put("TDC", "tolerance δ" if k == "tolerance" else k, gpu, getattr(tdc, k, None))
        put("TDC", "cacheable blocks", gpu, "all" if tdc.blocks is None else ", ".join(map(str, tdc.blocks)))
        m = c.measured
        for k in ("latency_ms", "speedup", "peak_memory_bytes", "weight_bytes", "cache_bytes", "psnr_db", "ssim",
                  "nvfp4_share", "skip_share"):
            put("measured", k, gpu, m.get(k))
    for (section, setting), values in rows.items():  # a weight format a policy does not store: 0 layers
        if section == "DMPQ" and setting.startswith("layers storing"):
            for gpu in chosen:
                values.setdefault(gpu, 0)
    sections = list(dict.fromkeys(s for s, _ in rows))
    order = sorted(rows, key=lambda key: sections.index(key[0]))  # stable: settings keep their order
    out = [{"section": s, "setting": k, **{g: rows[(s, k)].get(g) for g in chosen}} for s, k in order]
    return pd.DataFrame(out, columns=["section", "setting", *chosen])


def _num(v: Any) -> Any:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA else v


def policies_token(folder: str | os.PathLike) -> str:
    """A token that changes whenever a policy file (``*.json``) in ``folder`` appears, disappears or changes."""
    h = hashlib.sha256(str(folder).encode())
    try:
        entries = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(folder)
                         if e.name.endswith(".json"))
    except (FileNotFoundError, NotADirectoryError):
        entries = []
    for name, size, mtime in entries:
        h.update(f"{name}:{size}:{mtime};".encode())
    return h.hexdigest()[:16]


def chosen_points(trials: pd.DataFrame, chosen: Mapping[str, ChosenPolicy]) -> pd.DataFrame:
    """Where each GPU's chosen policy sits on the fronts of :func:`gpu_trials`: its measured latency, PSNR and
    memory (the search's memory objective of the trial it came from, where the store has that trial), on the
    series of its search. Columns: gpu, series, label, latency_ms, psnr_db, memory_bytes."""
    rows = []
    for gpu, c in chosen.items():
        m = c.measured
        row = {"gpu": gpu, "series": gpu, "label": f"{gpu}: {c.source}", "latency_ms": _num(m.get("latency_ms")),
               "psnr_db": _num(m.get("psnr_db")),
               "memory_bytes": _num(m.get("peak_memory_bytes")) or _num(m.get("weight_bytes"))}
        if len(trials) and c.store is not None and c.study is not None:
            t = trials[(trials["store"] == c.store) & (trials["study"] == c.study) & (trials["gpu"] == gpu)]
            if len(t):
                row["series"] = t["series"].iloc[0]
                hit = t[t["number"] == c.trial] if c.trial is not None else t.iloc[0:0]
                if len(hit):
                    row["memory_bytes"] = _num(hit["memory_bytes"].iloc[0])
        rows.append(row)
    return pd.DataFrame(rows, columns=["gpu", "series", "label", "latency_ms", "psnr_db", "memory_bytes"])


def _same(values: Sequence[Any]) -> bool:
    norm = []
    for v in values:
        v = _num(v)
        if isinstance(v, int | float | np.number) and not isinstance(v, bool):
            v = round(float(v), 9)
        norm.append(v)
    return all(v == norm[0] for v in norm[1:])


def differing_settings(side_by_side: pd.DataFrame) -> pd.DataFrame:
    """The rows of :func:`policy_side_by_side` whose value is not the same on every GPU (the policy source and the
    target GPU always differ and are left out)."""
    gpus = [c for c in side_by_side.columns if c not in ("section", "setting")]
    skip = {("policy", "source"), ("target", "GPU")}
    keep = [
        (r["section"], r["setting"]) not in skip and not _same([r[g] for g in gpus])
        for _, r in side_by_side.iterrows()
    ]
    return side_by_side[keep].reset_index(drop=True)


def layer_decisions(chosen: Mapping[str, ChosenPolicy]) -> pd.DataFrame:
    """Per in-block layer, the route each GPU's policy gives it, and, where a policy quantizes attention, each
    block's attention mode (rows ``attention of block <i>``). Columns: layer, one per GPU (the route of
    :func:`layer_route`, or ``attention <mode>``; None where the policy lacks the layer), differs (not the same on
    every GPU); ordered by name with block numbers compared as numbers."""
    names: dict[str, dict[str, str]] = {}
    for gpu, c in chosen.items():
        for name, lp in _layer_items(c.policy).items():
            names.setdefault(name, {})[gpu] = layer_route(lp)[1]
    if any(m != "bf16" for c in chosen.values() for m in _attention_modes(c.policy).values()):
        for gpu, c in chosen.items():
            for i, mode in _attention_modes(c.policy).items():
                names.setdefault(f"attention of block {i}", {})[gpu] = f"attention {mode}"
    rows = [{"layer": n, **{g: v.get(g) for g in chosen}} for n, v in names.items()]
    df = pd.DataFrame(rows, columns=["layer", *chosen])
    df["differs"] = [not _same([r[g] for g in chosen]) for _, r in df.iterrows()] if len(df) else []
    key = df["layer"].map(lambda s: [int(x) if x.isdigit() else x for x in str(s).split(".")]) if len(df) else None
    if key is not None:
        df = df.iloc[sorted(range(len(df)), key=lambda i: [(0, x) if isinstance(x, int) else (1, x)
                                                           for x in key.iloc[i]])]
    return df.reset_index(drop=True)


def _menu(policy: Any) -> dict[str, dict[str, Any]]:
    """route -> {implementation, measured speed fields} from a policy's ``target.menu`` (schema 2; {} before)."""
    menu = getattr(getattr(policy, "target", None), "menu", None)
    if not menu:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for route, entry in dict(menu).items():
        e = _obj_dict(entry)
        if isinstance(e, Mapping):
            out[str(route)] = {str(k): v for k, v in e.items()}
        elif isinstance(e, int | float) and not isinstance(e, bool):
            out[str(route)] = {"speed": e}
        else:
            out[str(route)] = {"implementation": e}
    return out


def menu_comparison(chosen: Mapping[str, ChosenPolicy]) -> pd.DataFrame:
    """The routes each GPU's policy was chosen from (``target.menu``: the route's implementation and its measured
    speed), one row per (route, GPU). Columns: route, gpu, layers (in-block layers of that GPU's policy that may
    take the route), then every field the menus carry (``implementation`` first). Empty when no policy carries a
    menu (schema 1 policies do not)."""
    rows = []
    for gpu, c in chosen.items():
        used: dict[str, int] = {}
        for lp in _layer_items(c.policy).values():
            for route in layer_routes(lp)[1]:
                used[route] = used.get(route, 0) + 1
        for route, fields in _menu(c.policy).items():
            rows.append({"route": route, "gpu": gpu, "layers": used.get(route, 0), **fields})
    if not rows:
        return pd.DataFrame(columns=["route", "gpu", "layers", "implementation"])
    df = pd.DataFrame(rows)
    first = ["route", "gpu", "layers"] + (["implementation"] if "implementation" in df else [])
    df = df[first + [c for c in df.columns if c not in first]]
    for c in df.columns[len(first):]:
        df[c] = [json.dumps(v, sort_keys=True) if isinstance(v, Mapping | list) else v for v in df[c]]
    return df.sort_values("route", kind="stable", ignore_index=True)  # GPUs keep the order of ``chosen``


# ------------------------------------------------------------------------------------------------ attention


def attention_table(store: Store) -> str | None:
    """The name of the store's per-block attention error table (:data:`ATTENTION_TABLES`), or None when the store
    has none (its schema predates it)."""
    names = store.query(
        "SELECT table_name FROM information_schema.tables WHERE table_name IN (SELECT unnest($names))",
        {"names": list(ATTENTION_TABLES)},
    )["table_name"].tolist()
    return next((n for n in ATTENTION_TABLES if n in names), None)


def attention_formats(store: Store, run_id: str) -> list[str]:
    """The attention formats profiled in a run ([] when none, or when the store has no attention table)."""
    table = attention_table(store)
    if table is None:
        return []
    df = store.query(f"SELECT DISTINCT format FROM {table} WHERE run_id = ? ORDER BY format", [run_id])
    return [str(f) for f in df["format"]]


def attention_grid(store: Store, run_id: str, fmt: str, branch: str | None = None) -> pd.DataFrame:
    """Mean ``attn_err`` per (block, step) of one run and attention format, over prompts (and branches unless
    ``branch`` picks one). Columns: block_index, step, attn_err, n; empty when the store has no attention table."""
    table = attention_table(store)
    if table is None:
        return pd.DataFrame(columns=["block_index", "step", "attn_err", "n"])
    return store.query(
        f"""
        SELECT block_index, step, avg(attn_err) AS attn_err, count(*) AS n
        FROM {table}
        WHERE run_id = $run AND format = $fmt AND ($branch IS NULL OR branch = $branch)
        GROUP BY block_index, step
        ORDER BY block_index, step
        """,
        {"run": run_id, "fmt": fmt, "branch": branch},
    )


def menu_side_by_side(menus: pd.DataFrame) -> pd.DataFrame:
    """:func:`menu_comparison` with one row per route and, per GPU, its columns side by side (``"<gpu>: layers"``,
    ``"<gpu>: implementation"``, ``"<gpu>: speedup"``, ...); routes a GPU's menu lacks are empty there."""
    if menus.empty:
        return pd.DataFrame(columns=["route"])
    fields = [c for c in menus.columns if c not in ("route", "gpu")]
    gpus = list(dict.fromkeys(menus["gpu"]))
    wide = menus.set_index(["route", "gpu"])[fields].unstack("gpu")
    wide.columns = [f"{g}: {f}" for f, g in wide.columns]
    order = [f"{g}: {f}" for g in gpus for f in fields]
    return wide.reindex(columns=order).reset_index()
