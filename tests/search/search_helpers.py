"""Helpers of the search tests (a plain module: tests/ has no packages, so conftest cannot be imported)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tiny_profile import MODEL, PROMPTS, STEPS  # noqa: F401  (re-exported for the tests)


def search_config(store: Path, **kw):
    """A small, fast search of the tiny model (1 prompt, 4 steps, 1 timed run, no warm-up)."""
    from sixbit_tune.search.config import SearchConfig

    base = dict(store=str(store), model=MODEL, trials=5, prompts=(PROMPTS[0],), repeats=1, warmup_runs=0,
                quality_floor_db=25.0, device="cpu", progress=False)
    base.update(kw)
    return SearchConfig(**base)


def cli_args(store: Path, trials: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sixbit_tune.cli", "search", "--store", str(store), "--model", MODEL,
            "--trials", str(trials), "--prompt", PROMPTS[0], "--repeats", "1", "--warmup-runs", "0",
            "--quality-floor", "25", "--device", "cpu", "--no-progress", *extra]


def cli_env() -> dict:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_cli(args: list[str], timeout: float = 240, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=cwd)
