"""Run test code in a process that obeys permission bits even as root (CI runs as root, where chmod stops nothing).

As root, the child drops from its capability bounding set what lets root ignore the mode bits; it stays uid 0 and
the owner of the files. Where that is not allowed, the calling test is skipped with the reason.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_DROP_DAC = (1, 2, 3)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER: what lets root ignore permission bits


def _as_unprivileged() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in _DROP_DAC:
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def run_unprivileged(code: str, *args: str) -> subprocess.CompletedProcess:
    """``python -c code args…`` in the repository root, obeying permission bits."""
    root_user = os.geteuid() == 0
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                              cwd=REPO, timeout=120, preexec_fn=_as_unprivileged if root_user else None)
    except subprocess.SubprocessError as e:  # preexec_fn failed: no CAP_SETPCAP to drop capabilities
        pytest.skip(f"running as root without the right to drop capabilities, so no folder can be made "
                    f"unwritable for this test ({e})")


def make_read_only(root: Path) -> None:
    for d, _, _ in os.walk(root):
        os.chmod(d, 0o555)


def make_writable(root: Path) -> None:
    for d, _, _ in os.walk(root):
        os.chmod(d, 0o755)
