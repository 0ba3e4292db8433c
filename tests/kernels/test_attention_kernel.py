"""FP8 attention: the Triton kernels against the reference numerics of ``sixbit_tune.formats.attention``.

Tiers: the Q/K/V quantizers are bit-exact (codes compared as bytes, scales exactly); the attention output matches
the reference to the rounding of the probabilities (the kernel's online softmax rounds them against a running
maximum); both stay close to full-precision attention.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sixbit_tune.errors import NonFiniteError
from sixbit_tune.formats import attention as ref

SHAPES = [(1, 2, 37, 16), (2, 1, 50, 32), (1, 1, 16, 64), (1, 3, 21, 16)]


def _inputs(shape, seed, k_offset=3.0, peak=1.0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(shape, generator=g) * peak
    k = torch.randn(shape, generator=g) + k_offset  # a channel offset that K smoothing must remove
    v = torch.randn(shape, generator=g)
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _same_bits(name, a: torch.Tensor, b: torch.Tensor) -> None:
    """Assert bit equality; the message counts the differing elements and shows the first few."""
    assert a.shape == b.shape, (name, a.shape, b.shape)
    diff = _bytes(a) != _bytes(b)
    if diff.any():
        idx = diff.nonzero()[:5].tolist()
        shown = [(i, a[tuple(i)].float().item(), b[tuple(i)].float().item()) for i in idx]
        raise AssertionError(f"{name}: {int(diff.sum())} of {diff.numel()} differ; first (index, reference, "
                             f"kernel): {shown}")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_reference_is_close_to_full_precision_attention():
    for shape in SHAPES:
        q, k, v = _inputs(shape, seed=1, peak=2.0)
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        assert _rel(ref.attention_8bit_reference(q, k, v), exact) < 5e-2, shape


def test_reference_rejects_bad_input():
    q, k, v = _inputs((1, 1, 8, 16), seed=2)
    with pytest.raises(ValueError, match="batch, heads, tokens, head_dim"):
        ref.attention_8bit_reference(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="do not match"):
        ref.attention_8bit_reference(q, k[..., :8], v)
    q[0, 0, 3, 5] = float("nan")
    with pytest.raises(NonFiniteError, match="attention q"):
        ref.attention_8bit_reference(q, k, v)


@pytest.mark.parametrize("qk_format", ["int8", "fp8"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_quantizers_are_bit_exact(interp, shape, qk_format):
    from sixbit_tune.kernels import attention as kern

    q, k, v = _inputs(shape, seed=3)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # strided input, as diffusers hands it over
    q[0, 0, 1] = 0.0  # a zero row: scale 0, zero codes
    for name, a, b in zip(("q codes", "q scale", "k codes", "k scale", "v codes", "v scale"),
                          ref.quantize_qkv(q, k, v, qk_format), kern.quantize_qkv(q, k, v, qk_format)):
        _same_bits(f"{name} {shape}", a, b)


@pytest.mark.parametrize("qk_format,exact_bound", [("int8", 6e-2), ("fp8", 1.2e-1)])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_reference(interp, shape, qk_format, exact_bound):
    from sixbit_tune.kernels import attention as kern

    for seed, peak in ((4, 1.0), (5, 4.0)):
        q, k, v = _inputs(shape, seed=seed, peak=peak)
        out = kern.attention_8bit(q, k, v, qk_format=qk_format)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert torch.isfinite(out).all()
        assert _rel(out, ref.attention_8bit_reference(q, k, v, qk_format=qk_format)) < 3e-2, (shape, peak)
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        assert _rel(out, exact) < exact_bound, (shape, peak)


def test_unknown_qk_format_is_refused():
    q, k, v = _inputs((1, 1, 8, 16), seed=8)
    with pytest.raises(ValueError, match="unknown Q·Kᵀ format 'int4'"):
        ref.attention_8bit_reference(q, k, v, qk_format="int4")


def test_kernel_rejects_head_dims_it_does_not_take():
    pytest.importorskip("triton")
    from sixbit_tune.kernels import attention as kern

    q, k, v = _inputs((1, 1, 8, 24), seed=6)
    with pytest.raises(ValueError, match="head_dim"):
        kern.attention_8bit(q, k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 4, 1000, 128), (2, 3, 777, 64), (1, 2, 4099, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_kernel_on_gpu(shape):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a CUDA GPU with FP8 tensor cores (compute capability 8.9 or newer)")
    from sixbit_tune.kernels import attention as kern

    q, k, v = _inputs(shape, seed=7, dtype=torch.bfloat16, device="cuda")
    for qk_format in ("int8", "fp8"):
        for name, a, b in zip(("q codes", "q scale", "k codes", "k scale", "v codes", "v scale"),
                              ref.quantize_qkv(q, k, v, qk_format), kern.quantize_qkv(q, k, v, qk_format)):
            _same_bits(f"{qk_format} {name} {shape}", a, b)
        out = kern.attention_8bit(q, k, v, qk_format=qk_format)
        assert _rel(out, ref.attention_8bit_reference(q, k, v, qk_format=qk_format)) < 3e-2, qk_format
        assert _rel(out, F.scaled_dot_product_attention(q, k, v)) < 1.2e-1, qk_format
    out = kern.attention_8bit(q, k, v)
    compiled = torch.compile(lambda a, b, c: kern.attention_8bit(a, b, c) * 2, fullgraph=True)
    assert torch.equal(compiled(q, k, v), out * 2)
