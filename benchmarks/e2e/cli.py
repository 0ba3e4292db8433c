"""The benchmark's options and entry point (``python -m benchmarks.e2e``; ``sixbit-tune bench`` passes its options
through)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROG = "python -m benchmarks.e2e"
FBC_THRESHOLDS = (0.02, 0.05, 0.1, 0.2)
DBCACHE_THRESHOLDS = (0.05, 0.1, 0.2)
TAYLORSEER_THRESHOLDS = (0.1, 0.2)
SMOKE = {"steps": 2, "fbc_thresholds": [0.1], "dbcache_thresholds": [0.5], "taylorseer_thresholds": [0.5]}


def _floats(text: str | None, default) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()] if text else list(default)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--smoke", action="store_true", help="CPU code-path check on tiny:wan (pipeline) and "
                   "tiny:cogvideox / tiny:wan (transformer), 2 steps")
    p.add_argument("--out", default=None, help="output folder (default $OUT or artifacts/e2e); with --render: the "
                   "path prefix of the .json/.md/.html")
    p.add_argument("--workloads", default=None, help="comma-separated specs/names to run (default: all)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per video (default 50; --smoke 2)")
    p.add_argument("--steps-timed", type=int, default=None, help="transformer workloads: consecutive steps timed "
                   "(default: --steps)")
    p.add_argument("--prompts", type=int, default=2, help="reference workload: prompts (timed + quality)")
    p.add_argument("--budget-s", type=float, default=500.0, help="wall-clock budget of the whole run")
    p.add_argument("--fbc-thresholds", default=None, help="FirstBlockCache thresholds (comma-separated; default "
                   + ",".join(map(str, FBC_THRESHOLDS)) + ")")
    p.add_argument("--dbcache-thresholds", default=None, help="cache-dit DBCache residual diff thresholds (default "
                   + ",".join(map(str, DBCACHE_THRESHOLDS)) + "; 'none' for none)")
    p.add_argument("--taylorseer-thresholds", default=None, help="cache-dit DBCache + TaylorSeer thresholds "
                   "(default " + ",".join(map(str, TAYLORSEER_THRESHOLDS)) + "; 'none' for none)")
    p.add_argument("--policy", default=None, help="policy JSON(s) for the pipeline workload, comma-separated "
                   "(default: newest fitting one in policies/)")
    p.add_argument("--policy-name", default="ours-chosen", help="contender name(s) of --policy, comma-separated, "
                   "one per policy")
    p.add_argument("--replay-from", default=None, help="results JSON whose reference skip maps the transformer "
                   "workloads replay (when the reference workload is not in this run)")
    p.add_argument("--no-compile", action="store_true", help="measure everything eager")
    p.add_argument("--no-compile-stats", action="store_true", help="keep the runtime's per-block statistics eager "
                   "(default: fused with torch.compile wherever the blocks are compiled)")
    p.add_argument("--repeat-baseline", action="store_true", help="measure the compiled bf16 baseline again at the "
                   "end of each workload (a drift check; ratios stay against the first)")
    p.add_argument("--eager-variants", action="store_true", help="also measure our policies with blocks not "
                   "compiled")
    p.add_argument("--contenders", default=None, help="comma-separated name prefixes to run, in that order "
                   "(the compiled bf16 baseline always runs, first; the bf16 eager run too on a pipeline workload: it makes the quality "
                   "references)")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="model dtype (default: bfloat16 on "
                   "CUDA, float32 on the CPU)")
    p.add_argument("--shape-size", default=None, help="frames,height,width of the shape: workloads (default: the "
                   "published sizes; smaller ones are for checking the code path)")
    p.add_argument("--render", nargs="+", default=None, metavar="JSON", help="merge result files of one GPU and "
                   "write <out>.json/.md/.html instead of running")
    p.add_argument("--summary", default=None, help="with --render: markdown file put above the tables")


def build_parser() -> argparse.ArgumentParser:
    from . import __doc__ as doc

    p = argparse.ArgumentParser(prog=PROG, description=(doc or "").split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(p)
    return p


def command_line(args, raw: dict) -> str:
    """The benchmark command equivalent to the options as given (``raw``: before defaults were filled in)."""
    defaults = vars(build_parser().parse_args([]))
    parts = [PROG]
    for key, value in raw.items():
        if key.startswith("_") or key not in defaults or value == defaults[key]:
            continue
        if key == "device" and args.smoke and value == "cpu":
            continue
        if key == "out" and value == os.environ.get("OUT"):
            value = "$OUT"
        flag = "--" + key.replace("_", "-")
        parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts)


def prepare(args) -> str:
    """Fill in defaults and check the options before anything runs; returns the command line."""
    from .policies import policy_args

    raw = dict(vars(args))
    smoke = SMOKE if args.smoke else {}
    if args.steps is None:
        args.steps = smoke.get("steps", 50)
    for key, default in (("fbc_thresholds", FBC_THRESHOLDS), ("dbcache_thresholds", DBCACHE_THRESHOLDS),
                         ("taylorseer_thresholds", TAYLORSEER_THRESHOLDS)):
        text = getattr(args, key)
        setattr(args, key, [] if text == "none" else _floats(text, smoke.get(key, default)))
    args.out = args.out or os.environ.get("OUT") or str(ROOT / "artifacts" / "e2e")
    if isinstance(args.contenders, str):
        args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if args.smoke and args.device is None:
        args.device = "cpu"
    if args.policy:
        policy_args(args)  # bad --policy / --policy-name fail here, before anything runs
    return command_line(args, raw)


def run_args(args) -> int:
    from .rendering import RESULTS_FILE, markdown, merge, render

    if args.render:
        summary = Path(args.summary).read_text() if args.summary else None
        render(args.render, args.out or "benchmarks/results/e2e", summary=summary)
        return 0
    command = prepare(args)
    from .measurement import configure_dynamo, log
    from .run import Bench
    from .workloads import workloads_for

    bench = Bench(args, command)
    configure_dynamo()
    wls = workloads_for(args)
    log(f"device {bench.device} ({bench.meta.get('gpu')}); workloads {[w.name for w in wls]}; out {bench.out}")
    bench.run(wls)
    print(markdown(merge([str(bench.out / RESULTS_FILE)])), flush=True)
    return 0


def main(argv=None) -> int:
    return run_args(build_parser().parse_args(argv))
