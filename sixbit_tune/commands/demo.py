"""``sixbit-tune demo``: the whole workflow offline on the shipped reference model, in a few minutes on a CPU.

profile (a few prompts) → fit → a short search → export a policy → generate with it → a summary against the
unquantized model, timed side by side on this machine. CPU by default, the GPU when there is one.

What is searched depends on the device. On a GPU: the whole space (NVFP4/INT8 mixed precision and the Temporal Delta
Cache). On a CPU the quantized formats run as plain-PyTorch emulation, slower than the float32 layers they replace,
so the demo searches the cache alone there (its tolerance and window; the weights stay as they are) with enough
steps for the cache to skip blocks.

Everything the demo writes goes into its ``--out-dir``: the store (``store/``, with the Optuna journal) and the
exported policy (``policy.json``).
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
    layer_every: int


# Sized for a 2-core CPU: a float32 reference-model step takes about 0.1 s there; the cache needs a few dozen steps
# to skip blocks between its warm-up and cool-down windows. The profile records the NVFP4 errors the fit needs on
# every ``layer_every``-th step only (the block statistics on every step): on a CPU those errors come from the
# emulated format and cost far more than the step itself.
FULL = DemoSize(prompts=2, steps=30, trials=12, repeats=1, warmup_runs=0, layer_every=6)
QUICK = DemoSize(prompts=2, steps=12, trials=4, repeats=1, warmup_runs=0, layer_every=4)
#: Timed rounds of the closing side-by-side comparison (unquantized, policy, unquantized, policy, ...).
COMPARE_ROUNDS = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer steps and trials (what CI runs)")
    parser.add_argument(
        "--out-dir", default=None,
        help="folder for everything the demo writes: its store and policy.json (default sixbit-demo/<UTC time>)",
    )
    parser.add_argument("--model", default="reference", help="model spec (default: the shipped reference model)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument(
        "--policy-out", default=None, help="where to export the policy (default <out-dir>/policy.json)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help=f"denoising steps (default {FULL.steps}, --quick {QUICK.steps})"
    )
    parser.add_argument(
        "--trials", type=int, default=None, help=f"search trials (default {FULL.trials}, --quick {QUICK.trials})"
    )
    parser.add_argument("--quality-floor", type=float, default=None, help="PSNR floor in dB (default: the search's)")
    parser.add_argument("--seed", type=int, default=0, help="sampler and generation seed")


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in s).strip("-")


def run(args: argparse.Namespace) -> int:
    import statistics

    import torch

    from sixbit_tune.commands.export import best_quality_trial, best_trial, speed_phrase
    from sixbit_tune.commands.fit import summarize as fit_summary
    from sixbit_tune.models.specs import load_pipeline
    from sixbit_tune.predictor import fit_store, write_fit
    from sixbit_tune.profiling.config import PROFILE_ATTENTION_FORMATS
    from sixbit_tune.profiling.runner import ProfileConfig, profile
    from sixbit_tune.runtime import apply_policy, load_policy
    from sixbit_tune.search.config import SearchConfig
    from sixbit_tune.search.export import export_trial
    from sixbit_tune.search.quality import compare, generate
    from sixbit_tune.search.runner import SearchContext, pipeline_dtype
    from sixbit_tune.search.study import run_search, summarize
    from sixbit_tune.store import Store

    t_start = time.perf_counter()
    size = QUICK if args.quick else FULL
    trials = args.trials or size.trials
    steps = args.steps or size.steps
    for name, v in (("trials", trials), ("steps", steps)):
        if v < 1:
            raise ValueError(f"--{name} must be a positive integer, got {v}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cache_only = device == "cpu"
    model = args.model
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S")
    out_dir = Path(args.out_dir) if args.out_dir else Path("sixbit-demo") / stamp
    store_dir = out_dir / "store"
    policy_out = Path(args.policy_out) if args.policy_out else out_dir / "policy.json"
    prompts = list(DEMO_PROMPTS[: size.prompts])
    pipe = load_pipeline(model, device=device, dtype=pipeline_dtype(device))
    Store.create(store_dir).close()  # fails clearly if a store is already there

    def stage(msg: str) -> None:
        print(f"\n== [{time.perf_counter() - t_start:5.1f}s] {msg}", flush=True)

    stage(f"profile {model} on {device}: {len(prompts)} prompts x {steps} steps -> {store_dir}")
    run_id = profile(
        ProfileConfig(model=model, prompts=prompts, store=str(store_dir), steps=steps, device=device,
                      seed=args.seed, layer_every=size.layer_every, formats=("nvfp4",), progress=True,
                      # a cache-only search uses no attention predictors: the CPU demo does not profile attention
                      attention_formats=() if cache_only else PROFILE_ATTENTION_FORMATS)
    )
    print(f"profile run {run_id}", flush=True)

    stage("fit the per-layer NVFP4 error predictors")
    with Store.open(store_dir) as store:
        result = fit_store(store, [run_id])
        fit_id = write_fit(store.writer(), result)
    print(fit_summary(result, fit_id), flush=True)

    extra = {} if args.quality_floor is None else {"quality_floor_db": args.quality_floor}
    config = SearchConfig(
        store=str(store_dir), model=model, trials=trials, seed=args.seed, prompts=tuple(prompts), steps=steps,
        repeats=size.repeats, warmup_runs=size.warmup_runs, device=device, fit_id=fit_id,
        study=f"demo-{_safe(model)}-{device}", progress=True, dmpq=not cache_only, **extra,
    )
    if cache_only:
        stage(f"search: {trials} trials of the Temporal Delta Cache alone (tolerance and window; TPE)")
        print("on a CPU, NVFP4 and INT8 run as plain-PyTorch emulation, slower than the float32 layers they would "
              "replace: this demo searches only the cache (on a GPU it also searches the mixed precision; "
              "`sixbit-tune search --cache-only` does the same)", flush=True)
    else:
        stage(f"search: {trials} trials (3 reference corners + TPE)")
    ctx = SearchContext(config, pipe=pipe)
    study = run_search(config, pipe=ctx.pipe, log=print)
    print(summarize(study), flush=True)

    stage(f"export the fastest trial above the quality floor -> {policy_out}")
    chosen = best_trial(study)
    if chosen is None:
        chosen = best_quality_trial(study)
        if chosen is None:
            print("no trial completed: nothing to export")
            return 1
        print(f"no trial met the quality floor ({config.quality_floor_db} dB PSNR): exporting the best-quality trial")
    path, _policy, _ = export_trial(store_dir, study.study_name, chosen.number, policy_out)
    print(f"trial {chosen.number} ({chosen.user_attrs.get('reference') or 'searched'}) -> {path}")

    stage(f"time the exported policy (loaded back from JSON) against the unquantized model, {COMPARE_ROUNDS} rounds "
          "side by side")
    prompt, seed = ctx.cases[0]
    ref = ctx.reference(prompt, seed)
    policy = load_policy(path)
    generate(ctx.pipe, prompt, seed, ctx.generation)  # warm-up, unquantized
    handle = apply_policy(ctx.pipe, policy)
    try:
        gen = generate(ctx.pipe, prompt, seed, ctx.generation)  # warm-up of the policy's path; its video is compared
    finally:
        handle.remove()
    base_ms: list[float] = []
    policy_ms: list[float] = []
    stats = None
    for _ in range(COMPARE_ROUNDS):
        base_ms.append(_timed(generate, ctx.pipe, prompt, seed, ctx.generation, device))
        handle = apply_policy(ctx.pipe, policy)
        try:
            policy_ms.append(_timed(generate, ctx.pipe, prompt, seed, ctx.generation, device))
            stats = handle.stats()
        finally:
            handle.remove()
    q = compare(gen, ref)
    base, mine = statistics.median(base_ms), statistics.median(policy_ms)
    speedup = base / mine
    f = chosen.user_attrs["figures"]
    baseline = study.user_attrs.get("baseline") or {}
    print(f"prompt: {prompt!r} (seed {seed}), {ctx.generation.steps} steps on {device}")
    rows = [
        ("latency (this machine)", f"{mine:.1f} ms", f"{base:.1f} ms unquantized: {speed_phrase(speedup)} it"),
        ("latency (search)", f"{f['latency_ms']:.1f} ms",
         f"{baseline.get('latency_ms', float('nan')):.1f} ms unquantized: {speed_phrase(f.get('speedup'))} it"),
        ("memory", f"{_mib(f['memory_bytes'])}",
         f"{_mib(baseline.get('memory_bytes'))} unquantized ({study.user_attrs.get('memory_metric')})"),
        ("in-block weights", f"{_mib(f['weight_bytes'])}", f"{_mib(baseline.get('weight_bytes'))} unquantized"),
        ("cache", f"{_mib(f.get('cache_bytes'))}", "cached block outputs"),
        ("PSNR vs unquantized", f"{q['psnr_db']:.2f} dB",
         f"search mean {f['psnr_db']:.2f} dB, floor {config.quality_floor_db} dB"),
        ("SSIM vs unquantized", _num(q["ssim"]), ""),
        ("NVFP4 layer-calls", _pct(stats.nvfp4_share if stats else None),
         "weights kept as they are (CPU: the cache alone)" if cache_only else ""),
        ("skipped blocks", _pct(stats.skip_share if stats else None), ""),
    ]
    print("\nsummary (policy vs the unquantized model):")
    for name, a, b in rows:
        print(f"  {name:<24} {a:>14}   {b}")
    verdict = (f"on this {device} the policy is {speed_phrase(speedup)} the unquantized model "
               f"(median of {COMPARE_ROUNDS} side-by-side runs) at {q['psnr_db']:.1f} dB PSNR")
    if speedup < 1:
        verdict += ("; it did not pay in this run (other load on the machine moves CPU timings: the search table "
                    "above shows each trial's own measurement)")
    print(f"\n{verdict}")
    print(f"\npolicy: {path}")
    print(f"open the dashboard: sixbit-tune dashboard --store {store_dir} --policies-dir {path.parent}")
    print(f"generate with it: sixbit-tune generate --model {model} --policy {path} --prompt {prompt!r} "
          f"--steps {ctx.generation.steps} --out clip.gif")
    print(f"demo finished in {time.perf_counter() - t_start:.1f} s")
    return 0


def _timed(fn, pipe, prompt, seed, settings, device) -> float:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(pipe, prompt, seed, settings)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def _mib(v) -> str:
    return "-" if v is None else (f"{v / 2**20:.2f} MiB" if v >= 2**20 else f"{v / 2**10:.1f} KiB")


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _num(v) -> str:
    return "-" if v is None else f"{v:.4f}"
