"""What a run records about its environment: the GPU (through NVML) and package versions.

Both functions are cheap and never import torch themselves (they use torch only if the caller already did).
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

PACKAGES = ("torch", "diffusers", "triton", "transformers", "optuna", "duckdb", "sixbit-tune")


def versions() -> dict[str, str | None]:
    """Installed versions of the packages that shape results, plus Python and, if torch is loaded, its CUDA.

    Returns:
        ``{"python": "3.11.9", "torch": "2.13.0", "diffusers": ..., "triton": ..., "transformers": ...,
        "optuna": ..., "duckdb": ..., "sixbit_tune": ..., "torch_cuda": "13.0" | None, "platform": ...}``;
        a package that is not installed maps to None.
    """
    out: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name.replace("-", "_")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name.replace("-", "_")] = None
    torch = sys.modules.get("torch")
    out["torch_cuda"] = getattr(getattr(torch, "version", None), "cuda", None) if torch is not None else None
    return out


def gpu_info(cuda_index: int = 0) -> dict[str, Any] | None:
    """Describe CUDA device ``cuda_index`` through NVML, or return None without an NVIDIA GPU/driver.

    The CUDA index is mapped to the NVML device honouring ``CUDA_VISIBLE_DEVICES`` (through torch when it is
    already imported, else by parsing the variable).

    Returns:
        ``{"name": "NVIDIA H200", "driver": "570.124.06", "memory_bytes": 150754820096,
        "compute_capability": "9.0", "uuid": "GPU-..."}`` (the keys ``StoreWriter.begin_run`` stores), or None
        when nvidia-ml-py is missing, NVML cannot initialise (no driver) or the device does not exist.
    """
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        handle = _nvml_handle(pynvml, cuda_index)
        if handle is None:
            return None
        name = pynvml.nvmlDeviceGetName(handle)
        driver = pynvml.nvmlSystemGetDriverVersion()
        uuid = pynvml.nvmlDeviceGetUUID(handle)
        memory = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        try:
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            cc = f"{major}.{minor}"
        except pynvml.NVMLError:
            cc = None
        return {
            "name": _text(name),
            "driver": _text(driver),
            "memory_bytes": memory,
            "compute_capability": cc,
            "uuid": _text(uuid),
        }
    except pynvml.NVMLError:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _text(v: str | bytes) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _nvml_handle(pynvml: Any, cuda_index: int) -> Any:
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                return pynvml.nvmlDeviceGetHandleByIndex(torch.cuda._get_nvml_device_index(cuda_index))
        except (AttributeError, RuntimeError, ValueError):
            pass  # fall back to parsing CUDA_VISIBLE_DEVICES below
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or visible.strip() == "":
        if visible is not None:
            return None  # CUDA_VISIBLE_DEVICES="" hides every device
        if cuda_index >= pynvml.nvmlDeviceGetCount():
            return None
        return pynvml.nvmlDeviceGetHandleByIndex(cuda_index)
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if cuda_index >= len(entries):
        return None
    entry = entries[cuda_index]
    if entry.isdigit():
        return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
    if entry.startswith(("GPU-", "MIG-")):
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            if _text(pynvml.nvmlDeviceGetUUID(h)).startswith(entry):
                return h
    return None
