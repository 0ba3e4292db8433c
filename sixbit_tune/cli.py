"""The ``sixbit-tune`` command: one entry point, one module per subcommand.

Each subcommand lives in ``sixbit_tune/commands/<name>.py`` and exposes

* ``HELP`` — one line for the top-level ``--help``;
* ``add_arguments(parser)`` — registers its options (defaults come from the API's dataclasses);
* ``run(args) -> int`` — does the work and returns the exit code.

Command modules import heavy dependencies inside ``run`` so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from sixbit_tune import __version__
from sixbit_tune.errors import NotBuiltYet, SixbitError

COMMANDS = ("profile", "fit", "search", "export", "generate", "bench", "dashboard", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sixbit-tune",
        description="Profile a video diffusion transformer, search an NVFP4/INT8 + Temporal Delta Cache "
        "policy for this GPU, and export it for the runtime.",
    )
    parser.add_argument("--version", action="version", version=f"sixbit-tune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"sixbit_tune.commands.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_module=module, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    debug = args.debug or bool(os.environ.get("SIXBIT_DEBUG"))
    try:
        return int(args._module.run(args) or 0)
    except NotBuiltYet as e:
        print(f"sixbit-tune {args.command}: not built yet: {e}", file=sys.stderr)
        return 3
    except SixbitError as e:
        if debug:
            raise
        print(f"sixbit-tune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sixbit-tune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
