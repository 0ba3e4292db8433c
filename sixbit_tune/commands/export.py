"""``sixbit-tune export``: write a trial's policy as JSON (see :mod:`sixbit_tune.search.export`).

``--trial best`` (the default) picks the fastest trial that meets the study's quality floor (ties: less memory);
``--study`` may be left out when the store's Optuna storage holds one study.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, help="the store folder of the search")
    parser.add_argument("--study", default=None,
                        help="study name (printed by `sixbit-tune search`; default: the only study in the storage)")
    parser.add_argument("--trial", default="best", type=_trial_arg,
                        help="trial number, or 'best': the fastest trial above the quality floor (default %(default)s)")
    parser.add_argument("--out", required=True, help="output JSON path, e.g. policies/NAME.json")
    parser.add_argument("--storage", default=None, help="Optuna storage of the study (default <store>/optuna.journal)")
    parser.add_argument(
        "--require-feasible", action="store_true", help="refuse a trial below the study's quality floor"
    )


def _trial_arg(text: str) -> int | str:
    if text == "best":
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a trial number or 'best', got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"trial numbers start at 0, got {n}")
    return n


def best_trial(study):
    """The fastest completed trial that meets the study's quality floor (ties: less memory); None if there is none."""
    from sixbit_tune.search.study import feasible

    ok = [t for t in study.get_trials(deepcopy=False) if feasible(t) and t.user_attrs.get("figures")]
    return min(ok, key=lambda t: (t.values[0], t.values[1], t.number)) if ok else None


def best_quality_trial(study):
    """The completed trial with the highest mean PSNR; None if no trial completed."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE and t.user_attrs.get("figures")]
    return max(done, key=lambda t: (t.values[2], -t.number)) if done else None


def only_study(store: str, storage: str | None) -> str:
    """The name of the single study in the store's storage (``ValueError`` when there are none or several)."""
    from pathlib import Path

    import optuna

    from sixbit_tune.search.study import open_storage

    url = storage or str(Path(store).absolute() / "optuna.journal")
    if "://" not in url and not Path(url).exists():
        raise ValueError(f"no Optuna journal at {url}: run `sixbit-tune search --store {store}` first")
    names = [s.study_name for s in optuna.get_all_study_summaries(open_storage(url), include_best_trial=False)]
    if len(names) != 1:
        raise ValueError(
            f"{url} holds {len(names)} studies ({', '.join(names) or 'none'}): name one with --study"
        )
    return names[0]


def run(args: argparse.Namespace) -> int:
    from sixbit_tune.search.export import export_trial, load_study

    study_name = args.study or only_study(args.store, args.storage)
    number = args.trial
    if number == "best":
        study = load_study(args.store, study_name, args.storage)
        chosen = best_trial(study)
        if chosen is None:
            fallback = best_quality_trial(study)
            hint = "" if fallback is None else f"; the best quality is trial {fallback.number} " \
                f"({fallback.values[2]:.2f} dB): export it with --trial {fallback.number}"
            raise ValueError(
                f"no trial of {study_name!r} meets its quality floor ({study.user_attrs.get('quality_floor_db')} dB "
                f"PSNR){hint}"
            )
        number = chosen.number
    path, policy, ok = export_trial(args.store, study_name, number, args.out, args.storage, args.require_feasible)
    m = policy.measured
    print(
        f"wrote {path}: trial {number} of {study_name}: latency {m.latency_ms:.1f} ms"
        f" ({speed_phrase(m.speedup)} the unquantized model when searched), PSNR {m.psnr_db:.2f} dB, "
        f"NVFP4 {_pct(m.nvfp4_share)}, skipped {_pct(m.skip_share)}"
    )
    from sixbit_tune.search.export import hessians_path
    from sixbit_tune.search.policies import gptq_layers

    if gptq_layers(policy):
        h = hessians_path(path)
        print(f"wrote {h}: the calibration its gptq-encoded NVFP4 weights are encoded with; apply the policy with "
              f"apply_policy(pipe, policy, nvfp4_hessians=torch.load({str(h)!r}))")
    if not ok:
        print("warning: this trial is below the study's quality floor")
    return 0


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def speed_phrase(speedup: float | None) -> str:
    """``1.48x faster than`` / ``1.25x slower than`` / ``as fast as`` for a speedup (baseline / policy latency)."""
    if speedup is None or not speedup > 0:
        return "not compared with"
    if round(speedup, 2) == 1.0:
        return "as fast as"
    return f"{speedup:.2f}x faster than" if speedup > 1 else f"{1 / speedup:.2f}x slower than"
