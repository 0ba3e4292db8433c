"""``sixbit-tune dashboard``: start the Streamlit app (``dashboard/app.py``) on one or several stores."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", action="append", required=True, metavar="PATH",
                        help="store folder (repeat for several stores, e.g. one per GPU)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default %(default)s: this machine only; 0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=8501, help="port (default %(default)s)")
    parser.add_argument("--policies-dir", default="policies",
                        help="folder the Export button writes policy JSON into (default ./%(default)s)")
    parser.add_argument("--optuna-storage", default=None, metavar="URL",
                        help="Optuna storage of the studies when it is not <store>/optuna.journal (an RDB URL)")


def streamlit_command(args: argparse.Namespace) -> list[str]:
    """The ``streamlit run`` command line for ``args`` (the app's own options after ``--``)."""
    import sixbit_tune.dashboard as dashboard

    app = Path(dashboard.__file__).with_name("app.py")
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(app),
        "--server.headless", "true",
        "--server.address", args.host,
        "--server.port", str(args.port),
        "--browser.gatherUsageStats", "false",
        "--",
    ]
    for s in args.store:
        cmd += ["--store", str(Path(s).expanduser().absolute())]
    cmd += ["--policies-dir", str(Path(args.policies_dir).expanduser().absolute())]
    if args.optuna_storage:
        cmd += ["--optuna-storage", args.optuna_storage]
    return cmd


def run(args: argparse.Namespace) -> int:
    from sixbit_tune.dashboard.data import store_labels
    from sixbit_tune.store import Store

    if not 0 < args.port < 65536:
        args._parser.error(f"--port must lie in 1..65535, got {args.port}")
    try:
        store_labels(args.store)
        for s in args.store:
            Store.open(s, read_only=True).close()
    except (FileNotFoundError, ValueError) as e:
        args._parser.error(str(e))
    print(f"sixbit-tune dashboard: http://{args.host}:{args.port}", flush=True)
    proc = subprocess.Popen(streamlit_command(args))

    def forward(signum, _frame):  # stopping this command stops the server it started
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
