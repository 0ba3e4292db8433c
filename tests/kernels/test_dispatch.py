"""Dispatch API: path choice, argument checks, reference numerics, import without Triton (no kernels run)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from sixbit_tune.kernels import (
    KernelPreference,
    kernel_path,
    quantize_activation,
    quantize_weight,
    quantized_linear,
)

from sixbit_tune import kernels
from sixbit_tune.errors import NonFiniteError
from sixbit_tune.formats import nvfp4, quantized_linear_reference


def test_paths_on_cpu_default_to_reference():
    for fmt in ("int8", "nvfp4", "fp8"):
        assert kernel_path(fmt, "cpu") == "reference"
        assert kernel_path(fmt, "cpu", KernelPreference.REFERENCE) == "reference"
        assert kernel_path(fmt, torch.device("cpu"), "auto") in kernels.PATHS


def test_triton_preference_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="no Triton kernel can run on cpu"):
        kernel_path("int8", "cpu", "triton")


def test_process_wide_preference_roundtrip():
    old = kernels.get_kernel_preference()
    try:
        kernels.set_kernel_preference("reference")
        assert kernels.get_kernel_preference() is KernelPreference.REFERENCE
        with pytest.raises(ValueError, match="unknown kernel preference"):
            kernels.set_kernel_preference("fastest")
    finally:
        kernels.set_kernel_preference(old)


def test_bad_arguments_are_specific():
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="unknown quantization format"):
        kernel_path("fp4", "cpu")
    with pytest.raises(ValueError, match="unknown quantization format"):
        quantize_activation(x, "int4")
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        quantize_activation(x.double(), "int8")
    with pytest.raises(ValueError, match="K=40"):
        quantize_activation(torch.randn(3, 40), "nvfp4")
    qw = quantize_weight(torch.randn(8, 32), "int8")
    with pytest.raises(ValueError, match="does not match the qweight"):
        quantized_linear(x, qw, None, "nvfp4")
    with pytest.raises(ValueError, match="expects K=32"):
        quantized_linear(torch.randn(4, 48), qw)
    with pytest.raises(ValueError, match="bias must have shape"):
        quantized_linear(x, qw, torch.randn(9))
    with pytest.raises(TypeError, match="qweight must be"):
        quantized_linear(x, torch.randn(8, 32))
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.randn(2, 8, 32), "int8")


@pytest.mark.parametrize("fmt", ["int8", "nvfp4", "fp8"])
def test_reference_nonfinite_raises(fmt):
    x = torch.randn(4, 32)
    x[1, 2] = float("nan")
    with pytest.raises(NonFiniteError):
        quantize_activation(x, fmt, preference="reference")


@pytest.mark.parametrize("fmt", ["int8", "nvfp4", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_linear_equals_formats_reference(fmt, dtype):
    x = torch.randn(2, 7, 64).to(dtype)
    w = torch.randn(24, 64)
    b = torch.randn(24)
    qw = quantize_weight(w, fmt, preference="reference")
    y = quantized_linear(x, qw, b, fmt, torch.float32, preference="reference")
    assert torch.equal(y, quantized_linear_reference(x, w, b, fmt))
    assert quantized_linear(x, qw, b).dtype == dtype  # out_dtype defaults to x's
    if fmt == "nvfp4":
        assert isinstance(qw, nvfp4.NVFP4Tensor) and qw.shape == (24, 64)
    else:
        assert qw[0].dtype == {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[fmt] and qw[1].shape == (24,)


def test_import_and_reference_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "import sixbit_tune.kernels as k\n"
        "assert not k.HAS_TRITON\n"
        "x = torch.randn(3, 32); w = torch.randn(8, 32)\n"
        "for f in ('int8', 'nvfp4', 'fp8'):\n"
        "    assert k.kernel_path(f, 'cpu') == 'reference'\n"
        "    k.quantized_linear(x, k.quantize_weight(w, f), None, f)\n"
        "try:\n"
        "    k.kernel_path('int8', 'cpu', 'triton')\n"
        "except RuntimeError as e:\n"
        "    print('raised', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "raised" in out.stdout
