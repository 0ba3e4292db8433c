"""The route menu of this GPU on a shape workload's in-block linears (run on the GPU machine).

    python benchmarks/route_menu.py --out DIR [--workloads shape:wan2.1-1.3b,shape:cogvideox-2b] [--repeats 10]

For each workload it builds the transformer with random weights (``benchmarks.e2e`` shape workloads: the real
layer shapes and token counts), records the GEMM shapes its in-block linears see during one denoising step
(``sixbit_tune.runtime.menu.linear_shapes``), checks every route's layer against the reference numerics on those
inputs (relative RMS error of the output, kernel path vs ``Backend("reference")``), then times every route against
the unquantized ``nn.Linear``, each compiled (``sixbit_tune.runtime.menu.measure_menu``); the FP8 routes are timed
again with fast accumulation. Writes ``menu.json`` and ``menu.md`` into ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

FP8_ROUTES = ("fp8/fp8", "nvfp4/fp8")


def _check_routes(shapes, device, routes) -> dict[str, float]:
    """Relative RMS error of each route's output (device kernels, bf16 in and out) against the reference numerics
    (float32 out) at the largest shape, on 256 rows: the bf16 output rounding alone gives about 1e-3."""
    from sixbit_tune import routes as R
    from sixbit_tune.runtime._backend import Backend
    from sixbit_tune.runtime.linear import MixedPrecisionLinear

    M, K, N = max(shapes, key=lambda s: s[0] * s[1] * s[2])
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(K, N).to(device, torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_((torch.randn(N, K, generator=g) / K ** 0.5).to(device))
    x = torch.randn(min(M, 256), K, generator=g).to(device, torch.bfloat16)
    out = {}
    for key in routes:
        r = R.Route.parse(key)
        if r.weight == "nvfp4" and K % 16:
            continue
        fast = MixedPrecisionLinear(lin, "fast", Backend("auto"), weight=r.weight, fast=r.activation)
        ref = MixedPrecisionLinear(copy.deepcopy(lin).cpu().float(), "fast", Backend("reference"), weight=r.weight,
                                   fast=r.activation)
        with torch.no_grad():
            y = fast(x).float().cpu()
            y_ref = ref(x.cpu().float())
        out[key] = float((y - y_ref).pow(2).mean().sqrt() / y_ref.pow(2).mean().sqrt())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--workloads", default="shape:wan2.1-1.3b,shape:cogvideox-2b")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    from sixbit_tune.kernels import scaled_mm_fp8

    from benchmarks.e2e.workloads import make_runner, workloads_for
    from sixbit_tune.runtime.menu import UNQUANTIZED, linear_shapes, measure_menu

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tiny = args.workloads.startswith("tiny:")  # the CPU check: tiny models of the smoke set
    ns = SimpleNamespace(smoke=tiny, steps=50, steps_timed=2, prompts=1, shape_size=None, workloads=args.workloads)
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": "python " + " ".join(sys.argv),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
               "torch": torch.__version__, "workloads": {}}
    lines = []
    for wl in [w for w in workloads_for(ns) if w.kind == "transformer"]:
        runner = make_runner(wl, device, dtype)
        shapes = linear_shapes(runner.transformer, lambda runner=runner: runner.step(0, 50))
        del runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"{wl.spec}: {len(shapes)} GEMM shapes, {sum(shapes.values())} layer calls per step", flush=True)
        errors = _check_routes(list(shapes), device, ["int8/int8", "fp8/fp8", "nvfp4/nvfp4", "nvfp4/int8",
                                                      "nvfp4/fp8"])
        print("  relative RMS error vs reference:", {k: f"{v:.2e}" for k, v in errors.items()}, flush=True)
        exact = measure_menu(shapes, device, dtype, repeats=args.repeats, progress=lambda s: print("  " + s,
                                                                                                     flush=True))
        scaled_mm_fp8.set_fast_accum(True)
        try:
            fast = measure_menu(shapes, device, dtype, routes=FP8_ROUTES, repeats=args.repeats,
                                progress=lambda s: print("  fast accum " + s, flush=True))
        finally:
            scaled_mm_fp8.set_fast_accum(False)
        results["workloads"][wl.spec] = {"exact_accum": exact.to_json(), "fast_accum": fast.to_json(),
                                         "check_rel_rms": errors}
        lines += [f"### {wl.spec}", "", "| route | path | TFLOP/s | vs bf16 (all calls) | fast accum: vs bf16 | "
                  "rel. RMS vs reference |", "|---|---|---:|---:|---:|---:|"]
        for key, e in exact.menu.items():
            fa = fast.menu.get(key)
            lines.append(f"| {key} | {e.implementation} | {e.tflops:.0f} | {e.speedup:.3f}x | "
                         f"{f'{fa.speedup:.3f}x' if fa else '—'} | {errors.get(key, float('nan')):.2e} |")
        bf = sum(t[UNQUANTIZED] * exact.counts[s] for s, t in exact.per_shape.items())
        lines += ["", f"bf16 in-block linears: {bf:.1f} ms per step ({sum(exact.counts.values())} calls); "
                  "per shape (ms, exact accumulation; fast-accum FP8 after the slash):", "",
                  "| M x K x N | calls | " + " | ".join(exact.per_shape[next(iter(exact.per_shape))]) + " |",
                  "|---|---:|" + "---:|" * len(exact.per_shape[next(iter(exact.per_shape))])]
        for s, t in exact.per_shape.items():
            cells = []
            for k, v in t.items():
                fv = fast.per_shape.get(s, {}).get(k)
                cells.append(f"{v:.3f}" + (f" / {fv:.3f}" if fv is not None else ""))
            lines.append(f"| {'x'.join(map(str, s))} | {exact.counts[s]} | " + " | ".join(cells) + " |")
        if exact.failed or fast.failed:
            lines.append(f"\nnot measured: {exact.failed | fast.failed}")
        lines.append("")
        (out_dir / "menu.json").write_text(json.dumps(results, indent=1))
    md = [f"# Route menu, {results['gpu']}", "", f"`{results['command']}` ({results['date']}; torch "
          f"{results['torch']}). Each route's layer compiled (torch.compile), CUDA-event medians of {args.repeats} "
          "calls after warm-up; random weights; speed-ups weight each shape by its calls per step.", ""] + lines
    (out_dir / "menu.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
