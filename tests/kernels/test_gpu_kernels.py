"""The compiled kernels on a CUDA GPU at DiT sizes, against sixbit_tune.formats (run on the H200).

The reference is evaluated on the CPU: on CUDA, PyTorch divides by a Python scalar as a multiplication by its
reciprocal (``x / 127.0``), which is not the IEEE division the formats specify, while the CPU divides exactly.
"""

from __future__ import annotations

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
    if K % 128 == 0:
        _, _, _, dsp, _ = quantize_nvfp4(x, write_dequant=True, write_packed=False, deq_dtype=torch.float16,
                                         deq_split=True)
        k = torch.arange(K)
        perm = (k // 128) * 128 + (k % 2) * 64 + (k % 128) // 2
        assert torch.equal(dsp.float().cpu()[:, perm], expect)


@pytest.mark.parametrize("M,K,N", GEMM_SHAPES)
@pytest.mark.parametrize("variant", ["tma", "tma-store", "tma-store-sub", "tma-flat", "pointer"])
def test_int8_gemm_gpu(M, K, N, variant):
    from sixbit_tune.kernels.gemm_int8 import int8_gemm

    from sixbit_tune.formats import quantized_linear_reference

    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.05
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    qx, sx = int8.quantize(x.cpu())
    qw, sw = int8.quantize(w.cpu())
    ref = quantized_linear_reference(x.cpu(), w.cpu(), b.cpu(), "int8").cuda()
    qx, sx, qw, sw = qx.cuda(), sx.cuda(), qw.cuda(), sw.cuda()
    y32 = int8_gemm(qx, qw, sx, sw, b, torch.float32, variant=variant)
    # The only freedom the compiler has is fusing the scale multiply and the bias add into one FMA.
    slack = 2.0**-23 * (ref.abs() + b.float().abs())
    assert bool(((y32 - ref).abs() <= slack).all())
    y = int8_gemm(qx, qw, sx, sw, b, torch.bfloat16, variant=variant)
    assert bool(((y.float() - ref).abs() <= 2.0**-8 * ref.abs() + slack).all())
    assert float((y == ref.to(torch.bfloat16)).float().mean()) > 0.99


@pytest.mark.parametrize("M,K,N", GEMM_SHAPES)
@pytest.mark.parametrize("form", ["packed", "packed-swap", "deq", "deq-swap"])
def test_nvfp4_gemm_gpu(M, K, N, form):
    from sixbit_tune.kernels.gemm_nvfp4 import nvfp4_gemm_deq, nvfp4_gemm_packed
    from sixbit_tune.kernels.quant import quantize_nvfp4

    from sixbit_tune.formats import quantized_linear_reference

    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.05
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    a, wq = nvfp4.quantize(x), nvfp4.quantize(w)
    swap = form.endswith("swap")
    if form.startswith("packed"):
        y = nvfp4_gemm_packed(a.data, a.block_scales, a.global_scale, wq.data, wq.block_scales, wq.global_scale,
                              b, torch.bfloat16, swap=swap)
    else:
        _, _, gs, deq, _ = quantize_nvfp4(x, write_dequant=True, write_packed=False)
        y = nvfp4_gemm_deq(deq, gs, wq.data, wq.block_scales, wq.global_scale, b, torch.bfloat16, swap=swap)
    ref = quantized_linear_reference(x, w, b, "nvfp4")
    mag = a.dequantize().abs() @ wq.dequantize().abs().T
    bound = K * 2.0**-23 * mag + 2.0**-8 * ref.abs()
    assert bool(((y.float() - ref).abs() <= bound).all())


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
