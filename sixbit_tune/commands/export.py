"""``sixbit-tune export``: write a trial's policy as JSON (see :mod:`sixbit_tune.search.export`)."""

from __future__ import annotations

import argparse
import sys

HELP = "Write a trial's policy as JSON (validated, with provenance and measured figures)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, help="the store folder of the search")
    parser.add_argument("--study", required=True, help="study name (printed by `sixbit-tune search`)")
    parser.add_argument("--trial", type=int, required=True, help="trial number")
    parser.add_argument("--out", required=True, help="output JSON path, e.g. policies/NAME.json")
    parser.add_argument("--storage", default=None, help="Optuna storage of the study (default <store>/optuna.journal)")
    parser.add_argument(
        "--require-feasible", action="store_true", help="refuse a trial below the study's quality floor"
    )


def run(args: argparse.Namespace) -> int:
    from sixbit_tune.search.export import export_trial

    try:
        path, policy, ok = export_trial(args.store, args.study, args.trial, args.out, args.storage,
                                        args.require_feasible)
    except (ValueError, FileNotFoundError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"sixbit-tune export: error: {e}", file=sys.stderr)
        return 2
    m = policy.measured
    print(
        f"wrote {path}: trial {args.trial} of {args.study}: latency {m.latency_ms:.1f} ms, PSNR {m.psnr_db:.2f} dB, "
        f"NVFP4 {_pct(m.nvfp4_share)}, skipped {_pct(m.skip_share)}"
    )
    if not ok:
        print("warning: this trial is below the study's quality floor")
    return 0


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"
