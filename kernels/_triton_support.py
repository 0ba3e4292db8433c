"""Whether Triton can be used here, and small launch helpers shared by the kernel modules.

Importing this module never fails: without Triton, :data:`HAS_TRITON` is False and the kernel modules are not
imported by :mod:`sixbit_tune.kernels.dispatch`.
"""

from __future__ import annotations

import os

try:  # pragma: no cover - depends on the environment
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # ImportError, or a broken install that fails on import
    HAS_TRITON = False


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, read at launch time)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable_on(device) -> bool:
    """Whether a Triton kernel can take tensors on ``device``: CUDA with Triton, or CPU under the interpreter."""
    if not HAS_TRITON:
        return False
    dev_type = getattr(device, "type", str(device).split(":")[0])
    if dev_type == "cuda":
        return not interpreting()
    return dev_type == "cpu" and interpreting()


def launcher(kernel):
    """``kernel`` itself for an eager launch; ``torch.library.wrap_triton(kernel)`` while PyTorch traces the code
    around it (a fake, functional or proxy dispatch mode is active, as when ``torch.compile`` decomposes a
    ``triton_op``), so that the launch is recorded in the graph instead of running on fake tensors."""
    import torch

    keys = torch._C._TorchDispatchModeKey
    if any(torch._C._get_dispatch_mode(k) is not None for k in (keys.PROXY, keys.FUNCTIONAL, keys.FAKE)):
        from torch.library import wrap_triton

        return wrap_triton(kernel)
    return kernel


_ALLOCATOR_SET = False


def ensure_tma_allocator() -> None:
    """Install the scratch allocator that ``tl.make_tensor_descriptor`` needs (once per process)."""
    global _ALLOCATOR_SET
    if _ALLOCATOR_SET:
        return
    import torch
    import triton

    def _alloc(size: int, alignment: int, stream):
        dev = "cpu" if interpreting() else "cuda"
        return torch.empty(size, dtype=torch.int8, device=dev)

    triton.set_allocator(_alloc)
    _ALLOCATOR_SET = True


def num_sms(device) -> int:
    """Multiprocessor count of a CUDA device (a small number under the interpreter)."""
    import torch

    if getattr(device, "type", "cpu") != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count
