"""``sixbit-tune search``."""

from __future__ import annotations

import argparse

from sixbit_tune.errors import NotBuiltYet

HELP = "Optuna search over the DMPQ threshold and TDC knobs against measured latency, memory and quality."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise NotBuiltYet("`sixbit-tune search` lands with issue #7")
