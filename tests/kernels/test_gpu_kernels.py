"""The compiled kernels on a CUDA GPU at DiT sizes, against sixbit_tune.formats (run on the H200).

The reference is evaluated on the CPU: on CUDA, PyTorch divides by a Python scalar as a multiplication by its
reciprocal (``x / 127.0``), which is not the IEEE division the formats specify, while the CPU divides exactly.
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch

from sixbit_tune.formats import int8, nvfp4

pytestmark = pytest.mark.gpu

QUANT_SHAPES = [(1, 5120), (157, 1920), (4099, 3072), (35552, 1920), (33, 13824), (5, 20480)]
GEMM_SHAPES = [(157, 1920, 1920), (2053, 3072, 12288), (4096, 5120, 1536), (7, 1536, 8960)]


@pytest.fixture(autouse=True)
def _compiled():
    pytest.importorskip("triton")
    from sixbit_tune.kernels._triton_support import interpreting

    if interpreting():
        pytest.skip("TRITON_INTERPRET is set: these tests are for the compiled kernels")


@pytest.mark.parametrize("M,K", QUANT_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantizers_bit_exact_gpu(M, K, dtype):
    from sixbit_tune.kernels.quant import quantize_int8_rows, quantize_nvfp4

    x = (torch.randn(M, K, device="cuda") * 4).to(dtype)
    x[0, :7] = 0
    xc = x.cpu()
    q, s = quantize_int8_rows(x)
    rq, rs = int8.quantize(xc)
    assert torch.equal(s.cpu(), rs) and torch.equal(q.cpu(), rq)
    data, scales, gs, deq, amax = quantize_nvfp4(x, write_dequant=True)
    ref = nvfp4.quantize(xc)
    assert torch.equal(gs.cpu(), ref.global_scale)
    assert torch.equal(scales.view(torch.uint8).cpu(), ref.block_scales.view(torch.uint8))
    assert torch.equal(data.cpu(), ref.data)
    codes = nvfp4.decode_e2m1(nvfp4.unpack_codes(ref.data)).reshape(M, K // 16, 16)
    expect = (codes * ref.block_scales.float()[..., None]).reshape(M, K)
    assert torch.equal(deq.float().cpu(), expect)
    for pair_loads in (True,):  # the non-default load form, too
        d2, s2, _, _, _ = quantize_nvfp4(x, params={"pair_loads": pair_loads})
        assert torch.equal(d2, data) and torch.equal(s2.view(torch.uint8), scales.view(torch.uint8))
    for loop_k in (64,):  # the two-pass long-row INT8 kernel at every K
        q2, s2 = quantize_int8_rows(x, loop_k=loop_k)
        assert torch.equal(q2, q) and torch.equal(s2, s)


@functools.lru_cache(maxsize=2)
def _case(M, K, N, fmt):
    """Fresh random inputs of one shape and the CPU reference, shared by the variants of one test (the float64
    CPU reference of a 2053 x 3072 x 12288 product takes seconds)."""
    from sixbit_tune.formats import quantized_linear_reference

    g = torch.Generator().manual_seed(M * 31 + K * 7 + N)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16)
    w = (torch.randn(N, K, generator=g) * 0.05).to(torch.bfloat16)
    b = torch.randn(N, generator=g).to(torch.bfloat16)
    ref = quantized_linear_reference(x, w, b, fmt)
    return x, w, b, ref


@pytest.mark.parametrize("M,K,N", GEMM_SHAPES)
@pytest.mark.parametrize("variant", ["tma-auto", "tma", "tma-store-sub", "tma-flat", "pointer"])
def test_int8_gemm_gpu(M, K, N, variant):
    from sixbit_tune.kernels.gemm_int8 import int8_gemm

    xc, wc, bc, refc = _case(M, K, N, "int8")
    qx, sx = int8.quantize(xc)
    qw, sw = int8.quantize(wc)
    ref, b = refc.cuda(), bc.cuda()
    qx, sx, qw, sw = qx.cuda(), sx.cuda(), qw.cuda(), sw.cuda()
    y32 = int8_gemm(qx, qw, sx, sw, b, torch.float32, variant=variant)
    # The only freedom the compiler has is fusing the scale multiply and the bias add into one FMA.
    slack = 2.0**-23 * (ref.abs() + b.float().abs())
    assert bool(((y32 - ref).abs() <= slack).all())
    y = int8_gemm(qx, qw, sx, sw, b, torch.bfloat16, variant=variant)
    assert bool(((y.float() - ref).abs() <= 2.0**-8 * ref.abs() + slack).all())
    assert float((y == ref.to(torch.bfloat16)).float().mean()) > 0.99


@pytest.mark.parametrize("M,K,N", GEMM_SHAPES)
@pytest.mark.parametrize("form", ["auto", "deq", "deq-tma-swap", "packed"])
def test_nvfp4_gemm_gpu(M, K, N, form):
    from sixbit_tune.kernels.gemm_nvfp4 import nvfp4_linear_emulated

    xc, wc, bc, ref = _case(M, K, N, "nvfp4")
    a, wq = nvfp4.quantize(xc), nvfp4.quantize(wc)
    wq_gpu = nvfp4.NVFP4Tensor(wq.data.cuda(), wq.block_scales.cuda(), wq.global_scale.cuda(), wq.shape,
                               wq.orig_dtype)
    y, amax = nvfp4_linear_emulated(xc.cuda(), wq_gpu, bc.cuda(), torch.bfloat16, form=form)
    assert float(amax) == float(xc.float().abs().max())
    mag = a.dequantize().abs() @ wq.dequantize().abs().T
    bound = K * 2.0**-23 * mag + 2.0**-8 * ref.abs()
    assert bool(((y.float().cpu() - ref).abs() <= bound).all())


def test_dispatch_paths_and_linear_gpu():
    from sixbit_tune.kernels import kernel_path, quantize_weight, quantized_linear

    assert kernel_path("int8", "cuda") == "triton-int8"
    major = torch.cuda.get_device_capability()[0]
    assert kernel_path("nvfp4", "cuda") in (
        ("triton-nvfp4-emulated",) if major < 10 else ("native-nvfp4", "triton-nvfp4-emulated")
    )
    x = torch.randn(3, 333, 1920, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(640, 1920, device="cuda", dtype=torch.bfloat16) * 0.05
    for fmt in ("int8", "nvfp4"):
        qw = quantize_weight(w, fmt)
        y = quantized_linear(x, qw, None, fmt)
        qw_cpu = tuple(t.cpu() for t in qw) if fmt == "int8" else nvfp4.NVFP4Tensor(
            qw.data.cpu(), qw.block_scales.cpu(), qw.global_scale.cpu(), qw.shape, qw.orig_dtype)
        ref = quantized_linear(x.cpu(), qw_cpu, None, fmt, torch.float32, preference="reference").cuda()
        assert y.shape == (3, 333, 640) and y.dtype == torch.bfloat16
        rel = float((y.float() - ref).norm() / ref.norm())
        assert rel < 4e-3, rel


def test_gpu_fallback_is_logged_once(monkeypatch, caplog):
    from sixbit_tune.kernels import dispatch

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # makes Triton unusable on CUDA for this query
    monkeypatch.setattr(dispatch, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="sixbit_tune.kernels"):
        assert dispatch.kernel_path("int8", "cuda") == "reference"
        assert dispatch.kernel_path("int8", "cuda") == "reference"
    msgs = [r for r in caplog.records if "falling back to the PyTorch reference" in r.getMessage()]
    assert len(msgs) == 1
