"""``sixbit-tune bench``: a thin wrapper around ``benchmarks/e2e.py`` (the end-to-end benchmark, issue #9).

The benchmark lives in the repository's ``benchmarks/`` folder (it is not part of an installed wheel); this command
loads it from the source checkout the package was installed from (an editable install) or from the current
directory, and passes every option through. See ``benchmarks/e2e.py`` for what is measured and how.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

HELP = "End-to-end benchmark: bf16, compiled bf16, peers and sixbit-tune policies."


def _script() -> Path | None:
    here = Path(__file__).resolve().parents[2] / "benchmarks" / "e2e.py"
    for candidate in (here, Path.cwd() / "benchmarks" / "e2e.py"):
        if candidate.is_file():
            return candidate
    return None


def _load():
    path = _script()
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location("sixbit_tune_bench_e2e", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
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
            "benchmarks/e2e.py was not found: `sixbit-tune bench` runs from a source checkout of sixbit-tune "
            "(pip install -e .) or from its root folder"
        )
    return _load().run_args(args)
