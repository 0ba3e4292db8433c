"""Kernel tests: on a machine without CUDA, Triton kernels run in the CPU interpreter.

``TRITON_INTERPRET`` must be set before the kernel modules are imported (``@triton.jit`` reads it then), so it is
set here, at collection time, and only when there is no CUDA device (on the H200 the ``gpu`` tests run the
compiled kernels instead and the interpreter tests are skipped).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def interp():
    """Skip unless the Triton kernels really are interpreted in this process."""
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the compiled kernels are tested by the gpu tests instead")
    pytest.importorskip("triton")
    from sixbit_tune.kernels import quant
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(quant._int8_rows_kernel, InterpretedFunction):
        pytest.skip("sixbit_tune.kernels.quant was imported before TRITON_INTERPRET=1 was set")
    return True
