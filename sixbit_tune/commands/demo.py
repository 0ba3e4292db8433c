"""``sixbit-tune demo``: the whole workflow offline on the shipped reference model, in a few minutes on a CPU.

profile (a few prompts) → fit → a short search → export a policy → generate with it → a summary against the
unquantized model. CPU by default, the GPU when there is one.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import time
from dataclasses import dataclass
from pathlib import Path

DEMO_PROMPTS = (
    "a red square moving left on a striped background",
    "a blue circle moving right on a checkered background",
    "a yellow triangle moving down on a plain background",
    "a green square moving up on a striped background",
)


@dataclass(frozen=True)
class DemoSize:
    """How much work the demo does."""

    prompts: int
    steps: int
    trials: int
    repeats: int
    warmup_runs: int


# Sized for a 2-core CPU: a quantized reference-model generation of 8 steps takes a few seconds there (the CPU runs
# the plain-PyTorch reference numerics of NVFP4/INT8).
FULL = DemoSize(prompts=2, steps=8, trials=10, repeats=1, warmup_runs=1)
QUICK = DemoSize(prompts=2, steps=6, trials=6, repeats=1, warmup_runs=0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer prompts, steps and trials (what CI runs)")
    parser.add_argument(
        "--out-dir", default=None, help="folder for the demo's store (default sixbit-demo/<UTC time>)"
    )
    parser.add_argument("--model", default="reference", help="model spec (default: the shipped reference model)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument(
        "--policy-out", default=None, help="where to export the policy (default policies/demo-<model>-<device>.json)"
    )
    parser.add_argument(
        "--trials", type=int, default=None, help=f"search trials (default {FULL.trials}, --quick {QUICK.trials})"
    )
    parser.add_argument("--quality-floor", type=float, default=None, help="PSNR floor in dB (default: the search's)")
    parser.add_argument("--seed", type=int, default=0, help="sampler and generation seed")


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in s).strip("-")


def run(args: argparse.Namespace) -> int:
    import torch

    from sixbit_tune.commands.fit import summarize as fit_summary
    from sixbit_tune.models.specs import load_pipeline
    from sixbit_tune.predictor import fit_store, write_fit
    from sixbit_tune.profiling.runner import ProfileConfig, profile
    from sixbit_tune.runtime import apply_policy, load_policy
    from sixbit_tune.search.config import SearchConfig
    from sixbit_tune.search.export import export_trial
    from sixbit_tune.search.quality import compare, generate
    from sixbit_tune.search.runner import SearchContext, pipeline_dtype
    from sixbit_tune.search.study import feasible, run_search, summarize
    from sixbit_tune.store import Store

    t_start = time.perf_counter()
    size = QUICK if args.quick else FULL
    trials = args.trials or size.trials
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = args.model
    pipe = load_pipeline(model, device=device, dtype=pipeline_dtype(device))
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S")
    out_dir = Path(args.out_dir) if args.out_dir else Path("sixbit-demo") / stamp
    store_dir = out_dir / "store"
    policy_out = Path(args.policy_out or f"policies/demo-{_safe(model)}-{device}.json")
    prompts = list(DEMO_PROMPTS[: size.prompts])
    Store.create(store_dir).close()  # fails clearly if a store is already there

    def stage(msg: str) -> None:
        print(f"\n== [{time.perf_counter() - t_start:5.1f}s] {msg}", flush=True)

    stage(f"profile {model} on {device}: {len(prompts)} prompts x {size.steps} steps -> {store_dir}")
    run_id = profile(
        ProfileConfig(model=model, prompts=prompts, store=str(store_dir), steps=size.steps, device=device,
                      seed=args.seed, progress=False)
    )
    print(f"profile run {run_id}")

    stage("fit the per-layer NVFP4 error predictors")
    with Store.open(store_dir) as store:
        result = fit_store(store, [run_id])
        fit_id = write_fit(store.writer(), result)
    print(fit_summary(result, fit_id))

    stage(f"search: {trials} trials (3 reference corners + TPE)")
    extra = {} if args.quality_floor is None else {"quality_floor_db": args.quality_floor}
    config = SearchConfig(
        store=str(store_dir), model=model, trials=trials, seed=args.seed, prompts=tuple(prompts),
        repeats=size.repeats, warmup_runs=size.warmup_runs, device=device, fit_id=fit_id, study=f"demo-{_safe(model)}-{device}",
        progress=True, **extra,
    )
    ctx = SearchContext(config, pipe=pipe)
    study = run_search(config, pipe=ctx.pipe, log=print)
    print(summarize(study))

    stage(f"export the fastest feasible trial -> {policy_out}")
    done = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("figures")]
    ok = [t for t in done if feasible(t)]
    if not done:
        print("no trial completed: nothing to export")
        return 1
    if ok:
        chosen = min(ok, key=lambda t: (t.values[0], t.values[1]))
    else:
        chosen = max(done, key=lambda t: t.values[2])
        print(f"no trial met the quality floor ({config.quality_floor_db} dB): exporting the best-PSNR trial")
    path, _policy, _ = export_trial(store_dir, study.study_name, chosen.number, policy_out)
    print(f"trial {chosen.number} ({chosen.user_attrs.get('reference') or 'searched'}) -> {path}")

    stage("generate with the exported policy (loaded back from JSON) and compare with the unquantized model")
    prompt, seed = ctx.cases[0]
    ref = ctx.reference(prompt, seed)
    baseline = study.user_attrs.get("baseline") or {}
    handle = apply_policy(ctx.pipe, load_policy(path))
    try:
        generate(ctx.pipe, prompt, seed, ctx.generation)  # warm-up
        t0 = time.perf_counter()
        gen = generate(ctx.pipe, prompt, seed, ctx.generation)
        ms = (time.perf_counter() - t0) * 1e3
        stats = handle.stats()
    finally:
        handle.remove()
    q = compare(gen, ref)
    f = chosen.user_attrs["figures"]
    print(f"prompt: {prompt!r} (seed {seed}), {ctx.generation.steps} steps")
    rows = [
        ("latency (this run)", f"{ms:.1f} ms", f"{baseline.get('latency_ms', float('nan')):.1f} ms (unquantized)"),
        ("latency (search median)", f"{f['latency_ms']:.1f} ms", f"speedup {_x(f.get('speedup'))}"),
        ("memory", f"{_mib(f['memory_bytes'])}", f"{_mib(baseline.get('memory_bytes'))} (unquantized; {study.user_attrs.get('memory_metric')})"),
        ("in-block weights", f"{_mib(f['weight_bytes'])}", f"{_mib(baseline.get('weight_bytes'))} (unquantized)"),
        ("PSNR vs unquantized", f"{q['psnr_db']:.2f} dB", f"search mean {f['psnr_db']:.2f} dB, floor {config.quality_floor_db} dB"),
        ("SSIM vs unquantized", _num(q["ssim"]), ""),
        ("NVFP4 layer-calls", _pct(stats.nvfp4_share if stats else None), ""),
        ("skipped blocks", _pct(stats.skip_share if stats else None), ""),
    ]
    print("\nsummary (policy vs the unquantized model):")
    for name, a, b in rows:
        print(f"  {name:<24} {a:>14}   {b}")
    print(f"\npolicy: {path}")
    print(f"open the dashboard: sixbit-tune dashboard --store {store_dir} --policies-dir {path.parent}")
    print(f"demo finished in {time.perf_counter() - t_start:.1f} s")
    return 0


def _mib(v) -> str:
    return "-" if v is None else (f"{v / 2**20:.2f} MiB" if v >= 2**20 else f"{v / 2**10:.1f} KiB")


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _num(v) -> str:
    return "-" if v is None else f"{v:.4f}"
