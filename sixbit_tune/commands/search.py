"""``sixbit-tune search``: the Optuna multi-objective policy search (see :mod:`sixbit_tune.search.study`)."""

from __future__ import annotations

import argparse
import math

from sixbit_tune.policy import NVFP4_WEIGHT_ENCODERS
from sixbit_tune.search.config import MENU_SETTINGS, WEIGHT_SETTINGS, SearchConfig

_D = SearchConfig(store="", model="")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, help="store folder with a profile and a fit")
    parser.add_argument("--model", required=True, help="model spec (as profiled): reference, tiny:<family>, ...")
    parser.add_argument("--trials", type=int, default=_D.trials, help=f"total trials of the study (default {_D.trials})")
    parser.add_argument(
        "--storage",
        default=None,
        help="Optuna storage: an RDB URL (postgresql://user@host/db) for several hosts, or a journal file path "
        "(default <store>/optuna.journal)",
    )
    parser.add_argument("--study", default=None, help="study name (default search-<model>-<device>)")
    parser.add_argument(
        "--workers", type=int, default=_D.workers, help="worker processes on this host (one per GPU when on GPUs)"
    )
    parser.add_argument("--seed", type=int, default=_D.seed, help=f"TPE sampler seed (default {_D.seed})")
    parser.add_argument(
        "--quality-floor",
        type=float,
        default=_D.quality_floor_db,
        help=f"constraint: mean PSNR (dB) against the unquantized output (default {_D.quality_floor_db})",
    )
    parser.add_argument(
        "--repeats", type=int, default=_D.repeats, help=f"timed generations per prompt (default {_D.repeats})"
    )
    parser.add_argument(
        "--warmup-runs", type=int, default=_D.warmup_runs, help=f"untimed generations per trial (default {_D.warmup_runs})"
    )
    parser.add_argument(
        "--prompt", dest="prompts", action="append", default=None, help="prompt (repeatable; default: the profile's)"
    )
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the profile's)")
    parser.add_argument(
        "--memory-budget",
        type=int,
        default=None,
        metavar="BYTES",
        help="fail trials whose measured memory exceeds this (out-of-memory)",
    )
    parser.add_argument(
        "--max-memory",
        type=_gib_arg,
        default=None,
        metavar="GiB",
        help="constraint: the measured peak memory (GiB) a policy may use; trials above it are recorded as "
        "infeasible and the fastest trial that fits (at the quality floor) is the one to export",
    )
    parser.add_argument(
        "--cache-only",
        action="store_true",
        help="keep every linear unquantized and search only the Temporal Delta Cache's knobs (no reference corners)",
    )
    parser.add_argument(
        "--weights",
        choices=WEIGHT_SETTINGS,
        default=_D.weights,
        help="how policies store the in-block linears' weights: 'mixed' (layers with a trusted predictor NVFP4 and "
        "dynamic, the others in the fit's untrusted format) or 'nvfp4' (every in-block linear NVFP4; layers without "
        "a trusted predictor run the robust route, W4A8) (default %(default)s)",
    )
    parser.add_argument(
        "--nvfp4-encoder",
        choices=NVFP4_WEIGHT_ENCODERS,
        default=_D.nvfp4_encoder,
        help="NVFP4 weight encoder of every policy; gptq needs the Hessians of a profile run with --nvfp4-hessians "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--menu",
        choices=MENU_SETTINGS,
        default=_D.menu,
        help="measure this GPU's route menu at the model's linear shapes and run every 8-bit layer on the faster of "
        "INT8 and FP8 there ('auto': on a GPU only; the policies record the menu) (default %(default)s)",
    )
    parser.add_argument("--fit", dest="fit_id", default=None, help="fit id (default: the store's latest fit)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _gib_arg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GiB, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive, finite number of GiB, got {text!r}")
    return v


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    return SearchConfig(
        store=args.store,
        model=args.model,
        trials=args.trials,
        study=args.study,
        storage=args.storage,
        workers=args.workers,
        seed=args.seed,
        prompts=tuple(args.prompts) if args.prompts else None,
        steps=args.steps,
        quality_floor_db=args.quality_floor,
        repeats=args.repeats,
        warmup_runs=args.warmup_runs,
        memory_budget_bytes=args.memory_budget,
        max_memory_gib=args.max_memory,
        dmpq=not args.cache_only,
        weights=args.weights,
        nvfp4_encoder=args.nvfp4_encoder,
        menu=args.menu,
        fit_id=args.fit_id,
        device=args.device,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    from sixbit_tune.commands.export import best_trial
    from sixbit_tune.search.study import check_memory_fit, run_search, summarize

    config = config_from_args(args)
    study = run_search(config)
    print(summarize(study))
    check_memory_fit(study)
    chosen = best_trial(study)
    if chosen is not None:
        f = chosen.user_attrs["figures"]
        within = "" if config.max_memory_gib is None else f" and {config.max_memory_gib:g} GiB of peak memory"
        print(f"fastest trial at the quality floor{within}: trial {chosen.number}, {f['latency_ms']:.1f} ms, "
              f"peak memory {f['memory_bytes'] / 2**30:.4g} GiB ({study.user_attrs.get('memory_metric')}), "
              f"{f['psnr_db']:.2f} dB PSNR")
    storage = f" --storage {config.storage}" if config.storage else ""
    print(
        f"next: look at the trials with `sixbit-tune dashboard --store {config.store}`; export the fastest trial above "
        f"the quality floor with `sixbit-tune export --store {config.store} --study {config.study_name}{storage} "
        "--out policies/NAME.json` (or pick one with --trial N)"
    )
    if config.dmpq and config.nvfp4_encoder == "gptq":
        print(
            "the policies of this study encode NVFP4 weights with gptq: the export writes the calibration Hessians "
            "beside the policy (policies/NAME.nvfp4-hessians.pt); apply it with "
            "`apply_policy(pipe, 'policies/NAME.json', nvfp4_hessians=torch.load('policies/NAME.nvfp4-hessians.pt'))`"
        )
    return 0
