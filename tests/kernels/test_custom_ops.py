"""The kernel entry points as torch custom ops: opcheck of every ``sixbit::`` op, fullgraph compilation of
``quantized_linear`` / ``quantize_activation`` with zero graph breaks (CPU: reference and CPU ``_scaled_mm`` paths),
compiled outputs equal to eager, NaN checks that survive compilation."""

from __future__ import annotations

import os

import pytest
import torch
import torch._dynamo
from sixbit_tune.kernels import ops

from sixbit_tune import kernels
from sixbit_tune.errors import NonFiniteError
from sixbit_tune.formats import fp8, int8, nvfp4

OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
#: opcheck's tests for ops with float8 inputs: PyTorch's schema checker compares every float8 tensor it sees inside
#: the op with a multiplication that has no float8 CPU kernel, so ``test_schema`` cannot run on them.
FP8_INPUTS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _x(M, K, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(M, K, generator=g) * 3).to(dtype)


# ------------------------------------------------------------------------------------------------ opcheck


@pytest.mark.parametrize("M,K", [(1, 1), (5, 33), (17, 64), (0, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_row_quantizers(M, K, dtype):
    x = _x(M, K, dtype)
    for op in (torch.ops.sixbit.int8_quantize_reference, torch.ops.sixbit.fp8_quantize_reference):
        torch.library.opcheck(op, (x,))
    torch.library.opcheck(torch.ops.sixbit.finite_copy, (x, "activation"))


@pytest.mark.parametrize("M,K", [(1, 16), (5, 48), (33, 64)])
def test_opcheck_nvfp4_quantizer(M, K):
    torch.library.opcheck(torch.ops.sixbit.nvfp4_quantize_reference, (_x(M, K, torch.bfloat16),))


@pytest.mark.parametrize("M,N,K", [(1, 1, 16), (7, 24, 48), (33, 5, 64)])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck_reference_linears(M, N, K, out_dtype, with_bias):
    x = _x(M, K, torch.bfloat16, seed=1)
    w = _x(N, K, seed=2) * 0.1
    b = _x(1, N, seed=3)[0] if with_bias else None
    wq, ws = int8.quantize(w)
    torch.library.opcheck(torch.ops.sixbit.int8_linear_reference, (x, wq, ws, b, out_dtype))
    wq, ws = fp8.quantize(w)
    torch.library.opcheck(torch.ops.sixbit.fp8_linear_reference, (x, wq, ws, b, out_dtype), test_utils=FP8_INPUTS)
    t = nvfp4.quantize(w)
    torch.library.opcheck(torch.ops.sixbit.nvfp4_linear_reference,
                          (x, t.data, t.block_scales, t.global_scale, b, out_dtype), test_utils=FP8_INPUTS)


def test_reference_ops_equal_the_formats():
    x, w, b = _x(9, 48, torch.bfloat16), _x(20, 48) * 0.1, _x(1, 20)[0]
    q, s = ops.fp8_quantize_reference(x)
    rq, rs = fp8.quantize(x)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
    d, bs, gs = ops.nvfp4_quantize_reference(x)
    t = nvfp4.quantize(x)
    assert torch.equal(d, t.data) and torch.equal(bs.view(torch.uint8), t.block_scales.view(torch.uint8))
    assert torch.equal(gs, t.global_scale)
    from sixbit_tune.formats import quantized_linear_reference

    for fmt, mod, op in (("int8", int8, ops.int8_linear_reference), ("fp8", fp8, ops.fp8_linear_reference)):
        wq, ws = mod.quantize(w)
        assert torch.equal(op(x, wq, ws, b, torch.float32), quantized_linear_reference(x, w, b, fmt))


# --------------------------------------------------------------------------------------- fullgraph compile


def _count_graphs(fn, *args):
    torch._dynamo.reset()
    ex = torch._dynamo.explain(fn)(*args)
    return ex.graph_count, ex.graph_break_count, [str(r.reason) for r in ex.break_reasons]


CASES = [("int8", "reference"), ("nvfp4", "reference"), ("fp8", "reference"), ("fp8", "triton")]


@pytest.mark.parametrize("fmt,pref", CASES)
@pytest.mark.parametrize("shape", [(2, 7, 64), (3, 48)], ids=str)
def test_quantized_linear_compiles_fullgraph(fmt, pref, shape):
    K = shape[-1]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    w, b = _x(40, K, seed=5) * 0.1, _x(1, 40, seed=6)[0]
    qw = kernels.quantize_weight(w, fmt, preference="reference")
    assert kernels.kernel_path(fmt, "cpu", pref) == ("scaled-mm-fp8" if pref == "triton" else "reference")

    def block(x):  # work before and after the linear (exact in any order, so compiled == eager bit for bit)
        h = torch.relu(x) * 2 - x
        return kernels.quantized_linear(h, qw, b, fmt, torch.float32, preference=pref) * 0.5

    graphs, breaks, reasons = _count_graphs(block, x)
    assert (graphs, breaks) == (1, 0), reasons
    torch._dynamo.reset()
    y = torch.compile(block, fullgraph=True)(x)
    assert y.shape == (*shape[:-1], 40) and y.dtype == torch.float32
    assert torch.equal(y, block(x))


@pytest.mark.parametrize("fmt,pref", CASES)
def test_quantize_activation_compiles_fullgraph(fmt, pref):
    x = _x(5, 32, torch.bfloat16, seed=7)

    def f(x):
        out = kernels.quantize_activation(x * 2, fmt, preference=pref)
        return (out.data, out.block_scales, out.global_scale) if fmt == "nvfp4" else out

    graphs, breaks, reasons = _count_graphs(f, x)
    assert (graphs, breaks) == (1, 0), reasons
    torch._dynamo.reset()
    got, want = torch.compile(f, fullgraph=True)(x), f(x)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 else a,
                                                  b.view(torch.uint8) if b.dtype.itemsize == 1 else b)


@pytest.mark.parametrize("fmt,pref", CASES)
def test_nonfinite_raises_inside_a_compiled_graph(fmt, pref):
    w = _x(8, 32, seed=8)
    qw = kernels.quantize_weight(w, fmt, preference="reference")
    torch._dynamo.reset()
    f = torch.compile(lambda x: kernels.quantized_linear(x * 1.0, qw, None, fmt, preference=pref), fullgraph=True)
    x = _x(4, 32, seed=9)
    f(x)
    x[2, 3] = float("nan")
    with pytest.raises(NonFiniteError):
        f(x)
    # without the check a kernel path runs through (the runtime's choice: one check per step); the reference
    # always checks
    g = torch.compile(lambda x: kernels.quantized_linear(x * 1.0, qw, None, fmt, preference=pref,
                                                         check_finite=False), fullgraph=True)
    if pref == "reference":
        with pytest.raises(NonFiniteError):
            g(x)
    else:
        assert g(x).shape == (4, 8)


# ------------------------------------------------------------------------------- FP8 through _scaled_mm (CPU)


def _fp8_bound(x2, w, ref, out_dtype, acc_rel=0.0):
    """float32 accumulation in another order than the exact reference: at most K * 2**-24 * sum|products| (times
    the scales), plus a rounding of the output (twice for the bf16 intermediate of non-bf16 outputs off sm_90).
    ``acc_rel``: a further relative error of the accumulation, for tensor cores that keep fewer bits."""
    xq, xs = fp8.quantize(x2)
    wq, ws = fp8.quantize(w)
    mag = (xq.double().abs() @ wq.double().abs().T) * (xs.double()[:, None] * ws.double()[None, :])
    ulp = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[out_dtype]
    return (x2.shape[1] * 2.0**-24 + acc_rel) * mag + 2 * ulp * ref.double().abs() + 1e-30


@pytest.mark.parametrize("M,N,K", [(1, 16, 16), (7, 24, 48), (33, 5, 70), (4, 130, 33)])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16], ids=str)
def test_fp8_scaled_mm_matches_reference(M, N, K, out_dtype, bias_dtype):
    from sixbit_tune.kernels.scaled_mm_fp8 import fp8_linear_scaled_mm

    from sixbit_tune.formats import quantized_linear_reference

    x = _x(M, K, torch.bfloat16, seed=10)
    x[0, : K // 2] *= 40  # one token with larger values: per-token scales differ
    if M > 2:
        x[2] = 0  # a zero row: scale 0
    w = _x(N, K, seed=11) * 0.1
    b = None if bias_dtype is None else _x(1, N, seed=12)[0].to(bias_dtype)
    wq, ws = fp8.quantize(w)
    y = fp8_linear_scaled_mm(x, wq, ws, b, out_dtype)
    ref = quantized_linear_reference(x, w, b, "fp8")
    assert y.shape == (M, N) and y.dtype == out_dtype
    err = (y.double() - ref.double()).abs()
    assert bool((err <= _fp8_bound(x, w, ref, out_dtype)).all()), float(err.max())


def test_fp8_dispatch_paths_agree():
    x = torch.randn(3, 11, 64, generator=torch.Generator().manual_seed(13)).to(torch.bfloat16)
    w, b = _x(40, 64, seed=14), _x(1, 40, seed=15)[0]
    qw = kernels.quantize_weight(w, "fp8", preference="triton")
    rq = kernels.quantize_weight(w, "fp8", preference="reference")
    assert torch.equal(qw[0].view(torch.uint8), rq[0].view(torch.uint8)) and torch.equal(qw[1], rq[1])
    qa, sa = kernels.quantize_activation(x, "fp8", preference="triton")
    ra, rs = kernels.quantize_activation(x, "fp8", preference="reference")
    assert qa.shape == x.shape and sa.shape == x.shape[:-1]
    assert torch.equal(qa.view(torch.uint8), ra.view(torch.uint8)) and torch.equal(sa, rs)
    y = kernels.quantized_linear(x, qw, b, None, torch.float32, preference="triton")
    ref = kernels.quantized_linear(x, qw, b, "fp8", torch.float32, preference="reference")
    assert y.shape == (3, 11, 40)
    bound = _fp8_bound(x.reshape(-1, 64), w, ref.reshape(-1, 40), torch.float32)
    assert bool(((y - ref).abs().reshape(-1, 40).double() <= bound).all())
    x[1, 2, 3] = float("inf")
    with pytest.raises(NonFiniteError, match="activation"):
        kernels.quantized_linear(x, qw, b, preference="triton")
    with pytest.raises(ValueError, match="does not match the qweight, which is fp8"):
        kernels.quantized_linear(x, qw, b, "int8")


# --------------------------------------------------------------------------------- Triton ops (interpreter)


def test_opcheck_triton_ops_interpreted(interp):
    from sixbit_tune.kernels import triton_ops  # noqa: F401  (registers the ops)

    # The decomposition test traces the kernel launches, which the interpreter cannot do on fake tensors; the
    # gpu test below runs it on compiled kernels.
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    x = _x(7, 48, seed=16)
    w = _x(20, 48, seed=17) * 0.1
    torch.library.opcheck(torch.ops.sixbit.int8_quantize_triton, (x,), test_utils=tests)
    torch.library.opcheck(torch.ops.sixbit.nvfp4_quantize_triton, (x,), test_utils=tests)
    xq, xs = int8.quantize(x)
    wq, ws = int8.quantize(w)
    for b in (None, _x(1, 20, seed=18)[0]):
        torch.library.opcheck(torch.ops.sixbit.int8_gemm_triton, (xq, wq, xs, ws, b, torch.bfloat16),
                              test_utils=tests)
        t = nvfp4.quantize(w)
        torch.library.opcheck(torch.ops.sixbit.nvfp4_linear_triton,
                              (x, t.data, t.block_scales, t.global_scale, b, torch.float32),
                              test_utils=tuple(u for u in tests if u in FP8_INPUTS))


@pytest.mark.parametrize("fmt", ["int8", "nvfp4"])
def test_triton_paths_trace_fullgraph_interpreted(interp, fmt):
    """Dynamo traces the dispatch and the Triton ops as one graph; the ``eager`` backend then runs that graph's ops
    (Inductor cannot compile interpreted kernels; the gpu test compiles them)."""
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(27))
    w, b = _x(40, 64, seed=28) * 0.1, _x(1, 40, seed=29)[0]
    qw = kernels.quantize_weight(w, fmt, preference="reference")
    assert kernels.kernel_path(fmt, "cpu", "triton").startswith("triton-")

    def block(x):
        return kernels.quantized_linear(torch.relu(x) * 2 - x, qw, b, fmt, torch.float32, preference="triton") * 0.5

    graphs, breaks, reasons = _count_graphs(block, x)
    assert (graphs, breaks) == (1, 0), reasons
    torch._dynamo.reset()
    assert torch.equal(torch.compile(block, backend="eager", fullgraph=True)(x), block(x))


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(157, 1920, 1920), (4096, 8960, 1536), (7, 24, 40)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_fp8_scaled_mm_gpu(M, N, K, out_dtype):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a CUDA GPU of compute capability >= 8.9")
    from sixbit_tune.formats import quantized_linear_reference

    assert kernels.kernel_path("fp8", "cuda") == "scaled-mm-fp8"
    x = _x(M, K, torch.bfloat16, seed=19)
    w = _x(N, K, seed=20) * 0.05
    b = _x(1, N, seed=21)[0].to(torch.bfloat16)
    qw = kernels.quantize_weight(w.cuda(), "fp8")
    rq, rs = fp8.quantize(w)  # the reference on the CPU (exact IEEE divisions)
    assert torch.equal(qw[0].view(torch.uint8).cpu(), rq.view(torch.uint8)) and torch.equal(qw[1].cpu(), rs)
    qa, sa = kernels.quantize_activation(x.cuda(), "fp8")
    ra, ras = fp8.quantize(x)
    assert torch.equal(qa.view(torch.uint8).cpu(), ra.view(torch.uint8)) and torch.equal(sa.cpu(), ras)
    y = kernels.quantized_linear(x.cuda(), qw, b.cuda(), "fp8", out_dtype).cpu()
    ref = quantized_linear_reference(x, w, b, "fp8")
    err = (y.double() - ref.double()).abs()
    # Hopper's FP8 tensor cores add products with about 14 significant bits before the float32 promotion that
    # use_fast_accum=False keeps: 2**-12 relative of the sum of |products| covers that
    assert bool((err <= _fp8_bound(x, w, ref, out_dtype, acc_rel=2.0**-12)).all()), float(err.max())


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "nvfp4", "fp8"])
def test_quantized_linear_compiles_fullgraph_gpu(fmt):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from sixbit_tune.kernels._triton_support import interpreting

    if interpreting():
        pytest.skip("TRITON_INTERPRET is set")
    K, N = 256, 512
    x = _x(300, K, torch.bfloat16, seed=22).cuda()
    w, b = (_x(N, K, seed=23) * 0.1).cuda(), _x(1, N, seed=24)[0].to(torch.bfloat16).cuda()
    qw = kernels.quantize_weight(w, fmt)
    assert kernels.kernel_path(fmt, "cuda") != "reference"

    def block(x):
        h = torch.nn.functional.layer_norm(x.float(), (K,)).to(x.dtype) * 1.5
        return kernels.quantized_linear(h, qw, b, fmt, check_finite=False) + 1.0

    graphs, breaks, reasons = _count_graphs(block, x)
    assert (graphs, breaks) == (1, 0), reasons
    torch._dynamo.reset()
    y = torch.compile(block, fullgraph=True)(x)
    ref = block(x)
    # Compiled bf16 layer norm rounds a few activations differently; the activation quantizer then picks other
    # codes for them. NVFP4's codes are 1/6 of a block's range apart: on the H100 that moved the output by 2.25%
    # (relative L2) against 1e-2 for the 8-bit formats.
    bound = 5e-2 if fmt == "nvfp4" else 1e-2
    assert float((y.float() - ref.float()).norm() / ref.float().norm()) < bound
    # On one and the same input the compiled op is the eager one.
    h = torch.nn.functional.layer_norm(x.float(), (K,)).to(x.dtype)
    lin = torch.compile(lambda t: kernels.quantized_linear(t, qw, b, fmt, check_finite=False), fullgraph=True)
    eager = kernels.quantized_linear(h, qw, b, fmt, check_finite=False)
    assert float((lin(h).float() - eager.float()).norm() / eager.float().norm()) < 1e-3


@pytest.mark.gpu
def test_opcheck_triton_ops_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("triton")
    from sixbit_tune.kernels._triton_support import interpreting

    if interpreting():
        pytest.skip("TRITON_INTERPRET is set")
    from sixbit_tune.kernels import triton_ops  # noqa: F401

    x = _x(37, 64, torch.bfloat16, seed=25).cuda()
    w = (_x(48, 64, seed=26) * 0.1).cuda()
    torch.library.opcheck(torch.ops.sixbit.int8_quantize_triton, (x,))
    torch.library.opcheck(torch.ops.sixbit.nvfp4_quantize_triton, (x,))
    xq, xs = int8.quantize(x)
    wq, ws = int8.quantize(w)
    torch.library.opcheck(torch.ops.sixbit.int8_gemm_triton, (xq, wq, xs, ws, None, torch.bfloat16))
    t = nvfp4.quantize(w)
    torch.library.opcheck(torch.ops.sixbit.nvfp4_linear_triton,
                          (x, t.data, t.block_scales, t.global_scale, None, torch.bfloat16), test_utils=FP8_INPUTS)


def test_fp8_fast_accumulation_is_a_process_switch_read_at_each_call():
    import subprocess
    import sys

    from sixbit_tune.kernels import scaled_mm_fp8

    assert scaled_mm_fp8.fast_accum() is False  # exact float32 accumulation unless asked
    with pytest.raises(TypeError, match="True or False"):
        scaled_mm_fp8.set_fast_accum("yes")
    x, w = _x(5, 32, torch.bfloat16, seed=20), _x(16, 32, seed=21)
    wq, ws = fp8.quantize(w)
    ref = scaled_mm_fp8.fp8_linear_scaled_mm(x, wq, ws, None, torch.float32)
    scaled_mm_fp8.set_fast_accum(True)
    try:
        assert scaled_mm_fp8.fast_accum() is True
        y = scaled_mm_fp8.fp8_linear_scaled_mm(x, wq, ws, None, torch.float32)
    finally:
        scaled_mm_fp8.set_fast_accum(False)
    assert bool(((y - ref).abs().double() <= _fp8_bound(x, w, ref, torch.float32)).all())
    code = "from sixbit_tune.kernels import scaled_mm_fp8; print(scaled_mm_fp8.fast_accum())"
    for value, expected in (("1", "True"), ("off", "False")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "SIXBIT_FP8_FAST_ACCUM": value}).stdout.strip()
        assert out == expected
