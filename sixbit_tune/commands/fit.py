"""``sixbit-tune fit``."""

from __future__ import annotations

import argparse

from sixbit_tune.errors import NotBuiltYet

HELP = "Fit the per-layer predictor (Γ_{t-1} → NVFP4 out_err) from a profile store."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise NotBuiltYet("`sixbit-tune fit` lands with issue #7")
