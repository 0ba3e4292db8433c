"""``sixbit-tune demo``."""

from __future__ import annotations

import argparse

from sixbit_tune.errors import NotBuiltYet

HELP = "Offline end-to-end demo on the shipped reference model: profile, fit, search, export, generate."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise NotBuiltYet("`sixbit-tune demo` lands with issue #7")
