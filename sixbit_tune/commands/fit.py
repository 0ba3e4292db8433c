"""``sixbit-tune fit``: the per-layer DMPQ predictor (a line per layer for every route the profile recorded), and
the per-block attention predictor, from a profile store (see :mod:`sixbit_tune.predictor`)."""

from __future__ import annotations

import argparse

import numpy as np

from sixbit_tune.predictor import FitSettings
from sixbit_tune.routes import V1_FORMATS

_D = FitSettings()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, help="the store folder written by `sixbit-tune profile`")
    parser.add_argument(
        "--run",
        dest="runs",
        action="append",
        default=None,
        metavar="RUN_ID",
        help="profile run to fit on (repeatable; default: every finished profile run of the latest run's model)",
    )
    parser.add_argument("--min-r2", type=float, default=_D.min_r2, help=f"trust threshold on R² (default {_D.min_r2})")
    parser.add_argument(
        "--max-rel-rmse",
        type=float,
        default=_D.max_rel_rmse,
        help="also trust a low-R² predictor whose residual RMSE is at most this fraction of the mean error "
        f"(default {_D.max_rel_rmse})",
    )
    parser.add_argument(
        "--min-n", type=int, default=_D.min_n, help=f"trust threshold on the number of pairs (default {_D.min_n})"
    )
    parser.add_argument(
        "--pooling",
        choices=("auto", "pooled", "per_branch"),
        default=_D.pooling,
        help="guidance branches: decide from R² (auto), pool them, or fit each branch",
    )
    parser.add_argument(
        "--untrusted-mode",
        choices=V1_FORMATS,
        default=_D.untrusted_mode,
        help=f"static format of layers whose predictor is not trusted (default {_D.untrusted_mode})",
    )


def run(args: argparse.Namespace) -> int:
    from sixbit_tune.predictor import fit_store, write_fit
    from sixbit_tune.store import Store

    settings = FitSettings(
        min_r2=args.min_r2, min_n=args.min_n, max_rel_rmse=args.max_rel_rmse, pooling=args.pooling, untrusted_mode=args.untrusted_mode
    )
    with Store.open(args.store) as store:
        result = fit_store(store, args.runs, settings)
        fit_id = write_fit(store.writer(), result)
        runs = store.runs(run_ids=result.run_ids)
    print(summarize(result, fit_id))
    model = runs["model_spec"].iloc[-1] if len(runs) else "SPEC"
    print(f"next: sixbit-tune search --store {args.store} --model {model}")
    return 0


def summarize(result, fit_id: str) -> str:
    """The human-readable fit report (also printed by the demo)."""
    from sixbit_tune.predictor import r2_report

    ev = result.pooling_evidence
    lines = [
        f"fit {fit_id}: {len(result.layers)} layers from profile runs {', '.join(result.run_ids)}",
        r2_report(result.r2_values()),
        (
            f"guidance branches: median R² pooled {_f(ev.get('median_r2_pooled'))} vs per-branch "
            f"{_f(ev.get('median_r2_per_branch'))} (branches {ev.get('branches')}) -> {result.pooling}"
        ),
    ]
    if result.pooling == "per_branch":
        lines.append(
            "  note: per-branch fits explain the data better, but policy schema v1 holds one (alpha, beta) per "
            "layer: policies use the pooled fit (per-branch fits are kept in the fit's settings)"
        )
    untrusted = result.untrusted
    lines.append(
        f"trusted: {len(result.trusted)} layers; not trusted: {len(untrusted)} "
        f"(policies run these as static {result.settings.untrusted_mode.upper()})"
    )
    for f in list(untrusted.values())[:20]:
        lines.append(f"  {f.layer}: {f.reason}")
    if len(untrusted) > 20:
        lines.append(f"  ... and {len(untrusted) - 20} more")
    for fmt, fit in result.routes.items():
        r2 = fit.r2_values()
        lines.append(
            f"route {fmt}: {len(fit.layers)} layers, R² median {_f(float(np.median(r2)) if r2.size else None)}, "
            f"branches -> {fit.pooling}; trusted {len(fit.trusted)}, not trusted {len(fit.untrusted)}"
        )
    if not result.attention:
        lines.append("attention: the profile runs recorded no attention errors (no attention predictors)")
    for fmt, att in result.attention.items():
        r2 = att.r2_values()
        bad = att.untrusted
        lines.append(
            f"attention ({fmt}): {len(att.layers)} blocks, R² median {_f(float(np.median(r2)) if r2.size else None)}"
            f" (min {_f(float(r2.min()) if r2.size else None)}), branches -> {att.pooling}; trusted "
            f"{len(att.trusted)}, not trusted {len(bad)}"
            + (f": blocks {', '.join(sorted(bad, key=int))}" if bad else "")
        )
    return "\n".join(lines)


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"
