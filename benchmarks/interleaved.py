"""Interleaved timing of the reference model's fastest contenders, for a host that drifts.

The reference model is host-bound on the H200 (a compiled step is ~10-20 ms of kernel launches and Python), so its
timings follow the machine's host load: in one end-to-end benchmark run (`python -m benchmarks.e2e`) the compiled bf16 baseline measured 11.9 ms/step
at the start and 15.2 ms/step at the end. Ratios between contenders measured minutes apart then mean little. This
script measures the contenders in rounds — every round runs each contender once (installed, one warm-up video, then
``--videos`` timed videos), in an order rotated per round — and reports per contender the median ms/step over all
timed videos and the median over rounds of the ratio to the baseline's median of the *same* round.

Quality: PSNR/SSIM of prompt 0 against the bf16 eager video (same definition as the end-to-end benchmark).

    python benchmarks/interleaved.py --out $OUT/interleaved.json --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICIES = {
    "ours-tuned": "benchmarks/results/e2e-policy-reference-int8-tdc.json",
    "ours-bf16-tdc": "benchmarks/results/e2e-policy-reference-bf16-tdc.json",
}


def log(msg: str) -> None:
    print(f"[interleaved {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--videos", type=int, default=2, help="timed videos per contender and round")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--no-compile", action="store_true", help="blocks not compiled (a CPU code-path check)")
    p.add_argument("--contenders", default="bf16-compiled,ours-bf16-tdc,ours-bf16-tdc (eager stats),ours-tuned,"
                   "fbc-0.05,fbc-0.1", help="comma-separated; bf16-compiled is the baseline and always runs")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.videos < 1:
        p.error("--rounds and --videos must be >= 1")

    import torch
    from diffusers import FirstBlockCacheConfig

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks import e2e  # compile_blocks, environment, REFERENCE_PROMPTS, FirstBlockCache records
    from sixbit_tune.models.adapters import get_adapter
    from sixbit_tune.models.reference import load_reference_pipeline
    from sixbit_tune.runtime import apply_policy, load_policy
    from sixbit_tune.search.quality import GenerationSettings, compare, generate

    names = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if "bf16-compiled" not in names:
        names.insert(0, "bf16-compiled")
    for n in names:
        base = n.replace(" (eager stats)", "")
        if not (base == "bf16-compiled" or base in POLICIES or base.startswith("fbc-")):
            p.error(f"unknown contender {n!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = load_reference_pipeline(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    adapter = get_adapter(pipe)
    settings = GenerationSettings(steps=args.steps)
    prompt = e2e.REFERENCE_PROMPTS[0]
    ref = generate(pipe, prompt, 0, settings)  # bf16 eager: the quality reference
    if not args.no_compile:
        e2e.compile_blocks(adapter)

    def install(name):
        base = name.replace(" (eager stats)", "")
        if base in POLICIES:
            h = apply_policy(pipe, load_policy(str(ROOT / POLICIES[base])), compile_stats=base == name)
            return h.remove, lambda: h.stats().skip_share
        if base.startswith("fbc-"):
            pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=float(base[4:])))
            rec, hook = e2e.record_fbc_skips(adapter.blocks()[0].module)

            def remove():
                hook.remove()
                pipe.transformer.disable_cache()
            return remove, lambda: e2e.fbc_skip_share(rec, len(adapter.blocks()))
        return lambda: None, lambda: None

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def video_seconds() -> float:
        sync()
        a = time.perf_counter()
        generate(pipe, prompt, 0, settings)
        sync()
        return time.perf_counter() - a

    rows = {n: {"contender": n, "ms_per_step": [], "quality": None, "skip_share": None} for n in names}
    rounds = []
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        this = {}
        for n in order:
            remove, skip_share = install(n)
            try:
                g = generate(pipe, prompt, 0, settings)  # warm-up (compilation, first round) and the quality video
                if rows[n]["quality"] is None:
                    q = compare(g, ref, with_lpips=False)
                    rows[n]["quality"] = {"psnr_db": q["psnr_db"], "ssim": q["ssim"]}
                    rows[n]["skip_share"] = skip_share()
                ts = [video_seconds() * 1e3 / args.steps for _ in range(args.videos)]
            finally:
                remove()
            rows[n]["ms_per_step"].extend(ts)
            this[n] = statistics.median(ts)
        rounds.append(this)
        log(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {v:.2f}" for n, v in this.items()) + " ms/step")
    for n, row in rows.items():
        row["median_ms_per_step"] = statistics.median(row["ms_per_step"])
        ratios = [rd["bf16-compiled"] / rd[n] for rd in rounds]
        row["speedup_vs_bf16_compiled_per_round"] = ratios
        row["speedup_vs_bf16_compiled"] = statistics.median(ratios)
    meta = e2e.environment(device, dtype)
    meta.update({"command": "python benchmarks/interleaved.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "rounds": args.rounds,
                 "videos": args.videos, "steps": args.steps, "prompt": prompt})
    out = {"meta": meta, "rounds": rounds, "results": list(rows.values())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print("| contender | ms/step (median) | speedup vs bf16 compiled (median of rounds, min–max) | PSNR dB | SSIM | "
          "skip share |\n|---|---:|---:|---:|---:|---:|")
    for row in rows.values():
        rs = row["speedup_vs_bf16_compiled_per_round"]
        q = row["quality"] or {}
        print(f"| {row['contender']} | {row['median_ms_per_step']:.2f} | {row['speedup_vs_bf16_compiled']:.2f}× "
              f"({min(rs):.2f}–{max(rs):.2f}) | {q.get('psnr_db', float('nan')):.1f} | {q.get('ssim') or float('nan'):.3f} | "
              f"{'—' if row['skip_share'] is None else format(row['skip_share'], '.2f')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
