"""CPU sweep of the reference H200 cache policy's TDC knobs: skip share and PSNR per prompt.

Reference pipeline (float32, CPU), 50 steps, prompts 0-2 of the end-to-end benchmark; PSNR of each video against
the same pipeline without a policy. Starts from ``policies/reference-h200-tdc.json`` (bf16 layers = no layer
replaced) and varies the tolerance, ``max_skips``, ``cache_dtype`` and ``extrapolate``.

    python benchmarks/tdc_cap_sweep.py > benchmarks/results/tdc-cap-sweep-cpu.md

``--steps``, ``--prompts`` and ``--grid tolerance:max_skips,...`` shrink it (a code-path check);
``--cache-dtypes`` and ``--extrapolate`` (comma-separated) cross each grid point with the cache knobs (rows in grid
order, the knobs inside); ``--json PATH`` also writes every row (rewritten after each one, so an interrupted sweep
keeps what it measured). The skip share of a row is over all its prompts' runs; the cache bytes are the largest
per-run peak.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRID = [(0.5, 2), (0.75, 2), (1.0, 2), (0.5, 3), (0.75, 3)]


def _parse(p: argparse.ArgumentParser, args) -> list[tuple[str, int, float, int]]:
    try:
        grid = [(float(t), int(c)) for t, c in (item.split(":") for item in args.grid.split(",") if item.strip())]
    except ValueError:
        p.error(f"--grid {args.grid!r}: give tolerance:max_skips pairs, e.g. 0.5:2,1.0:3")
    from sixbit_tune.policy import CACHE_DTYPES

    dtypes = [d.strip() for d in args.cache_dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in CACHE_DTYPES]
    if bad or not dtypes:
        p.error(f"--cache-dtypes {args.cache_dtypes!r}: choose from {', '.join(CACHE_DTYPES)}")
    try:
        extra = [int(e) for e in args.extrapolate.split(",") if e.strip()]
    except ValueError:
        extra = [-1]
    if not extra or any(e not in (0, 1) for e in extra):
        p.error(f"--extrapolate {args.extrapolate!r}: give 0, 1 or 0,1")
    return [(d, e, t, c) for t, c in grid for d in dtypes for e in extra]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--grid", default=",".join(f"{t}:{c}" for t, c in GRID), help="tolerance:max_skips pairs")
    p.add_argument("--cache-dtypes", default="bfloat16", help="tdc.cache_dtype values, comma-separated")
    p.add_argument("--extrapolate", default="0", help="tdc.extrapolate values, comma-separated (0, 1)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    configs = _parse(p, args)
    warnings.simplefilter("ignore")
    import torch

    from benchmarks import e2e
    from sixbit_tune.models.reference import load_reference_pipeline
    from sixbit_tune.runtime import apply_policy, load_policy
    from sixbit_tune.search.quality import GenerationSettings, compare, generate

    pipe = load_reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    settings = GenerationSettings(steps=args.steps)
    prompts = e2e.REFERENCE_PROMPTS[: args.prompts]
    refs = {p: generate(pipe, p, 0, settings) for p in prompts}
    base = json.loads((ROOT / "policies" / "reference-h200-tdc.json").read_text())
    result = {
        "command": "python benchmarks/tdc_cap_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "device": "cpu"},
        "model": "reference (float32)", "steps": args.steps, "prompts": list(prompts),
        "base_policy": "policies/reference-h200-tdc.json", "rows": [],
    }
    print("| cache_dtype | extrapolate | tolerance | max_skips | PSNR dB per prompt | mean PSNR dB | min PSNR dB "
          "| skip share | cache peak MiB |\n|---|---:|---:|---:|---|---:|---:|---:|---:|", flush=True)
    for dtype, extra, tol, cap in configs:
        d = json.loads(json.dumps(base))
        d["tdc"].update(tolerance=tol, max_skips=cap, cache_dtype=dtype, extrapolate=extra)
        d["measured"] = dict.fromkeys(d["measured"])
        q, skipped, calls, peak = [], 0, 0, 0
        t0 = time.perf_counter()
        with apply_policy(pipe, load_policy(d)) as h:
            for prompt in prompts:
                q.append(compare(generate(pipe, prompt, 0, settings), refs[prompt], with_lpips=False)["psnr_db"])
                s = h.stats()
                skipped, calls, peak = skipped + s.skipped_blocks, calls + s.block_calls, max(peak, s.cache_bytes)
        row = {"cache_dtype": dtype, "extrapolate": extra, "tolerance": tol, "max_skips": cap, "psnr_db": q,
               "mean_psnr_db": sum(q) / len(q), "min_psnr_db": min(q), "skip_share": skipped / calls if calls else 0.0,
               "cache_peak_bytes": peak, "seconds": time.perf_counter() - t0}
        result["rows"].append(row)
        print(f"| {dtype} | {extra} | {tol:g} | {cap} | {', '.join(f'{x:.1f}' for x in q)} | "
              f"{row['mean_psnr_db']:.2f} | {row['min_psnr_db']:.2f} | {row['skip_share']:.3f} | "
              f"{peak / 2**20:.2f} |", flush=True)
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
