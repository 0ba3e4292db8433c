"""``sixbit-tune bench``."""

from __future__ import annotations

import argparse

from sixbit_tune.errors import NotBuiltYet

HELP = "End-to-end benchmark: bf16, compiled bf16, peers and sixbit-tune policies."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise NotBuiltYet("`sixbit-tune bench` lands with issue #9")
