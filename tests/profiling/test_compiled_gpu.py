"""The fused (torch.compile) statistic functions against the eager ones, on a CUDA device."""

from __future__ import annotations

import pytest
import torch

from sixbit_tune.models.tiny import tiny_transformer, tiny_transformer_inputs
from sixbit_tune.profiling.hooks import instrument


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_compiled_statistics_equal_eager_on_cuda(family):
    results = {}
    context = "cond_uncond" if family == "cogvideox" else "cond"
    batch = 2 if family == "cogvideox" else 1
    for compiled in (False, True):
        model = tiny_transformer(family, device="cuda", dtype=torch.bfloat16)
        outs = []
        with instrument(model, compile_stats=compiled) as inst:
            for step in range(3):
                kwargs = tiny_transformer_inputs(family, batch=batch, seed=step, device="cuda", dtype=torch.bfloat16)
                with torch.no_grad(), model.cache_context(context):
                    model(**kwargs)
                outs.append(inst.flush(step, [0]))
            assert inst.compile_failures == []
        results[compiled] = outs
    for a, b in zip(results[False], results[True]):
        for key in ("gamma", "delta_change", "delta_cos", "delta_norm"):
            assert [v is None for v in b.blocks[key]] == [v is None for v in a.blocks[key]]
            assert [v for v in b.blocks[key] if v is not None] == pytest.approx(
                [v for v in a.blocks[key] if v is not None], rel=1e-5)
        # Measured on the H200: compiled layer statistics within 4.9e-3 of eager (CogVideoX-2B shape, session 1) and
        # 1.12e-2 for one of 40 values (tiny Wan, 2026-11-24: 0.1563 vs 0.1581); cause not established (a likely
        # one: an NVFP4 rounding decision flipped by a last-bit difference of the fused scale arithmetic; see
        # sixbit_tune.profiling.hooks.instrument). The bound is the larger measurement, rounded up.
        for key in ("act_err", "out_err"):
            assert b.layers[key] == pytest.approx(a.layers[key], rel=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_attn_err_on_cuda_through_the_kernel_is_near_the_reference(family):
    """On CUDA the profile's O_a comes from the Triton kernel (what the runtime runs); the kernel matches
    ``formats.attention`` to rounding, so its attn_err is near the reference's on the same q, k, v (the reference
    run on the host in the same dtype, from the same inputs)."""
    from sixbit_tune.formats.attention import attention_8bit_reference
    from sixbit_tune.profiling.attention import SDPACapture

    context = "cond_uncond" if family == "cogvideox" else "cond"
    batch = 2 if family == "cogvideox" else 1
    model = tiny_transformer(family, device="cuda", dtype=torch.bfloat16)
    with instrument(model, layers=False, attention_formats=("fp8", "int8")) as inst:
        kwargs = tiny_transformer_inputs(family, batch=batch, seed=0, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad(), model.cache_context(context), SDPACapture() as cap:
            model(**kwargs)
        recs = inst.flush(0, [0])
    first = cap.calls[0]  # block 0's self-attention is the first attention call of the forward
    for fmt in ("fp8", "int8"):
        got = [e for i, f, e in zip(recs.attention["block_index"], recs.attention["format"], recs.attention["attn_err"])
               if i == 0 and f == fmt]
        for r in range(batch):
            q, k, v = (t[r : r + 1].cpu() for t in (first.q, first.k, first.v))
            o = first.out[r : r + 1].cpu().float()
            oa = attention_8bit_reference(q, k, v, qk_format=fmt).float()
            ref = float((oa - o).norm() / o.norm())
            assert got[r] == pytest.approx(ref, rel=0.1), (fmt, r)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 256, 96), (33, 64, 40), (300, 2096, 24)])
def test_route_products_on_cuda_against_the_reference(shape):
    """On CUDA: the INT8 routes (torch._int_mm, exact) bit for bit the formats reference computed on the host; the
    FP8 routes (exact bf16 products, float32 accumulation) and NVFP4 W4A4 within float32 accumulation of it."""
    from sixbit_tune import formats
    from sixbit_tune.profiling.quant import quantize_activation, quantize_weight, route_outputs
    from sixbit_tune.routes import PROFILE_ROUTES, profile_route

    M, K, N = shape
    torch.manual_seed(K)
    lin = torch.nn.Linear(K, N)
    x = torch.randn(M, K) * torch.logspace(-2, 1, K)
    qw = quantize_weight(lin.cuda(), PROFILE_ROUTES)
    act, xv, xs, xq, xqs, xf, xfs = quantize_activation(x.cuda(), *qw.act_key)
    outs = route_outputs(N, xv, xs, qw.nvfp4_v, qw.nvfp4_s, xq, xqs, qw.int8_q, qw.int8_s, xf, xfs, qw.fp8_q,
                         qw.fp8_s)
    w = lin.weight.detach().cpu()
    wd = formats.nvfp4.quantize(w).dequantize(torch.float32)
    for name, got in zip(qw.formats, outs):
        route = profile_route(name)
        ref = formats.quantized_linear_reference(x, wd if route.weight != route.activation else w, None,
                                                 route.activation)
        got = got.cpu()
        if route.activation == "int8":
            assert torch.equal(got, ref), name
        else:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()), msg=name)
