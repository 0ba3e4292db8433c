"""NVFP4 weight encoders on the reference model (CPU): PSNR of NVFP4-weights-only generations per encoder.

Every in-block linear of the reference transformer gets its weight replaced by the dequantized NVFP4 encoding that
one encoder of :func:`sixbit_tune.formats.nvfp4.quantize_weight` produced (activations stay float32, no cache);
each video is compared with the same prompt and seed on the unquantized pipeline
(:func:`sixbit_tune.search.quality.compare`, PSNR over the whole video). Prompts are the end-to-end benchmark's
reference prompts. The ``gptq`` encoder is calibrated on the inputs of each linear captured while the unquantized
pipeline generates other prompts of the reference model's grammar (none of the evaluation prompts), same settings.

    python benchmarks/nvfp4_encoder_quality.py            # writes benchmarks/results/nvfp4-encoders-cpu.{json,md}

``--steps``, ``--prompts``, ``--calib-prompts`` and ``--encoders`` shrink it; ``--out ''`` writes nothing.
Runs with one torch thread by default: on a shared 2-core machine two threads are many times slower.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "nvfp4-encoders-cpu"


def calibration_prompts(n: int, exclude) -> list[str]:
    """``n`` prompts of the reference grammar spread evenly over :func:`all_prompts`, none in ``exclude``."""
    from sixbit_tune.models.reference.data import all_prompts

    pool = [p for p in all_prompts() if p not in set(exclude)]
    if n <= 0:
        return []
    stride = max(1, len(pool) // n)
    return [pool[(i * stride + stride // 2) % len(pool)] for i in range(n)]


def capture_hessians(pipe, linears: dict, prompts, settings) -> tuple[dict, int]:
    """``sum x^T x`` (float64 ``[K, K]``) over every input row of each linear while ``pipe`` generates ``prompts``."""
    import torch

    from sixbit_tune.search.quality import generate

    hess = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in linears.items()}
    rows = {"n": 0}

    def hook_for(name):
        def hook(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            hess[name].addmm_(x.T, x)
            if name == first:
                rows["n"] += x.shape[0]

        return hook

    first = next(iter(linears))
    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in linears.items()]
    try:
        for p in prompts:
            generate(pipe, p, 0, settings)
    finally:
        for h in handles:
            h.remove()
    return hess, rows["n"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--encoders", default=None, help="comma-separated encoder names (default: all)")
    p.add_argument("--calib-prompts", type=int, default=4, help="prompts whose linear inputs calibrate gptq")
    p.add_argument("--calib-steps", type=int, default=None, help="steps of the calibration runs (default --steps)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results path without suffix ('' writes nothing)")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks.e2e import REFERENCE_PROMPTS
    from sixbit_tune.formats import nvfp4
    from sixbit_tune.models.adapters import get_adapter
    from sixbit_tune.models.reference import load_reference_pipeline
    from sixbit_tune.search.quality import GenerationSettings, compare, generate

    encoders = nvfp4.WEIGHT_ENCODERS if args.encoders is None else tuple(e.strip() for e in args.encoders.split(","))
    for e in encoders:
        try:
            nvfp4.check_weight_encoder(e)
        except ValueError as exc:
            p.error(str(exc))
    torch.set_num_threads(args.threads)
    pipe = load_reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    settings = GenerationSettings(steps=args.steps)
    prompts = list(REFERENCE_PROMPTS[: args.prompts])
    linears = get_adapter(pipe).all_linears()
    t0 = time.perf_counter()
    refs = {q: generate(pipe, q, 0, settings) for q in prompts}
    gen_s = (time.perf_counter() - t0) / len(prompts)
    print(f"# {len(linears)} in-block linears; unquantized generation {gen_s:.1f} s per video", file=sys.stderr)

    calib = calibration_prompts(args.calib_prompts, prompts) if "gptq" in encoders else []
    calib_settings = GenerationSettings(steps=args.calib_steps or args.steps)
    hess, calib_rows = capture_hessians(pipe, linears, calib, calib_settings) if calib else ({}, 0)
    if "gptq" in encoders and not calib:
        p.error("the gptq encoder needs --calib-prompts >= 1")

    originals = {name: m.weight.detach().clone() for name, m in linears.items()}
    rows = []
    for enc in encoders:
        t0 = time.perf_counter()
        w_err, proxy = [], []
        for name, m in linears.items():
            w = originals[name]
            q = nvfp4.quantize_weight(w, enc, hessian=hess.get(name)).dequantize(w.dtype)
            w_err.append(float((q - w).square().sum() / w.square().sum()))
            if name in hess:
                d = (q - w).double()
                h = hess[name]
                proxy.append(float(((d @ h) * d).sum() / ((w.double() @ h) * w.double()).sum()))
            with torch.no_grad():
                m.weight.copy_(q)
        encode_s = time.perf_counter() - t0
        try:
            psnr = [compare(generate(pipe, q, 0, settings), refs[q], with_lpips=False)["psnr_db"] for q in prompts]
        finally:
            with torch.no_grad():
                for name, m in linears.items():
                    m.weight.copy_(originals[name])
        row = {
            "encoder": enc,
            "psnr_db": psnr,
            "mean_psnr_db": statistics.fmean(psnr),
            "min_psnr_db": min(psnr),
            "encode_s": encode_s,
            "weight_rel_mse": statistics.fmean(w_err),
            "calib_output_rel_mse": statistics.fmean(proxy) if proxy else None,
        }
        rows.append(row)
        print(f"# {enc}: mean {row['mean_psnr_db']:.2f} dB, min {row['min_psnr_db']:.2f} dB", file=sys.stderr)

    best = max(rows, key=lambda r: (r["mean_psnr_db"], r["min_psnr_db"]))
    meta = {
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])]),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"CPU ({os.cpu_count()} cores, shared), {platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} torch thread(s), float32",
        "model": "reference (9.1M-parameter WanTransformer3DModel pipeline), every in-block linear NVFP4 weights-only",
        "steps": args.steps,
        "prompts": prompts,
        "seed": 0,
        "calibration_prompts": calib,
        "calibration_steps": calib_settings.steps,
        "calibration_rows_per_linear": calib_rows,
        "scale_search_steps": list(nvfp4.SCALE_SEARCH_STEPS),
        "recommended": best["encoder"],
        "rows": rows,
    }
    lines = [
        "# NVFP4 weight encoders, reference model, CPU",
        "",
        f"`{meta['command']}` ({meta['date']}; {meta['machine']})",
        "",
        f"{len(linears)} in-block linears NVFP4 weights-only, activations float32, no cache; {args.steps} steps, "
        f"seed 0; PSNR of each video against the unquantized pipeline. gptq calibrated on {len(calib)} other "
        f"prompts x {calib_settings.steps} steps ({calib_rows} input rows per linear). Weight error: mean over linears of ||Q-W||^2/||W||^2; "
        "calibration output error: mean of tr(dW H dW^T)/tr(W H W^T).",
        "",
        "| encoder | PSNR dB per prompt | mean PSNR dB | min PSNR dB | weight rel. MSE | calib. output rel. MSE "
        "| encode s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        proxy = "" if r["calib_output_rel_mse"] is None else f"{r['calib_output_rel_mse']:.5f}"
        lines.append(
            f"| {r['encoder']} | {', '.join(f'{x:.2f}' for x in r['psnr_db'])} | {r['mean_psnr_db']:.2f} "
            f"| {r['min_psnr_db']:.2f} | {r['weight_rel_mse']:.5f} | {proxy} | {r['encode_s']:.1f} |"
        )
    lines += ["", f"Best mean PSNR: **{best['encoder']}**."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
        out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
