"""Profiling overhead: an instrumented transformer step against a plain step, in one process.

A step is one CogVideoX-2B-shaped transformer forward (random weights, bf16) on random latents of a 49-frame
480x720 video with a classifier-free-guidance batch of 2 (35,552 tokens), inside ``cache_context("cond_uncond")``
as the pipeline calls it (a family that calls the transformer once per CFG branch, e.g. Wan and the ``reference``
model: one forward of batch 1 inside ``cache_context("cond")``). An instrumented step also flushes its statistics
to the host (the once-per-step transfer the runner does in ``callback_on_step_end``), so it is timed including
that.

Variants, each timed with CUDA events after warm-up (median over ``--iters`` steps):

* ``plain``: no hooks (timed first and again last).
* ``blocks``: block statistics only (Γ, ‖Δ‖, Δ change/cos), eager.
* ``full-eager``: blocks + act_err/out_err of every in-block linear for every route of ``--formats`` (default: the
  profile's default routes, ``sixbit_tune.profiling.config.PROFILE_FORMATS``), eager torch ops.
* ``full-compiled``: the same with the statistic functions fused by ``torch.compile`` (the default on CUDA).
* ``full-compiled (<routes>)`` / ``full-eager (<routes>)``: one per ``--also-formats``, recording only those routes
  (e.g. ``nvfp4,int8``, the formats recorded before the per-route errors), for a baseline on the same card.

Correctness checked in the same run: the transformer output of every instrumented variant is ``torch.equal`` to
the plain output; compiled and eager statistics agree; one real layer's recorded act_err/out_err are compared with
``sixbit_tune.formats`` (``fake_quant`` / ``quantized_linear_reference``; a route with a derived weight operand,
``"nvfp4/int8"``, against ``quantized_linear_reference`` of the dequantized NVFP4 weight) recomputed from its
captured input.

Usage (H200)::

    python benchmarks/profile_overhead.py --out $OUT
    python benchmarks/profile_overhead.py --spec tiny:cogvideox --device cpu --frames 9 --height 16 --width 16
    python benchmarks/profile_overhead.py --spec reference --device cpu --dtype float32 --frames 9 --height 64 \
        --width 64 --no-compiled --formats nvfp4,int8
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch


def _env(device: torch.device) -> dict:
    import platform

    info: dict = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    import diffusers

    info["diffusers"] = diffusers.__version__
    try:
        from sixbit_tune.store.env import gpu_info

        info["gpu"] = gpu_info(device.index or 0) if device.type == "cuda" else None
    except ImportError as e:  # the store package needs duckdb/pyarrow, which a bare GPU image may lack
        info["gpu"] = {"name": torch.cuda.get_device_name(device)} if device.type == "cuda" else None
        info["gpu_info_note"] = f"sixbit_tune.store.env unavailable ({e}); name from torch"
    return info


class _Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn):
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = fn()
            b.record()
            torch.cuda.synchronize()
            return out, a.elapsed_time(b)
        t = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - t) * 1e3


def _rel(a: float | None, b: float | None) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else math.inf
    return abs(a - b) / max(abs(b), 1e-30)


def markdown(result: dict) -> str:
    """A short markdown report of a results dict (what benchmarks/results/*.md holds)."""
    env = result["env"]
    gpu = env.get("gpu") or {}
    sh = result.get("shape", {})
    lines = [
        "# Profiling overhead: instrumented vs plain transformer step",
        "",
        f"- date: {result['date']}",
        f"- GPU: {gpu.get('name')} (driver {gpu.get('driver')}, {gpu.get('memory_bytes')} B)"
        if gpu else "- GPU: none",
        f"- torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, "
        f"diffusers {env.get('diffusers')}, Python {env.get('python')}",
        f"- model: `{result['settings']['spec']}` ({sh.get('params')} parameters, {sh.get('blocks')} blocks, "
        f"{sh.get('in_block_linears')} in-block linears), {result['settings']['dtype']}",
        f"- inputs: latents {sh.get('hidden_states')}, text {sh.get('encoder_hidden_states')} "
        f"({result['settings']['frames']} frames {result['settings']['height']}x{result['settings']['width']}, "
        f"batch {sh.get('batch', 2)} in cache_context({sh.get('context', 'cond_uncond')!r}))",
        f"- routes recorded by the full variants: {', '.join(result.get('formats', [])) or 'n/a'}",
        f"- command: `{result['command']}`",
        "",
        f"A step is one transformer forward inside `cache_context({sh.get('context', 'cond_uncond')!r})`; "
        "instrumented steps include the "
        "once-per-step flush of the statistics to the host. CUDA events, median over the timed steps after warm-up.",
        "",
        "| variant | median ms | x plain | min-max ms | peak allocated GiB | output == plain |",
        "|---|---:|---:|---|---:|---|",
    ]
    for name, v in result["variants"].items():
        peak = v["peak_allocated_bytes"] / 2**30 if v.get("peak_allocated_bytes") else float("nan")
        lines.append(
            f"| {name} | {v['median_ms']:.1f} | {v.get('overhead_x', float('nan')):.2f} | "
            f"{v['min_ms']:.1f}-{v['max_ms']:.1f} | {peak:.1f} | {v['outputs_equal_plain']} "
            f"({v['outputs_compared']} steps) |"
        )
    lines += ["", "All step times (ms, warm-up first):", ""]
    for name, v in result["variants"].items():
        lines.append(f"- {name}: {v['all_ms']}")
    checks = result.get("checks", {})
    if "compiled_vs_eager_max_rel_diff" in checks:
        c = checks["compiled_vs_eager_max_rel_diff"]
        lines += ["", f"Compiled vs eager statistics, max relative difference: blocks {c['blocks']:.2e}, "
                  f"layers {c['layers']:.2e}."]
    if "reference_layer" in checks:
        ref = checks["reference_layer"]
        lines += ["", f"Reference check on `{ref['layer']}` (input {ref['input_shape']}), recorded vs "
                  "`sixbit_tune.formats` recomputed from the captured input:", "",
                  "| format/branch | out_err recorded | rel. diff vs module-output reference | "
                  "rel. diff vs exact x·Wᵀ (float64) | act_err rel. diff |", "|---|---:|---:|---:|---:|"]
        for k, r in ref["rows"].items():
            lines.append(f"| {k} | {r['recorded_out_err']:.5f} | {r['rel_diff_vs_module_output']:.1e} | "
                         f"{r['rel_diff_vs_exact_product']:.1e} | {r['rel_diff_act_err']:.1e} |")
    if "amortized_layer_every_2_x" in result:
        lines += ["", f"Amortized over a run with `layer_every=2` (full recording every other step, block statistics "
                  f"in between): {result['amortized_layer_every_2_x']:.2f}x plain."]
    for note in result.get("notes", []):
        lines.append(f"\nNote: {note}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--spec", default="shape:cogvideox-2b")
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=720)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile-warmup", type=int, default=4)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=300.0, help="skip variants that would start after this")
    p.add_argument("--formats", default=None,
                   help="comma-separated routes the full variants record (default: the profile's default)")
    p.add_argument("--no-compiled", action="store_true", help="skip the full-compiled variant")
    p.add_argument("--also-formats", action="append", default=[], metavar="ROUTES",
                   help="also time the full variant (compiled, or eager with --no-compiled) recording only these "
                   "comma-separated routes, e.g. nvfp4,int8 (today's formats) as a same-run baseline; repeatable")
    p.add_argument("--out", default=None, help="folder for results.json")
    args = p.parse_args(argv)
    t_start = time.time()

    from sixbit_tune import formats
    from sixbit_tune.models.adapters import get_adapter
    from sixbit_tune.models.specs import load_transformer
    from sixbit_tune.profiling.hooks import instrument
    from sixbit_tune.profiling.runner import shape_step_inputs
    from sixbit_tune.routes import profile_route

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    out_dir = Path(args.out) if args.out else None
    if args.formats is None:
        from sixbit_tune.profiling.config import PROFILE_FORMATS

        fmts = tuple(PROFILE_FORMATS)
    else:
        fmts = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    result: dict = {
        "benchmark": "profile_overhead",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "env": _env(device),
        "settings": vars(args),
        "variants": {},
        "checks": {},
        "notes": [],
    }

    def save():
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "results.json").write_text(json.dumps(result, indent=2, default=str))
            try:
                (out_dir / "results.md").write_text(markdown(result))
            except (KeyError, TypeError, ValueError) as e:  # a partial result: the JSON is what matters
                (out_dir / "results.md").write_text(f"partial result, no table yet ({e})\n")

    t0 = time.time()
    model = load_transformer(args.spec, device=device, dtype=dtype)
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(0)
    separate = adapter.cfg_mode == "separate"
    batch, context = (1, "cond") if separate else (2, "cond_uncond")
    inputs = shape_step_inputs(adapter, args.frames, args.height, args.width, batch, g, device, dtype)
    tokens = inputs["hidden_states"].shape
    result["shape"] = {
        "hidden_states": list(tokens),
        "encoder_hidden_states": list(inputs["encoder_hidden_states"].shape),
        "blocks": len(adapter.blocks()),
        "in_block_linears": len(adapter.all_linears()),
        "params": sum(p.numel() for p in model.parameters()),
        "build_s": round(time.time() - t0, 1),
        "batch": batch,
        "context": context,
    }
    timer = _Timer(device)
    schedule = [999 - 37 * k for k in range(64)]

    def forward(k: int):
        t = torch.full((batch,), schedule[k % len(schedule)], device=device, dtype=torch.long)
        with torch.inference_mode(), model.cache_context(context):
            return model(**inputs, timestep=t)[0]

    plain_outputs: dict[int, torch.Tensor] = {}

    def run_variant(name: str, inst=None, warmup: int = args.warmup):
        if not name.startswith("plain") and time.time() - t_start > args.budget_s:
            result["notes"].append(f"{name}: skipped, time budget {args.budget_s}s spent")
            return None
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        times, records, equal = [], [], []
        if inst is not None:
            inst.reset()
        for k in range(warmup + args.iters):
            if inst is None:
                y, ms = timer(lambda k=k: forward(k))
                if k not in plain_outputs:
                    plain_outputs[k] = y
                else:
                    equal.append(torch.equal(y, plain_outputs[k]))
            else:
                (y, rec), ms = timer(lambda k=k: (forward(k), inst.flush(k, [0], float(schedule[k]))))
                records.append(rec)
                if k in plain_outputs:
                    equal.append(torch.equal(y, plain_outputs[k]))
            times.append(ms)
            del y
        timed = times[warmup:]
        v = {
            "median_ms": statistics.median(timed),
            "min_ms": min(timed),
            "max_ms": max(timed),
            "all_ms": [round(x, 2) for x in times],
            "warmup": warmup,
            "iters": args.iters,
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "outputs_equal_plain": all(equal) if equal else None,
            "outputs_compared": len(equal),
        }
        if inst is not None:
            v["rows_per_step"] = len(records[-1])
            v["compile_failures"] = inst.compile_failures
            v["nvfp4_gemm"] = inst.nvfp4_gemm
        result["variants"][name] = v
        save()
        print(f"{name:>14}: median {v['median_ms']:9.1f} ms  all {v['all_ms']}", flush=True)
        return records

    run_variant("plain", warmup=args.warmup)

    # blocks only
    inst = instrument(model, layers=False, compile_stats=False)
    run_variant("blocks", inst)
    inst.remove()

    # full, eager; capture one real layer's input for the reference check on the first step
    block0 = adapter.blocks()[0]
    lin_name = f"{block0.name}.attn1.to_q"
    lin = adapter.all_linears()[lin_name]
    captured = {}

    def grab(_m, a, _o):
        if "x" not in captured:
            captured["x"] = a[0].detach().clone()

    inst = instrument(model, formats=fmts, compile_stats=False)
    result["formats"] = list(inst.formats)
    h = lin.register_forward_hook(grab)
    eager_records = run_variant("full-eager", inst)
    h.remove()
    inst.remove()

    if eager_records:
        rec = eager_records[0]
        x = captured["x"]
        w = lin.weight.detach()
        exact = (x.double().reshape(-1, x.shape[-1]) @ w.double().t()).reshape(*x.shape[:-1], -1)
        with torch.inference_mode():
            module_out = (lin(x).double() - lin.bias.double()) if lin.bias is not None else lin(x).double()
        check = {"layer": lin_name, "input_shape": list(x.shape), "rows": {}}
        for fmt in inst.formats:
            weight, act = profile_route(fmt)
            wr = formats.nvfp4.quantize(w).dequantize(torch.float32) if weight != act else w
            yq = formats.quantized_linear_reference(x, wr, None, act).double()
            xq = formats.fake_quant(x.float(), act).double()
            for r in range(x.shape[0]):
                i = [j for j in range(len(rec.layers["layer"]))
                     if rec.layers["layer"][j] == lin_name and rec.layers["format"][j] == fmt][r]
                direct_exact = ((yq[r] - exact[r]).norm() / exact[r].norm()).item()
                direct_module = ((yq[r] - module_out[r]).norm() / module_out[r].norm()).item()
                act = ((xq[r] - x[r].double()).norm() / x[r].double().norm()).item()
                check["rows"][f"{fmt}/{rec.layers['branch'][i]}"] = {
                    "recorded_out_err": rec.layers["out_err"][i],
                    "direct_out_err_vs_module_output": direct_module,
                    "direct_out_err_vs_exact_product": direct_exact,
                    "rel_diff_vs_module_output": _rel(rec.layers["out_err"][i], direct_module),
                    "rel_diff_vs_exact_product": _rel(rec.layers["out_err"][i], direct_exact),
                    "recorded_act_err": rec.layers["act_err"][i],
                    "direct_act_err": act,
                    "rel_diff_act_err": _rel(rec.layers["act_err"][i], act),
                }
        result["checks"]["reference_layer"] = check
        del captured["x"], exact, module_out
        save()

    # full, compiled (default on CUDA)
    compiled_records = None
    if not args.no_compiled:
        inst = instrument(model, formats=fmts, compile_stats=True)
        compiled_records = run_variant("full-compiled", inst, warmup=args.compile_warmup)
        inst.remove()
    if eager_records and compiled_records:
        worst = {"blocks": 0.0, "layers": 0.0}
        n = min(len(eager_records), len(compiled_records))
        for a, b in zip(eager_records[:n], compiled_records[:n]):
            for key in ("gamma", "delta_change", "delta_cos", "delta_norm"):
                for u, v in zip(a.blocks[key], b.blocks[key]):
                    worst["blocks"] = max(worst["blocks"], _rel(v, u))
            for key in ("act_err", "out_err"):
                for u, v in zip(a.layers[key], b.layers[key]):
                    worst["layers"] = max(worst["layers"], _rel(v, u))
        result["checks"]["compiled_vs_eager_max_rel_diff"] = worst
        save()

    for also in args.also_formats:
        routes = tuple(f.strip() for f in also.split(",") if f.strip())
        inst = instrument(model, formats=routes, compile_stats=not args.no_compiled)
        kind = "full-eager" if args.no_compiled else "full-compiled"
        run_variant(f"{kind} ({','.join(inst.formats)})", inst,
                    warmup=args.warmup if args.no_compiled else args.compile_warmup)
        inst.remove()

    run_variant("plain-again", warmup=1)

    plain = [v["median_ms"] for k, v in result["variants"].items() if k.startswith("plain")]
    base = statistics.median(plain)
    result["plain_median_ms"] = base
    for v in result["variants"].values():
        v["overhead_x"] = v["median_ms"] / base
    full = result["variants"].get("full-compiled") or result["variants"].get("full-eager")
    if full and "blocks" in result["variants"]:
        # ProfileConfig.layer_every=2: steps alternate between full recording and block statistics only
        result["amortized_layer_every_2_x"] = (full["median_ms"] + result["variants"]["blocks"]["median_ms"]) / 2 / base
    result["total_s"] = round(time.time() - t_start, 1)
    save()

    gpu = (result["env"].get("gpu") or {}).get("name") if isinstance(result["env"].get("gpu"), dict) else None
    print(f"\n{args.spec} {list(tokens)} {args.dtype} on {gpu or device}; plain median {base:.1f} ms")
    print(f"{'variant':>14} {'median ms':>10} {'x plain':>8} {'peak GiB':>9} {'out==plain':>10}")
    for k, v in result["variants"].items():
        peak = v["peak_allocated_bytes"] / 2**30 if v["peak_allocated_bytes"] else float("nan")
        print(f"{k:>14} {v['median_ms']:10.1f} {v['overhead_x']:8.2f} {peak:9.1f} {v['outputs_equal_plain']!s:>10}")
    if "amortized_layer_every_2_x" in result:
        print(f"amortized with layer_every=2: {result['amortized_layer_every_2_x']:.2f}x plain")
    for note in result["notes"]:
        print("note:", note)
    print("checks:", json.dumps(result["checks"].get("compiled_vs_eager_max_rel_diff")))
    ref = result["checks"].get("reference_layer", {}).get("rows", {})
    for k, r in ref.items():
        print(f"  {k}: out_err {r['recorded_out_err']:.5f} (vs module-output ref {r['rel_diff_vs_module_output']:.1e}, "
              f"vs exact product {r['rel_diff_vs_exact_product']:.1e}); act_err rel diff {r['rel_diff_act_err']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
