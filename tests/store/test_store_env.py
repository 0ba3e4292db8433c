"""Environment helpers: versions of what shapes results, and the GPU through NVML (None without a driver)."""

from __future__ import annotations

from importlib import metadata

import pynvml

from sixbit_tune.store import GPU_KEYS, gpu_info, versions


def test_versions_names_the_packages_that_shape_results():
    v = versions()
    for name in ("python", "torch", "diffusers", "triton", "sixbit_tune", "duckdb"):
        assert name in v
    assert v["torch"] == metadata.version("torch") and v["sixbit_tune"] == metadata.version("sixbit-tune")


def _nvml_works() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


def test_gpu_info_matches_what_nvml_can_see():
    info = gpu_info()
    if not _nvml_works():
        assert info is None, "without an NVIDIA driver gpu_info() must return None"
    else:  # a machine with a driver: the keys begin_run stores, real values
        assert info is not None and set(info) == set(GPU_KEYS)
        assert info["name"] and info["memory_bytes"] > 0
    assert gpu_info(cuda_index=10_000) is None
