"""The ``sixbit-tune`` command: one entry point, one module per subcommand.

Each subcommand lives in ``sixbit_tune/commands/<name>.py`` and exposes

* ``add_arguments(parser)`` — registers its options (defaults come from the API's dataclasses);
* ``run(args) -> int`` — does the work and returns the exit code.

Only the chosen subcommand's module is imported (the one-line help of every subcommand is in :data:`COMMANDS`), so
``sixbit-tune --help`` imports no torch. Command modules import heavy dependencies inside ``run``.

Errors. A mistake of the user — a bad option value, a model spec that names nothing, a missing or malformed policy
file, a store that cannot be read (every :class:`~sixbit_tune.errors.SixbitError`, ``ValueError`` and ``OSError``)
— prints one line ``sixbit-tune <command>: error: ...`` on stderr and exits with 2, as argparse does for its own
errors. ``--debug`` or the environment variable ``SIXBIT_DEBUG=1`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Iterable

from sixbit_tune import __version__
from sixbit_tune.errors import NotBuiltYet, SixbitError

#: Subcommand -> its one-line help (the top-level ``--help`` reads this, not the modules).
COMMANDS = {
    "profile": "Run a diffusers pipeline with hooks and record Γ, Δ and per-layer NVFP4/INT8 errors into a store.",
    "fit": "Fit the per-layer predictor (Γ_{t-1} → NVFP4 out_err) from a profile store.",
    "search": "Optuna search over the DMPQ threshold and TDC knobs against measured latency, memory and quality.",
    "export": "Write a trial's policy as JSON (validated, with provenance and measured figures).",
    "generate": "Generate a video with a policy applied and print the runtime statistics.",
    "bench": "End-to-end benchmark: bf16 (compiled, CUDA graphs), torchao, step caches and sixbit-tune policies.",
    "dashboard": "Open the Streamlit dashboard on a store (several --store: GPUs side by side).",
    "demo": "Offline end-to-end demo on the shipped reference model: profile, fit, search, export, generate.",
}

#: Exceptions that mean the user asked for something that cannot be done (one line, exit 2).
USER_ERRORS: tuple[type[BaseException], ...] = (SixbitError, ValueError, OSError)

_DEBUG_HELP = "show full tracebacks on errors (also: environment variable SIXBIT_DEBUG=1)"


def chosen_command(argv: list[str]) -> str | None:
    """The subcommand named in ``argv``: the first argument that is not a top-level option."""
    for arg in argv:
        if arg == "--":
            return None
        if not arg.startswith("-"):
            return arg
    return None


def build_parser(load: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the options of the subcommands in ``load`` (default: all of them) registered.

    Only the modules of the subcommands in ``load`` are imported; :func:`main` loads the chosen one only.
    """
    load = set(COMMANDS if load is None else load)
    parser = argparse.ArgumentParser(
        prog="sixbit-tune",
        description="Profile a video diffusion transformer, search an NVFP4/INT8 + Temporal Delta Cache "
        "policy for this GPU, and export it for the runtime.",
        epilog="`sixbit-tune COMMAND --help` lists a command's options. Start with `sixbit-tune demo`.",
    )
    parser.add_argument("--version", action="version", version=f"sixbit-tune {__version__}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_line in COMMANDS.items():
        p = sub.add_parser(name, help=help_line, description=help_line)
        if name in load:
            module = importlib.import_module(f"sixbit_tune.commands.{name}")
            module.add_arguments(p)
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
            p.set_defaults(_module=module, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = chosen_command(argv)
    parser = build_parser([command] if command in COMMANDS else [])
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    debug = args.debug or os.environ.get("SIXBIT_DEBUG", "") not in ("", "0")
    try:
        return int(args._module.run(args) or 0)
    except NotBuiltYet as e:
        if debug:
            raise
        print(f"sixbit-tune {args.command}: not built yet: {e}", file=sys.stderr)
        return 3
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"sixbit-tune {args.command}: error: {error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sixbit-tune {args.command}: interrupted", file=sys.stderr)
        return 130


#: Lines of a multi-line error message shown in the one-line error (``--debug`` shows all of them).
MAX_ERROR_LINES = 4


def error_line(e: BaseException) -> str:
    """``e`` as one line: an ``OSError`` with the file it is about; a multi-line message's first lines joined by
    ``; `` and the number of lines left out."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.strerror}: {e.filename}"
    else:
        text = str(e) or type(e).__name__
    lines = [" ".join(line.split()) for line in text.splitlines()]
    lines = [line for line in lines if line]
    shown = "; ".join(lines[:MAX_ERROR_LINES])
    if len(lines) > MAX_ERROR_LINES:
        shown += f"; ... ({len(lines) - MAX_ERROR_LINES} more lines: --debug shows them)"
    return shown


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
