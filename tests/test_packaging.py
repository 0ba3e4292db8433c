"""Packaging: the package layout (kernels/ and dashboard/ as subpackages of sixbit_tune) in editable and wheel installs; the runtime stays light; the CLI answers."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("optuna", "duckdb", "streamlit", "plotly")


def test_runtime_import_is_light():
    code = (
        "import sys, sixbit_tune.runtime\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not heavy, f'sixbit_tune.runtime pulled in {heavy}'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_kernels_and_dashboard_are_subpackages():
    code = (
        "import importlib.util as u, sixbit_tune\n"
        "for name in ('sixbit_tune.kernels', 'sixbit_tune.dashboard'):\n"
        "    assert u.find_spec(name) is not None, name\n"
        "assert u.find_spec('kernels') is None or 'sixbit' not in str(u.find_spec('kernels').origin)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_cli_help_lists_every_subcommand():
    from sixbit_tune.cli import COMMANDS, build_parser

    text = build_parser().format_help()
    for name in COMMANDS:
        assert name in text
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([name, "--help"])
        assert e.value.code == 0


@pytest.mark.slow
def test_wheel_layout_and_clean_install(tmp_path):
    """Build the wheel, install it with no dependencies into a clean venv, import both remapped subpackages."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
    )
    (wheel,) = tmp_path.glob("sixbit_tune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sixbit_tune/kernels/__init__.py" in names
    assert "sixbit_tune/dashboard/__init__.py" in names
    assert not any(n.startswith(("kernels/", "dashboard/")) for n in names), "no top-level kernels/dashboard"
    shipped = {
        str(p.relative_to(ROOT)) for p in (ROOT / "sixbit_tune/models/reference/weights").rglob("*") if p.is_file()
    }
    assert "sixbit_tune/models/reference/weights/model_index.json" in shipped
    missing = sorted(shipped - set(names))
    assert not missing, f"reference-model files left out of the wheel: {missing}"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    target = next((venv / "lib").glob("python3*")) / "site-packages"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True
    )
    # The dependencies (torch, ...) come from this environment's site-packages, placed *after* the clean one.
    deps = sysconfig.get_paths()["purelib"]
    code = (
        f"import sys; sys.path.append({deps!r})\n"
        "import sixbit_tune.kernels, sixbit_tune.dashboard, sixbit_tune.formats, sixbit_tune.runtime\n"
        f"assert sixbit_tune.kernels.__file__.startswith({str(target)!r}), sixbit_tune.kernels.__file__\n"
        f"assert sixbit_tune.dashboard.__file__.startswith({str(target)!r})\n"
    )
    subprocess.run([str(venv / "bin" / "python"), "-c", code], check=True, cwd=str(tmp_path))
