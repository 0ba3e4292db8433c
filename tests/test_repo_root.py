"""Processes started in the repository root see the installed packages, not the repository's folders.

The top-level ``kernels/`` folder is ``sixbit_tune.kernels``; the PyPI distribution ``kernels`` (installed by
transformers 5) has the same top-level name, and a process started in the root finds the folder first.
"""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_top_level_kernels_is_the_installed_distribution():
    res = _run("-c", "import kernels; print(kernels.__file__)")
    assert res.returncode == 0, res.stderr
    if _kernels_installed():
        assert not Path(res.stdout.strip()).is_relative_to(ROOT / "kernels"), res.stdout
    else:
        assert res.stdout.strip() == "None", res.stdout


def test_without_the_distribution_it_reads_as_not_installed():
    """``-S`` leaves site-packages off the path, as on a machine without the PyPI ``kernels``: transformers' check
    (spec found, no metadata, import it, no ``__version__`` and no ``__file__`` = a stray namespace) must say
    "not installed", and nothing below the folder may import as ``kernels.*``."""
    code = (
        "import sys; sys.path.insert(0, ''); import importlib, importlib.metadata, importlib.util\n"
        "assert importlib.util.find_spec('kernels') is not None\n"
        "try:\n    importlib.metadata.version('kernels'); raise SystemExit('a kernels distribution is visible')\n"
        "except importlib.metadata.PackageNotFoundError: pass\n"
        "m = importlib.import_module('kernels')\n"
        "assert getattr(m, '__version__', 'N/A') == 'N/A' and getattr(m, '__file__', None) is None, vars(m)\n"
        "try:\n    import kernels.dispatch\nexcept ModuleNotFoundError: print('ok')\n"
    )
    res = _run("-S", "-c", code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok", res.stdout


@pytest.mark.skipif(not _kernels_installed(), reason="the PyPI package 'kernels' is not installed here")
def test_transformers_integration_imports_from_the_root():
    res = _run("-c", "from kernels import CUDAProperties; from diffusers import WanTransformer3DModel; "
                     "import sixbit_tune.kernels as k; print(k.quantized_linear.__module__)")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "sixbit_tune.kernels.dispatch"


def test_package_kernels_still_import_from_the_root():
    res = _run("-c", "import sys; import sixbit_tune.kernels as k; "
                     "assert sys.modules['sixbit_tune.kernels'] is k; print(k.PATHS)")
    assert res.returncode == 0, res.stderr


def test_module_entry_point_runs_from_the_root():
    res = _run("-m", "sixbit_tune", "--help")
    assert res.returncode == 0, res.stderr
    assert "profile" in res.stdout
