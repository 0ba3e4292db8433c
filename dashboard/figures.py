"""The dashboard's figures: plain functions from the DataFrames of :mod:`sixbit_tune.dashboard.data` to Plotly
figures. No Streamlit and no store access here; every builder accepts an empty frame and returns a figure that
says so instead of raising."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

FORMAT_LABEL = {"nvfp4": "NVFP4", "int8": "INT8", "fp8": "FP8", "nvfp4/int8": "W4A8 (NVFP4/INT8)",
                "nvfp4/fp8": "NVFP4/FP8"}
"""Labels of the profiled routes (``layer_steps.format``)."""
PRECISION_SCALE = [[0.0, "#3b6fb6"], [1.0, "#e8833a"]]  # INT8 blue -> NVFP4 orange
FASTER, SLOWER = "#2e8b57", "#c0392b"  # speed-up bars: green at or above 1x, red below (a slow-down)


def _empty(title: str, message: str) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title, xaxis={"visible": False}, yaxis={"visible": False},
                      annotations=[{"text": message, "showarrow": False, "font": {"size": 14}}])
    return fig


def _grid(df: pd.DataFrame, row: str, col: str, value: str, row_order: Sequence | None = None) -> pd.DataFrame:
    g = df.pivot_table(index=row, columns=col, values=value, aggfunc="mean", dropna=False)
    if row_order is not None:
        g = g.reindex([r for r in row_order if r in g.index])
    return g


def error_heatmap(grid: pd.DataFrame, fmt: str, log: bool = True) -> go.Figure:
    """Mean ``out_err`` per layer (rows, in block order) × step (columns) for one format (the paper's Figure 1).

    Args:
        grid: :func:`~sixbit_tune.dashboard.data.layer_error_grid` output.
        fmt: the route (``layer_steps.format``: ``"nvfp4"``, ``"nvfp4/int8"``, ...; title only).
        log: colour by log10(out_err) (errors span orders of magnitude across layers and formats).
    """
    title = f"{FORMAT_LABEL.get(fmt, fmt)} relative output error (out_err), layer × step"
    if grid.empty:
        return _empty(title, f"no {fmt} errors recorded")
    order = grid.drop_duplicates("layer").sort_values(["block_index", "layer"])["layer"].tolist()
    g = _grid(grid, "layer", "step", "out_err", order)
    z = g.to_numpy(dtype=float)
    shown = np.log10(np.where(z > 0, z, np.nan)) if log else z
    fig = go.Figure(go.Heatmap(
        z=shown, x=[int(c) for c in g.columns], y=list(g.index), customdata=z, colorscale="Viridis",
        colorbar={"title": "log10 out_err" if log else "out_err"},
        hovertemplate="layer %{y}<br>step %{x}<br>out_err %{customdata:.4g}<extra></extra>",
    ))
    fig.update_layout(title=title, xaxis_title="denoising step", xaxis_dtick=1, yaxis_title="linear layer",
                      yaxis={"autorange": "reversed"}, height=max(360, 14 * len(order) + 140))
    return fig


def predictor_scatter(pairs: pd.DataFrame, layer: str, alpha: float | None, beta: float | None,
                      r2: float | None) -> go.Figure:
    """Γ_{t−1} against NVFP4 ``out_err_t`` of one layer, coloured by guidance branch, with the fitted line
    out_err ≈ α·Γ + β and its R² (the paper's Figure 3, left)."""
    title = f"{layer}: NVFP4 out_err against Γ at the previous step"
    if pairs.empty:
        return _empty(title, "no (Γ_{t−1}, out_err) pairs for this layer")
    fig = go.Figure()
    for branch, g in pairs.groupby("branch", sort=True):
        fig.add_trace(go.Scatter(
            x=g["gamma_prev"], y=g["out_err"], mode="markers", name=f"{branch}",
            customdata=np.stack([g["step"], g["prompt_index"]], axis=1),
            hovertemplate="Γ_{t−1} %{x:.4g}<br>out_err %{y:.4g}<br>step %{customdata[0]} prompt "
                          "%{customdata[1]}<extra></extra>",
        ))
    if alpha is not None and beta is not None and np.isfinite(alpha) and np.isfinite(beta):
        xs = np.linspace(float(pairs["gamma_prev"].min()), float(pairs["gamma_prev"].max()), 50)
        label = f"fit: {alpha:.4g}·Γ + {beta:.4g}" + (f" (R² = {r2:.3f})" if r2 is not None else "")
        fig.add_trace(go.Scatter(x=xs, y=alpha * xs + beta, mode="lines", name=label, line={"color": "black"}))
    fig.update_layout(title=title, xaxis_title="Γ_{t−1} = ‖Y−X‖₁/‖X‖₁ of the block at step t−1",
                      yaxis_title="NVFP4 out_err at step t", legend={"orientation": "h", "y": -0.25})
    return fig


def r2_histogram(layers: pd.DataFrame, bins: int = 20) -> go.Figure:
    """Distribution of the predictors' R² over all layers of a fit, split by trust (the paper's Figure 3, right)."""
    title = "R² of the per-layer predictors"
    if layers.empty:
        return _empty(title, "no predictors in this fit")
    fig = go.Figure()
    for trusted, g in layers.groupby("trusted", sort=True):
        fig.add_trace(go.Histogram(
            x=g["r2"], name="trusted" if trusted else "not trusted (static format)",
            xbins={"start": 0.0, "end": 1.0, "size": 1.0 / bins},
        ))
    med = float(np.nanmedian(layers["r2"].to_numpy(dtype=float)))
    fig.add_vline(x=med, line_dash="dash", annotation_text=f"median {med:.3f}")
    fig.update_layout(title=title, barmode="stack", xaxis_title="R²", yaxis_title="layers",
                      xaxis={"range": [min(0.0, float(layers["r2"].min())), 1.0]})
    return fig


def block_heatmap(grid: pd.DataFrame, value: str, title: str | None = None) -> go.Figure:
    """One block statistic (``delta_cos``, ``delta_change`` or ``gamma``) per block (rows) × step (columns)
    (the paper's Figure 4)."""
    title = title or f"{value}, block × step"
    g = grid.dropna(subset=[value]) if not grid.empty else grid
    if g.empty:
        return _empty(title, f"no {value} values (it is undefined at the first step)")
    piv = _grid(grid, "block_index", "step", value)
    scale = "RdBu" if value == "delta_cos" else "Viridis"
    fig = go.Figure(go.Heatmap(
        z=piv.to_numpy(dtype=float), x=[int(c) for c in piv.columns], y=[int(i) for i in piv.index],
        colorscale=scale, colorbar={"title": value},
        zmid=0.0 if value == "delta_cos" else None,
        hovertemplate="block %{y}<br>step %{x}<br>" + value + " %{z:.4g}<extra></extra>",
    ))
    fig.update_layout(title=title, xaxis_title="denoising step", xaxis_dtick=1, yaxis_title="block",
                      yaxis={"autorange": "reversed", "dtick": 1})
    return fig


def pareto_figure(trials: pd.DataFrame) -> go.Figure:
    """Latency against PSNR of every COMPLETE trial, marker size ∝ memory, Pareto-optimal feasible trials
    highlighted and joined, infeasible ones hollow."""
    title = "Trials: latency, memory and quality (Pareto front highlighted)"
    done = trials[trials["state"] == "COMPLETE"] if not trials.empty else trials
    if done.empty:
        return _empty(title, "no completed trials yet")
    mem = pd.to_numeric(done["memory_bytes"], errors="coerce").astype(float)
    size = 10 + 25 * (mem - mem.min()) / ((mem.max() - mem.min()) or 1.0)
    fig = go.Figure()
    groups = (
        ("Pareto front (feasible)", done["pareto"], {"symbol": "star", "color": "#e8833a"}),
        ("feasible", ~done["pareto"] & done["feasible"].fillna(True).astype(bool), {"color": "#3b6fb6"}),
        ("below quality floor", ~done["feasible"].fillna(True).astype(bool),
         {"color": "#999999", "symbol": "circle-open"}),
    )
    for name, sel, marker in groups:
        g = done[sel.to_numpy(dtype=bool)]
        if g.empty:
            continue
        fig.add_trace(go.Scatter(
            x=g["latency_ms"], y=g["psnr_db"], mode="markers", name=name,
            marker={**marker, "size": size[sel.to_numpy(dtype=bool)], "line": {"width": 1}},
            customdata=np.stack([g["number"], g["memory_bytes"].fillna(-1)], axis=1),
            hovertemplate="trial %{customdata[0]}<br>latency %{x:.1f} ms<br>PSNR %{y:.2f} dB<br>memory "
                          "%{customdata[1]:,} B<extra></extra>",
        ))
    front = done[done["pareto"]].sort_values("latency_ms")
    if len(front) > 1:
        fig.add_trace(go.Scatter(x=front["latency_ms"], y=front["psnr_db"], mode="lines", showlegend=False,
                                 line={"color": "#e8833a", "dash": "dot"}, hoverinfo="skip"))
    fig.update_layout(title=title, xaxis_title="latency (ms, lower is better)",
                      yaxis_title="PSNR vs unquantized (dB, higher is better)", legend={"orientation": "h", "y": -0.2})
    return fig


def hypervolume_figure(history: pd.DataFrame) -> go.Figure:
    """Hypervolume of the feasible front after each trial (normalised objectives)."""
    title = "Hypervolume over trials (objectives normalised to [0, 1], reference point 1.1)"
    if history.empty:
        return _empty(title, "no feasible completed trials yet")
    fig = go.Figure(go.Scatter(x=history["number"], y=history["hypervolume"], mode="lines+markers",
                               line={"shape": "hv"}))
    fig.update_layout(title=title, xaxis_title="trial number", yaxis_title="hypervolume")
    return fig


def importance_figure(table: pd.DataFrame) -> go.Figure:
    """Parameter importance per objective (grouped horizontal bars)."""
    title = "Parameter importance per objective"
    if table.empty:
        return _empty(title, "not enough completed trials to compute importances")
    fig = go.Figure()
    for objective, g in table.groupby("objective", sort=False):
        fig.add_trace(go.Bar(y=g["param"], x=g["importance"], name=str(objective), orientation="h"))
    fig.update_layout(title=title, barmode="group", xaxis_title="importance", yaxis_title="parameter")
    return fig


def precision_map_figure(precision: pd.DataFrame) -> go.Figure:
    """Share of (prompt, branch) rows running each layer in NVFP4 (1, orange) rather than INT8 (0, blue) per step;
    blank where every row skipped the block or the layer stays in the model dtype."""
    title = "Precision map: NVFP4 share (0 = INT8)"
    if precision.empty:
        return _empty(title, "the policy has no in-block layers")
    order = precision.drop_duplicates("layer").sort_values(["block_index", "layer"])["layer"].tolist()
    g = _grid(precision, "layer", "step", "nvfp4_share", order)
    fig = go.Figure(go.Heatmap(
        z=g.to_numpy(dtype=float), x=[int(c) for c in g.columns], y=list(g.index), zmin=0.0, zmax=1.0,
        colorscale=PRECISION_SCALE, colorbar={"title": "NVFP4 share", "tickvals": [0, 0.5, 1],
                                              "ticktext": ["INT8", "mixed", "NVFP4"]},
        hovertemplate="layer %{y}<br>step %{x}<br>NVFP4 share %{z:.2f}<extra></extra>",
    ))
    fig.update_layout(title=title, xaxis_title="denoising step", xaxis_dtick=1, yaxis_title="linear layer",
                      yaxis={"autorange": "reversed"}, height=max(360, 14 * len(order) + 140))
    return fig


def skip_map_figure(skips: pd.DataFrame) -> go.Figure:
    """Share of (prompt, branch) rows in which the Temporal Delta Cache skips each block per step."""
    title = "Skip map: share of rows skipping (TDC)"
    if skips.empty:
        return _empty(title, "no block statistics")
    g = _grid(skips, "block_index", "step", "skip_share")
    names = skips.drop_duplicates("block_index").set_index("block_index")["block"] if "block" in skips else None
    label = [[str(names.get(i) or i) if names is not None else str(i)] * g.shape[1] for i in g.index]
    fig = go.Figure(go.Heatmap(
        z=g.to_numpy(dtype=float), x=[int(c) for c in g.columns], y=[int(i) for i in g.index], zmin=0.0, zmax=1.0,
        colorscale=[[0.0, "#e8eef7"], [1.0, "#1f3b73"]], colorbar={"title": "skip share"}, customdata=label,
        hovertemplate="block %{y} (%{customdata})<br>step %{x}<br>skipped in %{z:.0%} of rows<extra></extra>",
    ))
    fig.update_layout(title=title, xaxis_title="denoising step", xaxis_dtick=1, yaxis_title="block",
                      yaxis={"autorange": "reversed", "dtick": 1})
    return fig


def gpu_comparison_figure(comparison: pd.DataFrame) -> go.Figure:
    """Speedup, PSNR, NVFP4 and skip shares of each store's chosen policy, side by side. Speed-up bars below 1×
    (the policy is slower than its baseline) are red and labelled "slower"; a dashed line marks 1×."""
    title = "Chosen policy per store (GPU)"
    rows = comparison.dropna(subset=["latency_ms"]) if not comparison.empty else comparison
    if rows.empty:
        return _empty(title, "no store has a completed search trial")
    fig = make_subplots(rows=1, cols=3, subplot_titles=("speedup vs baseline", "PSNR (dB)", "shares"))
    x = [f"{s}<br>{g}" for s, g in zip(rows["store"], rows["gpu"])]
    speed = pd.to_numeric(rows["speedup"], errors="coerce")
    fig.add_trace(go.Bar(
        x=x, y=speed, name="speedup", marker_color=[SLOWER if v < 1 else FASTER for v in speed.fillna(1.0)],
        text=[("" if pd.isna(v) else f"{v:.2f}×" + (" (slower)" if v < 1 else "")) for v in speed],
        hovertemplate="%{x}<br>speed-up %{y:.2f}× vs baseline (below 1: slower)<extra></extra>",
    ), row=1, col=1)
    fig.add_hline(y=1.0, line_dash="dash", line_color="#555", annotation_text="baseline 1×", row=1, col=1)
    fig.add_trace(go.Bar(x=x, y=rows["psnr_db"], name="PSNR"), row=1, col=2)
    fig.add_trace(go.Bar(x=x, y=rows["nvfp4_share"], name="NVFP4 share"), row=1, col=3)
    fig.add_trace(go.Bar(x=x, y=rows["skip_share"], name="skip share"), row=1, col=3)
    fig.update_yaxes(range=[0, 1], row=1, col=3)
    fig.update_layout(title=title, barmode="group", legend={"orientation": "h", "y": -0.25})
    return fig


GPU_COLOURS = ("#e8833a", "#3b6fb6", "#2e8b57", "#8e44ad", "#c0392b", "#16a085", "#7f8c8d", "#d35400")


def gpu_fronts_figure(trials: pd.DataFrame, chosen: pd.DataFrame | None = None) -> go.Figure:
    """The searches of several GPUs on shared axes: latency against PSNR (left) and against memory (right), one
    colour per search (:func:`~sixbit_tune.dashboard.data.gpu_trials` ``series``). Pareto-optimal feasible trials
    (non-dominated in latency, memory and PSNR together, so not joined by a line in either 2-D view) are stars,
    other feasible trials small dots, trials below the quality floor hollow.
    ``chosen`` (columns series, latency_ms, psnr_db, memory_bytes, label) marks each GPU's chosen policy with a
    ringed diamond where its figures are known."""
    title = "Pareto fronts per GPU: latency, quality and memory (shared axes)"
    done = trials[trials["state"] == "COMPLETE"] if not trials.empty else trials
    done = done.dropna(subset=["latency_ms", "psnr_db"]) if not done.empty else done
    if done.empty:
        return _empty(title, "no completed trials on any GPU yet")
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.08,
                        subplot_titles=("latency vs PSNR", "latency vs memory"))
    metric = next((m for m in done.get("memory_metric", pd.Series(dtype=object)).dropna()), None)
    for i, (series, g) in enumerate(done.groupby("series", sort=False)):
        colour = GPU_COLOURS[i % len(GPU_COLOURS)]
        feasible = g["feasible"].fillna(True).astype(bool).to_numpy()
        front = g["pareto"].astype(bool).to_numpy()
        parts = (("front", front, {"symbol": "star", "size": 13}, True),
                 ("feasible", feasible & ~front, {"size": 7, "opacity": 0.55}, False),
                 ("below quality floor", ~feasible, {"symbol": "circle-open", "size": 7}, False))
        for name, sel, marker, legend in parts:
            s = g[sel]
            if s.empty:
                continue
            custom = s[["number", "store", "study", "memory_bytes", "psnr_db"]].to_numpy(dtype=object)
            hover = (f"{series}<br>trial %{{customdata[0]}} (%{{customdata[1]}}/%{{customdata[2]}})<br>"
                     "latency %{x:.1f} ms<br>PSNR %{customdata[4]:.2f} dB<br>memory %{customdata[3]:,} B"
                     "<extra></extra>")
            for col, y in ((1, s["psnr_db"]), (2, s["memory_bytes"])):
                fig.add_trace(go.Scatter(
                    x=s["latency_ms"], y=y, mode="markers", name=f"{series}" + ("" if legend else f" · {name}"),
                    legendgroup=str(series), showlegend=legend and col == 1,
                    marker={**marker, "color": colour, "line": {"width": 1, "color": colour}},
                    customdata=custom, hovertemplate=hover,
                ), row=1, col=col)
    if chosen is not None and not chosen.empty:
        c = chosen.dropna(subset=["latency_ms"])
        for col, y in ((1, "psnr_db"), (2, "memory_bytes")):
            cc = c.dropna(subset=[y])
            if cc.empty:
                continue
            fig.add_trace(go.Scatter(
                x=cc["latency_ms"], y=cc[y], mode="markers", name="chosen policy", legendgroup="chosen",
                showlegend=col == 1, text=cc["label"],
                marker={"symbol": "diamond-open", "size": 20, "color": "black", "line": {"width": 2}},
                hovertemplate="chosen: %{text}<br>latency %{x:.1f} ms<extra></extra>",
            ), row=1, col=col)
    fig.update_xaxes(title_text="latency (ms, lower is better)", row=1, col=1)
    fig.update_xaxes(title_text="latency (ms, lower is better)", matches="x", row=1, col=2)
    fig.update_yaxes(title_text="PSNR vs unquantized (dB, higher is better)", row=1, col=1)
    fig.update_yaxes(title_text=f"memory ({metric or 'bytes'}, lower is better)", row=1, col=2)
    fig.update_layout(title=title, legend={"orientation": "h", "y": -0.25}, height=480)
    return fig


def attention_heatmap(grid: pd.DataFrame, fmt: str, log: bool = True) -> go.Figure:
    """Mean ``attn_err`` of one attention format per block (rows) × step (columns): the 8-bit attention's relative
    error against the model's own attention output."""
    title = f"{fmt.upper()} attention error (attn_err), block × step"
    if grid.empty:
        return _empty(title, f"no {fmt} attention errors recorded")
    g = _grid(grid, "block_index", "step", "attn_err")
    z = g.to_numpy(dtype=float)
    shown = np.log10(np.where(z > 0, z, np.nan)) if log else z
    fig = go.Figure(go.Heatmap(
        z=shown, x=[int(c) for c in g.columns], y=[int(i) for i in g.index], customdata=z, colorscale="Viridis",
        colorbar={"title": "log10 attn_err" if log else "attn_err"},
        hovertemplate="block %{y}<br>step %{x}<br>attn_err %{customdata:.4g}<extra></extra>",
    ))
    fig.update_layout(title=title, xaxis_title="denoising step", xaxis_dtick=1, yaxis_title="block",
                      yaxis={"autorange": "reversed", "dtick": 1})
    return fig
