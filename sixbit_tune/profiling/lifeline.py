"""Worker processes that end with their parent process, however the parent ends (``SIGKILL`` included), and how a
worker ended, in words.

A worker calls :func:`die_with_parent` first thing. Two mechanisms, either of which suffices:

* on Linux, ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills the worker when the thread that started it
  ends (the parent's main thread starts the workers);
* everywhere, a daemon thread that checks every ``interval`` seconds whether the worker's parent process is
  still the one that started it (a process whose parent died is re-parented, so ``os.getppid()`` changes), and
  kills the worker when it is not.

Workers write their results as whole files renamed into place, so a worker killed this way leaves only whole
files behind.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1


def how_it_ended(exitcode: int) -> str:
    """How a worker process ended, from its exit code (negative: the signal that killed it), for messages."""
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name}"
    return f"exited with code {exitcode}"


def _set_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _kill_self(sig: int) -> None:
    os.kill(os.getpid(), sig)


def die_with_parent(parent_pid: int | None = None, interval: float = 0.5, sig: int = signal.SIGKILL) -> None:
    """End this process (with ``sig``) as soon as its parent process ends.

    Args:
        parent_pid: the pid of the process that started this one (default: the current parent). Pass the pid the
            parent had when it started the worker: a parent that already died is then noticed at once.
        interval: seconds between two checks of the watching thread.
        sig: the signal this process ends with.
    """
    parent = parent_pid if parent_pid is not None else os.getppid()
    _set_pdeathsig(int(sig))
    if os.getppid() != parent:  # the parent died before the line above took effect
        _kill_self(sig)

    def watch() -> None:
        event = threading.Event()
        while not event.wait(interval):
            if os.getppid() != parent:
                _kill_self(sig)

    threading.Thread(target=watch, name="sixbit-die-with-parent", daemon=True).start()


def thread_lock_for_bars() -> None:
    """Give tqdm a thread lock in a worker process, instead of its default multiprocessing RLock.

    That default is a named semaphore: a worker killed by a signal leaves it to the resource tracker, which warns
    about it on the shared stderr. A worker's bars are its own (the parent draws the progress bar), so a thread
    lock is enough.
    """
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
