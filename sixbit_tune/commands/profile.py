"""``sixbit-tune profile``."""

from __future__ import annotations

import argparse

from sixbit_tune.errors import NotBuiltYet

HELP = "Run a diffusers pipeline with hooks and record Γ, Δ and per-layer NVFP4/INT8 errors into a DuckDB store."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise NotBuiltYet("`sixbit-tune profile` lands with issue #4")
