"""Quantized GEMM and quantizer benchmark on the DiT linear shapes, correctness first (run on the H200).

    python benchmarks/kernel_bench.py --out DIR [--shapes all|key] [--variants all|main]

For each linear shape of CogVideoX-2B/5B (49 frames 480x720, CFG batch 2: 35,552 tokens) and Wan 2.1 1.3B/14B
(81 frames 480x832, CFG batch 2: 65,520 tokens) it first checks our kernels against sixbit_tune.formats (whole
tensors for the quantizers, sampled rows for the GEMMs), then times, with CUDA events (median of repeats after
warm-up, autotuning done in the warm-up): cuBLAS bf16 ``F.linear`` (with bias), ``torch._scaled_mm`` FP8 row-wise,
``torch._int_mm`` (int32 out, no epilogue), our INT8 GEMM (with scales + bias epilogue) alone and with the
activation quantizer, our NVFP4 GEMM with its activation quantizer, and the quantizers alone (GB/s counting each
input byte read once and each output byte written once). Writes kernels.json and kernels.md into --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sixbit_tune.formats import int8, nvfp4  # noqa: E402

COG_TOKENS = 2 * 17_776  # 2 x (13 latent frames x 60 x 90 / 4 patches + 226 text) = 35,552
WAN_TOKENS = 2 * 32_760  # 2 x 21 latent frames x 30 x 52 / ... = 65,520

SHAPES = [
    # model, layer, M, K, N
    ("cogvideox-2b", "attn qkv/out", COG_TOKENS, 1920, 1920),
    ("cogvideox-2b", "ff up", COG_TOKENS, 1920, 5120),
    ("cogvideox-2b", "ff down", COG_TOKENS, 5120, 1920),
    ("cogvideox-5b", "attn qkv/out", COG_TOKENS, 3072, 3072),
    ("cogvideox-5b", "ff up", COG_TOKENS, 3072, 12288),
    ("cogvideox-5b", "ff down", COG_TOKENS, 12288, 3072),
    ("wan2.1-1.3b", "attn qkv/out", WAN_TOKENS, 1536, 1536),
    ("wan2.1-1.3b", "ffn up", WAN_TOKENS, 1536, 8960),
    ("wan2.1-1.3b", "ffn down", WAN_TOKENS, 8960, 1536),
    ("wan2.1-14b", "attn qkv/out", WAN_TOKENS, 5120, 5120),
    ("wan2.1-14b", "ffn up", WAN_TOKENS, 5120, 13824),
    ("wan2.1-14b", "ffn down", WAN_TOKENS, 13824, 5120),
]
KEY_SHAPES = {("cogvideox-2b", "attn qkv/out"), ("cogvideox-5b", "ff up"), ("wan2.1-1.3b", "ffn up"),
              ("wan2.1-14b", "ffn down")}


DEVICE = "cuda"


def cuda_time_ms(fn, target_ms=250.0, warmup=2):
    """Median per-call time (ms) from CUDA events.

    After ``warmup`` calls (the first may autotune), each timed sample is ``n`` back-to-back calls between two
    events (``n`` so that a sample lasts >= ~1 ms), so the host's launch overhead is hidden by the queue as in
    a real model; samples until ~``target_ms``.
    """
    if DEVICE == "cpu":  # --smoke: the script's logic on CPU under the Triton interpreter, times meaningless
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3, []
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    torch.cuda.synchronize()
    one = max(s.elapsed_time(e), 1e-3)
    n = int(min(50, max(1, round(1.0 / one))))
    reps = int(max(5, min(40, target_ms / (one * n))))
    events = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(n):
            fn()
        e.record()
        events.append((s, e))
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) / n for s, e in events]
    return statistics.median(times), times


def check_shape(x, w, b, rows):
    """Correctness on this shape against the CPU reference (sampled rows; the activation's global NVFP4 scale
    from the exact GPU amax). Returns (facts, int8 weight, nvfp4 weight) with the weights quantized by the kernels.
    """
    from sixbit_tune.kernels import quantize_weight
    from sixbit_tune.kernels.gemm_int8 import int8_gemm
    from sixbit_tune.kernels.gemm_nvfp4 import nvfp4_linear_emulated
    from sixbit_tune.kernels.quant import quantize_int8_rows, quantize_nvfp4

    out = {}
    xr = x[rows].cpu()
    # Weights through the kernels; their sampled rows against the CPU reference.
    qw8 = quantize_weight(w, "int8", preference="triton")
    qw4 = quantize_weight(w, "nvfp4", preference="triton")
    wr = w[rows % w.shape[0]].cpu()
    rq, rs = int8.quantize(wr)
    out["int8_weight_bit_exact"] = bool(torch.equal(qw8[0][rows % w.shape[0]].cpu(), rq)
                                        and torch.equal(qw8[1][rows % w.shape[0]].cpu(), rs))
    gw = nvfp4.global_scale_of(w.abs().amax().float().reshape(1).cpu())
    r4w = nvfp4.quantize(wr, global_scale=gw)
    out["nvfp4_weight_bit_exact"] = bool(
        torch.equal(qw4.global_scale.cpu(), gw)
        and torch.equal(qw4.data[rows % w.shape[0]].cpu(), r4w.data)
        and torch.equal(qw4.block_scales[rows % w.shape[0]].view(torch.uint8).cpu(), r4w.block_scales.view(torch.uint8)))
    # Activation quantizers.
    q, s = quantize_int8_rows(x)
    rq, rs = int8.quantize(xr)
    out["int8_quant_bit_exact"] = bool(torch.equal(q[rows].cpu(), rq) and torch.equal(s[rows].cpu(), rs))
    gx = nvfp4.global_scale_of(x.abs().amax().float().reshape(1).cpu())
    r4 = nvfp4.quantize(xr, global_scale=gx)
    data, scales, gs, _, _ = quantize_nvfp4(x)
    out["nvfp4_quant_bit_exact"] = bool(
        torch.equal(gs.cpu(), gx) and torch.equal(data[rows].cpu(), r4.data)
        and torch.equal(scales[rows].view(torch.uint8).cpu(), r4.block_scales.view(torch.uint8)))
    M, K = x.shape
    codes = nvfp4.decode_e2m1(nvfp4.unpack_codes(r4.data)).reshape(len(rows), K // 16, 16)
    expect = (codes * r4.block_scales.float()[..., None]).reshape(len(rows), K)
    _, _, _, deq, _ = quantize_nvfp4(x, write_dequant=True, write_packed=False)
    out["nvfp4_quant_deq_bit_exact"] = bool(torch.equal(deq[rows].float().cpu(), expect))
    d2, s2, _, _, _ = quantize_nvfp4(x, params={"pair_loads": True})
    out["nvfp4_quant_pair_form_same_bits"] = bool(torch.equal(d2, data) and torch.equal(s2.view(torch.uint8),
                                                                                          scales.view(torch.uint8)))
    q2, s2 = quantize_int8_rows(x, loop_k=0)
    out["int8_quant_loop_form_same_bits"] = bool(torch.equal(q2, q) and torch.equal(s2, s))
    # GEMMs on the sampled rows.
    bc = b.float().cpu()
    acc = rq.double() @ qw8[0].cpu().double().T
    ref8 = acc.float() * (rs[:, None] * qw8[1].cpu()[None, :]) + bc
    for variant in ["tma-auto", "tma", "tma-store-sub", "tma-flat", "pointer"]:
        try:
            y = int8_gemm(q, qw8[0], s, qw8[1], b, torch.bfloat16, variant=variant)[rows].float().cpu()
            err = (y - ref8).abs()
            out[f"int8_{variant}_within_1ulp"] = bool((err <= 2.0**-7 * ref8.abs() + 2.0**-22 * bc.abs()).all())
            out[f"int8_{variant}_exact_share"] = float((y == ref8.to(torch.bfloat16).float()).float().mean())
        except Exception as exc:
            out[f"int8_{variant}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    wdq = qw4.dequantize().cpu()
    ref4y = r4.dequantize() @ wdq.T + bc
    bound = K * 2.0**-23 * (r4.dequantize().abs() @ wdq.abs().T) + 2.0**-8 * ref4y.abs()
    for form in NVFP4_FORMS:
        try:
            y = nvfp4_linear_emulated(x, qw4, b, torch.bfloat16, form=form)[0][rows].float().cpu()
            out[f"nvfp4_{form}_within_bound"] = bool(((y - ref4y).abs() <= bound).all())
            out[f"nvfp4_{form}_rel_l2"] = float((y - ref4y).norm() / ref4y.norm())
        except Exception as exc:
            out[f"nvfp4_{form}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return out, qw8, qw4


NVFP4_FORMS = ["auto", "deq", "deq-tma-swap", "packed"]


def bench_shape(model, layer, M, K, N, full):
    from sixbit_tune.kernels.gemm_int8 import (
        DEFAULT_TMA_VARIANT,
        _int8_gemm_tma_fixed,
        _int8_gemm_tma_kernel,
        int8_gemm,
    )
    from sixbit_tune.kernels.gemm_nvfp4 import (
        DEFAULT_FORM,
        _nvfp4_gemm_auto,
        _nvfp4_gemm_kernel,
        nvfp4_linear_emulated,
    )
    from sixbit_tune.kernels.quant import quantize_int8_rows, quantize_nvfp4

    g = torch.Generator(device=DEVICE).manual_seed(M + 7 * K + 13 * N)
    x = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16, generator=g)
    x[:, :: max(1, K // 17)] *= 8.0  # a few outlier channels, as DiT activations have
    w = torch.randn(N, K, device=DEVICE, dtype=torch.bfloat16, generator=g) * 0.02
    b = torch.randn(N, device=DEVICE, dtype=torch.bfloat16, generator=g) * 0.1
    rows = torch.cat([torch.tensor([0, M - 1]), torch.randint(0, M, (62,), generator=torch.Generator().manual_seed(M))])
    rows = rows.to(DEVICE)
    rec = {"model": model, "layer": layer, "M": M, "K": K, "N": N}
    t0 = time.time()
    try:
        rec["check"], qw8, qw4 = check_shape(x, w, b, rows)
    except Exception as exc:  # record and still time what runs
        rec["check"] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        from sixbit_tune.kernels import quantize_weight

        qw8 = quantize_weight(w, "int8", preference="reference")
        qw4 = quantize_weight(w, "nvfp4", preference="reference")
    rec["check_s"] = round(time.time() - t0, 2)

    flops = 2.0 * M * N * K
    res = {}

    def timeit(name, fn, nbytes=None, kernel=None):
        try:
            ms, _ = cuda_time_ms(fn)
            res[name] = {"ms": ms}
            if nbytes is None:
                res[name]["tflops"] = flops / ms / 1e9
            else:
                res[name]["gbps"] = nbytes / ms / 1e6
            if kernel is not None and getattr(kernel, "best_config", None) is not None:
                res[name]["config"] = str(kernel.best_config)
        except Exception as exc:  # record, keep going
            res[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}

    timeit("cublas_bf16", lambda: F.linear(x, w, b))
    try:  # FP8 row-wise (operands quantized beforehand; GEMM + scales + bias in cuBLASLt)
        xs = x.float().abs().amax(dim=1, keepdim=True) / 448.0
        ws = w.float().abs().amax(dim=1, keepdim=True) / 448.0
        x8 = (x.float() / xs).to(torch.float8_e4m3fn)
        w8 = (w.float() / ws).to(torch.float8_e4m3fn)
        ws_t = ws.t().contiguous()
        timeit("scaled_mm_fp8_rowwise", lambda: torch._scaled_mm(
            x8, w8.t(), scale_a=xs, scale_b=ws_t, bias=b, out_dtype=torch.bfloat16, use_fast_accum=True))
    except Exception as exc:
        res["scaled_mm_fp8_rowwise"] = {"error": f"{type(exc).__name__}: {exc}"}
    q, s = quantize_int8_rows(x)
    wq_t = qw8[0].t()
    timeit("torch_int_mm", lambda: torch._int_mm(q, wq_t))
    for variant in [DEFAULT_TMA_VARIANT, "tma", "tma-store-sub", "tma-flat", "pointer"] if full else [
            DEFAULT_TMA_VARIANT]:
        timeit(f"int8_gemm_{variant}", lambda v=variant: int8_gemm(q, qw8[0], s, qw8[1], b, torch.bfloat16,
                                                                    variant=v),
               kernel={"pointer": None, "tma-auto": _int8_gemm_tma_kernel}.get(variant, _int8_gemm_tma_fixed))

    def int8_full():
        qq, ss = quantize_int8_rows(x)
        return int8_gemm(qq, qw8[0], ss, qw8[1], b, torch.bfloat16)

    timeit("int8_quant+gemm", int8_full)
    for form in NVFP4_FORMS if full else [DEFAULT_FORM]:
        timeit(f"nvfp4_{form}", lambda f=form: nvfp4_linear_emulated(x, qw4, b, torch.bfloat16, form=f),
               kernel=_nvfp4_gemm_auto if form == "auto" else _nvfp4_gemm_kernel)
    # Quantizers alone; effective bytes: input read once, outputs written once.
    timeit("quant_int8", lambda: quantize_int8_rows(x), nbytes=M * K * 2 + M * K + 4 * M)
    timeit("quant_nvfp4", lambda: quantize_nvfp4(x), nbytes=M * K * 2 + M * K // 2 + M * K // 16)
    timeit("quant_nvfp4_deq_bf16", lambda: quantize_nvfp4(x, write_dequant=True, write_packed=False),
           nbytes=M * K * 4)
    # The alternative launch forms (same bits): INT8 two-pass rows everywhere / whole rows up to 16k;
    # NVFP4 even/odd stride-2 loads instead of one load + split.
    timeit("alt_quant_int8_loop", lambda: quantize_int8_rows(x, loop_k=0), nbytes=M * K * 3 + 4 * M)
    timeit("alt_quant_int8_whole_rows", lambda: quantize_int8_rows(x, loop_k=16384), nbytes=M * K * 3 + 4 * M)
    timeit("alt_quant_nvfp4_pair_loads", lambda: quantize_nvfp4(x, params={"pair_loads": True}),
           nbytes=M * K * 2 + M * K // 2 + M * K // 16)
    base = res["cublas_bf16"].get("ms")
    for v in res.values():
        if "ms" in v and "tflops" in v and base:
            v["speedup_vs_bf16"] = base / v["ms"]
    rec["timings"] = res
    return rec


def copy_bandwidth():
    if DEVICE == "cpu":
        return 0.0
    a = torch.empty(2 * 1024**3, dtype=torch.uint8, device=DEVICE)
    bb = torch.empty_like(a)
    ms, _ = cuda_time_ms(lambda: bb.copy_(a))
    return 2 * a.numel() / ms / 1e6


def to_markdown(report):
    lines = [
        f"# Kernel benchmark: {report['gpu']}",
        "",
        f"torch {report['torch']}, triton {report['triton']}, date {report['date']}; device-to-device copy "
        f"{report['copy_gbps']:.0f} GB/s (read + write).",
        "",
        f"Command: `{report['command']}`",
        "",
        "Medians of CUDA-event timings after warm-up (autotuning happens in the warm-up); each sample is enough "
        "back-to-back calls to last >= 1 ms. x = speed relative to cuBLAS bf16 `F.linear` with bias on the same "
        "operands. INT8 GEMM = our W8A8 kernel with scales and bias in the epilogue (default path: TMA kernel "
        "autotuned over tiles and epilogue forms); INT8 +q adds the per-token activation quantizer; NVFP4 = "
        "activation quantizer + emulated W4A4 GEMM (default path). FP8 and _int_mm take pre-quantized operands "
        "(_int_mm: int32 out, no epilogue). Quantizer TB/s: input read once + outputs written once.",
        "",
        "| model | layer | M | K | N | bf16 ms (TFLOP/s) | FP8 rowwise x | _int_mm x | INT8 GEMM x | INT8 +q x "
        "| NVFP4 x | q-int8 TB/s | q-nvfp4 TB/s | checks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["shapes"]:
        t = r["timings"]

        def sp(name, t=t):
            v = t.get(name, {})
            return f"{v['speedup_vs_bf16']:.2f}" if "speedup_vs_bf16" in v else "err"

        def tb(name, t=t):
            v = t.get(name, {})
            return f"{v['gbps'] / 1e3:.2f}" if "gbps" in v else "err"

        ok = all(v for v in r["check"].values() if isinstance(v, bool)) and not any(
            k.endswith("error") for k in r["check"])
        bf = t["cublas_bf16"]
        lines.append(
            f"| {r['model']} | {r['layer']} | {r['M']} | {r['K']} | {r['N']} | {bf['ms']:.3f} ({bf['tflops']:.0f}) "
            f"| {sp('scaled_mm_fp8_rowwise')} | {sp('torch_int_mm')} | {sp('int8_gemm_tma-auto')} "
            f"| {sp('int8_quant+gemm')} | {sp('nvfp4_auto')} | {tb('quant_int8')} | {tb('quant_nvfp4')} "
            f"| {'pass' if ok else 'FAIL'} |"
        )
    alt = [r for r in report["shapes"] if any(k.startswith("int8_gemm_tma-flat") for k in r["timings"])]
    if alt:
        lines += ["", "Alternative forms on the key shapes (x cuBLAS bf16; the defaults autotune among these):", "",
                  "| model | layer | INT8 tma | INT8 tma-store-sub | INT8 tma-flat | INT8 pointer | NVFP4 deq "
                  "| NVFP4 deq-tma-swap | NVFP4 packed (both operands dequantized in the GEMM) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in alt:
            t = r["timings"]
            cells = [f"{t[k]['speedup_vs_bf16']:.2f}" if "speedup_vs_bf16" in t.get(k, {}) else "err" for k in (
                "int8_gemm_tma", "int8_gemm_tma-store-sub", "int8_gemm_tma-flat", "int8_gemm_pointer",
                "nvfp4_deq", "nvfp4_deq-tma-swap", "nvfp4_packed")]
            lines.append(f"| {r['model']} | {r['layer']} | " + " | ".join(cells) + " |")
    lines += ["", "Quantizer launch forms (TB/s, same bits): default vs alternative", "",
              "| model | layer | K | INT8 default | INT8 two-pass rows | INT8 whole rows | NVFP4 default (load + "
              "split) | NVFP4 even/odd loads | NVFP4 bf16 expansion (4 B/elem) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["shapes"]:
        t = r["timings"]
        cells = [f"{t[k]['gbps'] / 1e3:.2f}" if "gbps" in t.get(k, {}) else "err" for k in (
            "quant_int8", "alt_quant_int8_loop", "alt_quant_int8_whole_rows", "quant_nvfp4",
            "alt_quant_nvfp4_pair_loads", "quant_nvfp4_deq_bf16")]
        lines.append(f"| {r['model']} | {r['layer']} | {r['K']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", choices=["all", "key"], default="all")
    ap.add_argument("--variants", choices=["all", "main"], default="main",
                    help="all: also time the alternative kernel forms and the quantizer launch sweeps everywhere")
    ap.add_argument("--all-variants-on-key", action="store_true",
                    help="time all kernel forms on the key shapes and the main ones elsewhere")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on CPU under TRITON_INTERPRET=1: checks the script, not the speed")
    args = ap.parse_args(argv)
    import triton

    global DEVICE
    shapes = SHAPES
    if args.smoke:
        DEVICE = "cpu"
        shapes = [("smoke", "attn qkv/out", 67, 128, 48), ("smoke", "ffn up", 33, 96, 80)]
        KEY_SHAPES.add(("smoke", "attn qkv/out"))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)",
        "capability": ".".join(map(str, torch.cuda.get_device_capability())) if DEVICE == "cuda" else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "copy_gbps": copy_bandwidth(),
        "shapes": [],
    }
    for model, layer, M, K, N in shapes:
        key = (model, layer) in KEY_SHAPES
        if args.shapes == "key" and not key:
            continue
        full = args.variants == "all" or (args.all_variants_on_key and key)
        t0 = time.time()
        rec = bench_shape(model, layer, M, K, N, full)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        rec["wall_s"] = round(time.time() - t0, 1)
        report["shapes"].append(rec)
        (out / "kernels.json").write_text(json.dumps(report, indent=1))
        t = rec["timings"]
        bad = [k for k, v in rec["check"].items() if v is False or k.endswith("error")]
        print(f"{model:13s} {layer:13s} M={M} K={K} N={N} ({rec['wall_s']} s) check failures: {bad}", flush=True)
        for name, v in t.items():
            print(f"    {name:34s} " + " ".join(f"{k}={val:.3f}" if isinstance(val, float) else f"{k}={val}"
                                             for k, val in v.items() if k != "config"), flush=True)
    (out / "kernels.md").write_text(to_markdown(report))
    print(to_markdown(report))


if __name__ == "__main__":
    main()
