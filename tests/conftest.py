"""Shared test fixtures. Tests mirror the source layout: tests/<component>/test_*.py."""

from __future__ import annotations

import os
import shutil

# Without a GPU the Triton kernels run in Triton's CPU interpreter. ``@triton.jit`` reads TRITON_INTERPRET when a
# kernel module is imported, and any test may be the first to import one: set it before anything is imported.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Keep CPU tests deterministic and light on the 2-core CI machine.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def profiled_tiny_store(tmp_path_factory):
    """A real profile + fit of tiny:wan (see tests/tiny_profile.py), built once per session: copy it, never write."""
    from tiny_profile import build_profiled_store

    return build_profiled_store(tmp_path_factory.mktemp("profiled") / "store")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the H200 through the device tool)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
