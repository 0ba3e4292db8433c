"""CPU sweep of the reference H200 cache policy's TDC tolerance and skip cap: skip share and PSNR per prompt.

Reference pipeline (float32, CPU), 50 steps, prompts 0-2 of the end-to-end benchmark; PSNR of each video against
the same pipeline without a policy. Starts from ``policies/reference-h200-tdc.json`` (bf16 layers = no layer replaced).

    python benchmarks/tdc_cap_sweep.py > benchmarks/results/tdc-cap-sweep-cpu.md

``--steps``, ``--prompts`` and ``--grid tolerance:max_skips,...`` shrink it (a code-path check).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRID = [(0.5, 2), (0.75, 2), (1.0, 2), (0.5, 3), (0.75, 3)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--grid", default=",".join(f"{t}:{c}" for t, c in GRID), help="tolerance:max_skips pairs")
    args = p.parse_args(argv)
    try:
        grid = [(float(t), int(c)) for t, c in (item.split(":") for item in args.grid.split(",") if item.strip())]
    except ValueError:
        p.error(f"--grid {args.grid!r}: give tolerance:max_skips pairs, e.g. 0.5:2,1.0:3")
    warnings.simplefilter("ignore")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
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
    print("| tolerance | max_skips | PSNR dB per prompt | mean PSNR dB | skip share |\n|---:|---:|---|---:|---:|")
    for tol, cap in grid:
        d = json.loads(json.dumps(base))
        d["tdc"].update(tolerance=tol, max_skips=cap)
        d["measured"] = dict.fromkeys(d["measured"])
        with apply_policy(pipe, load_policy(d)) as h:
            q = [compare(generate(pipe, p, 0, settings), refs[p], with_lpips=False)["psnr_db"] for p in prompts]
            share = h.stats().skip_share
        print(f"| {tol:g} | {cap} | {', '.join(f'{x:.1f}' for x in q)} | {sum(q) / len(q):.2f} | {share:.3f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
