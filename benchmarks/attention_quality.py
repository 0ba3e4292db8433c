"""8-bit attention on the reference model (CPU): PSNR of generations with every block's self-attention in 8 bit.

The reference pipeline runs with a policy that leaves every linear unquantized and the cache off, and whose
``attention`` section puts every block's attention in ``8bit`` (Q·Kᵀ in INT8 with K smoothing, or in FP8; P·V in
FP8: :mod:`sixbit_tune.formats.attention`, the reference numerics the runtime uses off CUDA). Each video is compared
with the same prompt and seed on the unquantized pipeline (:func:`sixbit_tune.search.quality.compare`, PSNR over
the whole video). Prompts are the end-to-end benchmark's reference prompts. Every block at every step in 8 bit is
the most 8-bit attention a dynamic policy can run: a dynamic policy runs a subset of these computations in 8 bit.

    python benchmarks/attention_quality.py     # writes benchmarks/results/attention-quality-cpu.{json,md}

``--steps`` and ``--prompts`` shrink it; ``--out ''`` writes nothing. One torch thread by default.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "attention-quality-cpu"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results path without suffix ('' writes nothing)")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks.e2e import REFERENCE_PROMPTS
    from sixbit_tune import policy as P
    from sixbit_tune.models.adapters import get_adapter
    from sixbit_tune.models.reference import load_reference_pipeline
    from sixbit_tune.runtime import apply_policy, make_static_policy
    from sixbit_tune.search.quality import GenerationSettings, compare, generate

    torch.set_num_threads(args.threads)
    pipe = load_reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    settings = GenerationSettings(steps=args.steps)
    prompts = list(REFERENCE_PROMPTS[: args.prompts])
    refs = {q: generate(pipe, q, 0, settings) for q in prompts}
    n_blocks = len(get_adapter(pipe).blocks())
    rows = []
    for fmt in ("int8", "fp8"):
        attention = P.Attention(0.0, fmt, {str(i): P.AttentionBlock("8bit") for i in range(n_blocks)})
        policy = make_static_policy(pipe, "none").replace(attention=attention)
        t0 = time.perf_counter()
        psnr, share = [], []
        with apply_policy(pipe, policy) as h:
            for q in prompts:
                psnr.append(compare(generate(pipe, q, 0, settings), refs[q], with_lpips=False)["psnr_db"])
                share.append(h.stats().attention_8bit_share)
        rows.append({"qk_format": fmt, "psnr_db": psnr, "mean_psnr_db": statistics.fmean(psnr),
                     "min_psnr_db": min(psnr), "attention_8bit_share": share,
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{fmt:>4}  mean {rows[-1]['mean_psnr_db']:.2f} dB  min {rows[-1]['min_psnr_db']:.2f} dB  "
              f"8-bit share {min(share):.3f}", flush=True)
    result = {
        "what": "PSNR vs unquantized of the reference model with every block's self-attention in 8 bit (CPU)",
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "date": _dt.date.today().isoformat(), "machine": platform.machine(), "torch": torch.__version__,
        "steps": args.steps, "prompts": prompts, "blocks": n_blocks, "rows": rows,
    }
    if args.out:
        out = Path(args.out)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        md = [f"# 8-bit attention on the reference model, CPU ({result['date']})", "",
              f"`{result['command']}`: {len(prompts)} prompts × {args.steps} steps, every block's self-attention "
              "in 8 bit (P·V in FP8), linears unquantized, cache off; PSNR over the whole video against the "
              "unquantized pipeline, same prompt and seed.", "",
              "| Q·Kᵀ format | mean PSNR dB | min PSNR dB | per prompt |", "|---|---|---|---|"]
        md += [f"| {r['qk_format']} | {r['mean_psnr_db']:.2f} | {r['min_psnr_db']:.2f} | "
               + ", ".join(f"{v:.2f}" for v in r["psnr_db"]) + " |" for r in rows]
        out.with_suffix(".md").write_text("\n".join(md) + "\n")
        print(f"wrote {out.with_suffix('.json')} and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
