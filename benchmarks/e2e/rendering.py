"""Derived columns, merging of result files, the markdown table and the figure. Writes only the files it is given
(``<prefix>.json``, ``.md``, ``.html``); the README is curated by people and links to them.

Columns derived within one results file (one run: one process, one GPU), per workload:

* ``gpu`` — ``torch.cuda.get_device_name`` of the run's device, or ``"cpu"``.
* ``speedup_vs_bf16_compiled`` — latency of ``bf16-compiled`` (every block under ``torch.compile``) ÷ the row's.
* ``peak_memory_vs_bf16`` — the row's peak memory (``torch.cuda.max_memory_allocated`` over its timed runs) ÷
  ``bf16-compiled``'s; None on the CPU.
* ``weight_reduction_vs_bf16`` — transformer weight bytes of the bf16 model ÷ the row's.
* ``speedup_vs_best_peer`` — latency of the *best peer* ÷ the row's latency. The best peer of a row is the fastest
  row of the same workload in the same run that is not one of ours (kind ``baseline`` or ``peer``: bf16 eager,
  compiled or under CUDA graphs, torchao, FirstBlockCache, cache-dit, and their stacks), that ran without error, and
  whose quality is at least the row's. Quality is PSNR against the eager bf16 videos on the pipeline (reference)
  workload, where it is measured. On a transformer (shape) workload, which has random weights, a row's quality is
  the quality it stands for on the reference: for a replayed skip pattern, the reference PSNR of the pattern
  replayed (each peer cache is replayed at its threshold of matched reference quality: the largest threshold whose
  PSNR is at least our replayed policy's); otherwise the PSNR of the same contender name on the pipeline workload
  (of this run, or of the run whose skip patterns were replayed, ``--replay-from``); the bf16 baselines are
  lossless. A row without a quality figure gets None, and a peer without one does
  not count.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from sixbit_tune.errors import SixbitError

BASELINE = "bf16-compiled"
RESULTS_FILE = "e2e.json"
PEER_KINDS = ("baseline", "peer")


class MixedGPUError(SixbitError, ValueError):
    """Result files measured on different GPUs were asked to be merged into one table."""


# ------------------------------------------------------------------------------------------------ JSON
def _finite(o):
    """JSON has no Infinity/NaN: write non-finite floats as the strings "inf", "-inf", "nan"."""
    if isinstance(o, float) and not math.isfinite(o):
        return "nan" if math.isnan(o) else ("inf" if o > 0 else "-inf")
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_finite(v) for v in o]
    return o


def dumps(data) -> str:
    return json.dumps(_finite(data), indent=1, default=str, allow_nan=False)


# ------------------------------------------------------------------------------------------------ derived columns
def _kind(row: dict) -> str:
    if "kind" in row:
        return row["kind"]
    name = row["contender"]
    return "ours" if name.startswith("ours") else "baseline" if name.startswith("bf16") else "peer"


def quality(row: dict, reference: dict[str, float]) -> float | None:
    """The quality a row stands for (see the module docstring): PSNR in dB, ``inf`` for a bf16 baseline.
    ``reference``: PSNR per contender name on the pipeline workload."""
    if row.get("psnr_db") is not None:
        return row["psnr_db"]
    replay = row.get("replay") or {}
    if replay.get("reference_psnr_db") is not None:
        return replay["reference_psnr_db"]
    if reference.get(row["contender"]) is not None:
        return reference[row["contender"]]
    if _kind(row) == "baseline" and row["contender"].startswith("bf16"):
        return math.inf
    return None


def add_derived(data: dict) -> None:
    """Fill the derived columns of every row of one run's results (in place)."""
    rows = data["results"]
    gpu = (data.get("meta") or {}).get("gpu") or "cpu"
    kinds = {w["name"]: w.get("kind") for w in data.get("workloads", [])}
    # the pipeline workload's PSNR per contender: from this run, else as recorded by the run the replays came from
    reference = dict((data.get("replay") or {}).get("reference_quality") or {})
    reference.update({r["contender"]: r["psnr_db"] for r in rows if kinds.get(r["workload"]) == "pipeline"
                      and not r.get("error") and r.get("psnr_db") is not None})
    base = {r["workload"]: r for r in rows if r["contender"] == BASELINE and r.get("latency_s")}
    wb = {r["workload"]: r["weight_bytes"] for r in rows
          if r["contender"] in ("bf16-eager", BASELINE) and r.get("weight_bytes")}
    for r in rows:
        r.setdefault("gpu", gpu)
        b = base.get(r["workload"])
        lat = r.get("latency_s")
        r["speedup_vs_bf16_compiled"] = b["latency_s"] / lat if (b and lat) else None
        bp = b.get("peak_memory_bytes") if b else None
        r["peak_memory_vs_bf16"] = r["peak_memory_bytes"] / bp if (bp and r.get("peak_memory_bytes")) else None
        w = wb.get(r["workload"])
        r["weight_reduction_vs_bf16"] = w / r["weight_bytes"] if (w and r.get("weight_bytes")) else None
        r["speedup_vs_best_peer"], r["best_peer"] = None, None
        q = quality(r, reference)
        if not lat or q is None:
            continue
        peers = [p for p in rows if p["workload"] == r["workload"] and _kind(p) in PEER_KINDS and p.get("latency_s")
                 and not p.get("error") and not p["contender"].endswith("(repeat)")]
        peers = [p for p in peers if (pq := quality(p, reference)) is not None and pq >= q]
        if peers:
            best = min(peers, key=lambda p: p["latency_s"])
            r["speedup_vs_best_peer"], r["best_peer"] = best["latency_s"] / lat, best["contender"]


# ------------------------------------------------------------------------------------------------ merging
def merge(paths: list[str]) -> dict:
    """Merge result files of one GPU; later files replace earlier rows of the same (workload, contender) and
    workloads. Files measured on different GPUs are refused (their timings never share a table)."""
    loaded = [(p, json.loads(Path(p).read_text())) for p in paths]
    gpus = {os.path.basename(p): (d.get("meta") or {}).get("gpu") or "cpu" for p, d in loaded}
    if len(set(gpus.values())) > 1:
        raise MixedGPUError("these result files were measured on different GPUs and cannot share one table: "
                            + ", ".join(f"{f}: {g}" for f, g in gpus.items()) + "; render each GPU separately")
    data = {"meta": {}, "workloads": [], "results": [], "replay": {}}
    for i, (p, d) in enumerate(loaded, start=1):
        for r in d["results"]:
            r.setdefault("run", i)
        data["meta"] = data["meta"] or {**d["meta"]}
        data.setdefault("runs", []).append({"file": os.path.basename(p), "command": d["meta"].get("command"),
                                            "date": d["meta"].get("date"), "wall_s": d["meta"].get("wall_s")})
        old_wl = {w["name"]: w for w in data["workloads"]}
        for w in d["workloads"]:
            if w["name"] in old_wl:
                merged = {**old_wl[w["name"]], **w, "notes": list(dict.fromkeys(old_wl[w["name"]].get("notes", [])
                                                                            + w.get("notes", [])))}
                data["workloads"][data["workloads"].index(old_wl[w["name"]])] = merged
            else:
                data["workloads"].append(w)
        # A later row replaces an earlier one of the same (workload, contender) unless it failed where the earlier
        # one did not, or its run's baseline failed (its speedup would be missing) while the earlier row is fine.
        base_ok = {r["workload"] for r in d["results"] if r["contender"] == BASELINE and not r.get("error")}
        old = {(r["workload"], r["contender"]): r for r in data["results"]}
        for r in d["results"]:
            prev = old.get((r["workload"], r["contender"]))
            keep_prev = prev is not None and not prev.get("error") and (
                r.get("error") or r["workload"] not in base_ok)
            if prev is not None and not keep_prev:
                data["results"][data["results"].index(prev)] = r
            elif prev is None:
                data["results"].append(r)
        if d.get("replay"):
            data["replay"] = d["replay"]
    # ratios stay those computed inside each file: a ratio is only meaningful against rows measured in the same run
    return data


# ------------------------------------------------------------------------------------------------ markdown
def _fmt(v, spec, scale=1.0, none="—"):
    if v is None:
        return none
    return format(v * scale, spec)


def _x(v) -> str:
    return "—" if v is None else f"{v:.2f}×"


def markdown(data: dict) -> str:
    m = data["meta"]
    lines = [
        f"GPU: {m.get('gpu') or 'cpu'} (cc {m.get('compute_capability')}); torch {m.get('torch')}, triton "
        f"{m.get('triton')}, diffusers {m.get('diffusers')}, torchao {m.get('torchao')}, cache-dit "
        f"{m.get('cache_dit')}; kernel paths {m.get('kernel_paths')}; {m.get('date')}.",
        "",
        "Runs: " + "; ".join(f"run {i} ({r.get('file', 'this run')}): `{r['command']}` ({r.get('date')})"
                             for i, r in enumerate(data.get("runs", [{"command": m.get("command")}]), start=1))
        + ". Ratios are against rows of the same run (column run). Best peer: the fastest bf16, torchao or cache "
          "contender of the same run whose quality (on the reference) is at least the row's.",
        "",
    ]
    for w in data["workloads"]:
        rows = [r for r in data["results"] if r["workload"] == w["name"]]
        lines.append(f"### {w['name']}")
        desc = []
        if w.get("kind") == "pipeline":
            desc.append(f"full pipeline, {w.get('steps')} steps, CFG; latency = median whole-pipeline call")
        else:
            desc.append(f"transformer only, random weights, {w.get('cfg', '')}; per-video = mean of "
                        f"{w.get('steps_timed')} timed consecutive steps x {w.get('steps')} (skip-map replays: all "
                        f"{w.get('steps')} steps timed)")
        if w.get("video_tokens_per_row"):
            desc.append(f"{w['video_tokens_per_row']} video tokens per row, latent {w.get('latent_shape')}")
        if w.get("error"):
            desc.append(f"**not run: {w['error']}**")
        lines.append("; ".join(desc) + ".")
        for n in w.get("notes", []):
            lines.append(f"- {n}")
        lines += [
            "",
            "| contender | kind | s/video | ms/step | vs bf16 compiled | vs best peer (which) | peak mem GiB | "
            "peak mem ÷ bf16 | weights MiB | weight ÷ | PSNR dB | SSIM | NVFP4 share | skip share | compiled | "
            "warm-up s | run |",
            "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
        ]
        for r in rows:
            kind = r.get("kind") or _kind(r)
            if r.get("error"):
                lines.append(f"| {r['contender']} | {kind} | — | — | — | — | — | — | — | — | — | — | — | — | "
                             f"{r['error'][:200].replace('|', '/')} | — | {r.get('run', '')} |")
                continue
            best = "" if not r.get("best_peer") else f" ({r['best_peer']})"
            lines.append(
                f"| {r['contender']} | {kind} | {_fmt(r['latency_s'], '.3f')} | "
                f"{_fmt(r['latency_step_s'], '.2f', 1e3)} | {_x(r['speedup_vs_bf16_compiled'])} | "
                f"{_x(r.get('speedup_vs_best_peer'))}{best} | {_fmt(r['peak_memory_bytes'], '.2f', 2**-30)} | "
                f"{_x(r.get('peak_memory_vs_bf16'))} | {_fmt(r['weight_bytes'], '.1f', 2**-20)} | "
                f"{_x(r.get('weight_reduction_vs_bf16'))} | {_fmt(r['psnr_db'], '.1f')} | {_fmt(r['ssim'], '.3f')} | "
                f"{_fmt(r['nvfp4_share'], '.2f')} | {_fmt(r['skip_share'], '.2f')} | "
                f"{r.get('compile_mode') or ('blocks' if r.get('compiled') else 'eager')} | "
                f"{_fmt(r.get('warmup_s'), '.1f')} | {r.get('run', '')} |")
        lines.append("")
    return "\n".join(lines)


def figure(data: dict, path: Path) -> None:
    """Speedup against compiled bf16 (top) and transformer weight reduction against bf16 (bottom), per workload;
    bars of the pipeline workload carry their PSNR."""
    from plotly.subplots import make_subplots

    wls = [w["name"] for w in data["workloads"] if not w.get("error")]
    cols = max(1, len(wls))
    fig = make_subplots(rows=2, cols=cols, subplot_titles=wls + [""] * cols, vertical_spacing=0.22)
    colour = {"ours": "#2a9d8f", "baseline": "#8d99ae", "peer": "#e76f51"}
    for j, w in enumerate(wls, start=1):
        rows = [r for r in data["results"] if r["workload"] == w and r.get("latency_s")]
        sp = [r for r in rows if r.get("speedup_vs_bf16_compiled")]
        fig.add_bar(x=[r["contender"] for r in sp], y=[r["speedup_vs_bf16_compiled"] for r in sp],
                    text=[f"{r['speedup_vs_bf16_compiled']:.2f}×" + (f"<br>{r['psnr_db']:.1f} dB"
                                                                     if r.get("psnr_db") is not None else "")
                          for r in sp],
                    marker_color=[colour[_kind(r)] for r in sp], showlegend=False, row=1, col=j)
        wr = [r for r in rows if r.get("weight_reduction_vs_bf16")]
        fig.add_bar(x=[r["contender"] for r in wr], y=[r["weight_reduction_vs_bf16"] for r in wr],
                    text=[f"{r['weight_reduction_vs_bf16']:.2f}×" for r in wr],
                    marker_color=[colour[_kind(r)] for r in wr], showlegend=False, row=2, col=j)
    fig.update_yaxes(title_text="speedup vs bf16 compiled (×)", row=1, col=1)
    fig.update_yaxes(title_text="transformer weights ÷ (vs bf16)", row=2, col=1)
    m = data["meta"]
    fig.update_layout(title=f"sixbit-tune end-to-end on {m.get('gpu') or 'cpu'} — torch {m.get('torch')}, triton "
                            f"{m.get('triton')}, {m.get('date')}", height=900, width=max(800, 560 * cols))
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)


def render(paths: list[str], prefix: str, summary: str | None = None) -> dict:
    """Merge result files (one GPU) and write ``<prefix>.json``, ``<prefix>.md`` and ``<prefix>.html``."""
    data = merge(paths)
    prefix_p = Path(prefix)
    prefix_p.parent.mkdir(parents=True, exist_ok=True)
    prefix_p.with_suffix(".json").write_text(dumps(data))
    md = markdown(data)
    if summary:
        md = f"{summary.strip()}\n\n{md}"
    prefix_p.with_suffix(".md").write_text(f"# End-to-end benchmark\n\n{md}")
    try:
        figure(data, prefix_p.with_suffix(".html"))
    except ImportError as e:
        print(f"no figure: {e}", file=sys.stderr)
    return data
