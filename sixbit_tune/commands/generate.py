"""``sixbit-tune generate``."""

from __future__ import annotations

import argparse

from sixbit_tune.errors import NotBuiltYet

HELP = "Generate a video with a policy applied and print the runtime statistics."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise NotBuiltYet("`sixbit-tune generate` lands with issue #5")
