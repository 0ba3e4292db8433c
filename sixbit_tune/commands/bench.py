"""``sixbit-tune bench``: a thin wrapper around the end-to-end benchmark package ``benchmarks/e2e/``.

The benchmark lives in the repository's ``benchmarks/`` folder (it is not part of an installed wheel); this command
loads it from the source checkout the package was installed from (an editable install) or from the current
directory, and passes every option through. ``python -m benchmarks.e2e --help`` (from the repository root) and the
package docstring say what is measured and how.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

#: the name the benchmark package is loaded under (not ``benchmarks.e2e``: no folder is put on ``sys.path``)
MODULE = "sixbit_tune_bench_e2e"


def _package() -> Path | None:
    here = Path(__file__).resolve().parents[2] / "benchmarks" / "e2e"
    for candidate in (here, Path.cwd() / "benchmarks" / "e2e"):
        if (candidate / "__init__.py").is_file():
            return candidate
    return None


def _load():
    """The benchmark package, loaded once from its folder (its modules import each other relatively)."""
    if MODULE in sys.modules:
        return sys.modules[MODULE]
    folder = _package()
    if folder is None:
        return None
    spec = importlib.util.spec_from_file_location(MODULE, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE] = module  # dataclasses and relative imports look the package up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(MODULE, None)
        raise
    return module


def add_arguments(parser: argparse.ArgumentParser) -> None:
    module = _load()
    if module is None:
        parser.set_defaults(_bench_missing=True)
        return
    module.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "_bench_missing", False):
        from sixbit_tune.errors import SixbitError

        raise SixbitError(
            "benchmarks/e2e/ was not found: `sixbit-tune bench` runs from a source checkout of sixbit-tune "
            "(pip install -e .) or from its root folder"
        )
    return _load().run_args(args)
