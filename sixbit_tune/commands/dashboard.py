"""``sixbit-tune dashboard``."""

from __future__ import annotations

import argparse

from sixbit_tune.errors import NotBuiltYet

HELP = "Open the Streamlit dashboard on a store."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise NotBuiltYet("`sixbit-tune dashboard` lands with issue #8")
