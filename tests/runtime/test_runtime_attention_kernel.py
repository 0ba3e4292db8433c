"""8-bit attention through the processors on the Triton kernel path (``sixbit::attention_8bit``): in Triton's CPU
interpreter with ``preference="triton"``, and on a CUDA GPU with the default preference.

The kernel matches the reference numerics to the rounding of the probabilities (its online softmax rounds them
against a running maximum), so the model output is compared with the reference run to the bound the kernel tests
use for one attention call."""

from __future__ import annotations

import pytest
import torch
from test_runtime_attention import OpCalls, model_8bit_capable, reference_run, run

from sixbit_tune.models.adapters import get_adapter
from sixbit_tune.models.tiny import tiny_transformer_inputs
from sixbit_tune.runtime.attention import attention_path, install_attention

KERNEL_VS_REFERENCE = 3e-2  # tests/kernels/test_attention_kernel.py: one attention call, kernel against reference


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _interpreted() -> bool:
    try:
        from sixbit_tune.kernels import attention as kern
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(kern._attn_fwd_kernel, InterpretedFunction)


def test_auto_uses_the_reference_on_the_cpu_and_triton_preference_the_kernel():
    assert attention_path("cpu", "auto") == "reference"
    assert attention_path("cpu", "reference") == "reference"
    if _interpreted():
        assert attention_path("cpu", "triton") == "triton"
    else:
        with pytest.raises(RuntimeError, match="cannot run on cpu"):
            attention_path("cpu", "triton")


def test_triton_preference_runs_the_kernel_through_the_processors_in_the_interpreter():
    if torch.cuda.is_available() or not _interpreted():
        pytest.skip("needs Triton's CPU interpreter (TRITON_INTERPRET=1 before the kernels are imported)")
    model = model_8bit_capable("wan")
    inputs = tiny_transformer_inputs("wan", batch=1)
    expected, computations = reference_run(model, inputs, "int8", ("self", "joint"))
    with install_attention(model, preference="triton") as handle:
        out = run(model, inputs)
        assert handle.stats().paths == {"triton": computations}
        with OpCalls() as ops:
            run(model, inputs)
    assert ops.calls.get("sixbit.attention_8bit.default") == computations
    assert "sixbit.attention_8bit_reference.default" not in ops.calls
    assert 0 < _rel(out, expected) < KERNEL_VS_REFERENCE


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["wan", "cogvideox", "hunyuanvideo"])
def test_kernel_path_on_gpu(family):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a CUDA GPU with FP8 tensor cores (compute capability 8.9 or newer)")
    model = model_8bit_capable(family).to(device="cuda", dtype=torch.bfloat16)
    inputs = tiny_transformer_inputs(family, batch=2, device="cuda", dtype=torch.bfloat16)
    plain = run(model, inputs)
    expected, computations = reference_run(model, inputs, "int8", ("self", "joint"))
    with install_attention(model) as handle:
        out = run(model, inputs)
        assert handle.stats().paths == {"triton": computations}
        assert _rel(out, expected) < KERNEL_VS_REFERENCE
        if family != "hunyuanvideo":  # its key-padding mask breaks the graph by design
            for ref in get_adapter(model).blocks():
                ref.module.compile(fullgraph=True)
            try:
                assert _rel(run(model, inputs), out) < KERNEL_VS_REFERENCE
            finally:
                for ref in get_adapter(model).blocks():
                    ref.module.__dict__.pop("_compiled_call_impl", None)
    assert torch.equal(run(model, inputs), plain)
