"""The tiny profiled store shared by the search and dashboard tests (a plain module: tests/ has no packages)."""

from __future__ import annotations

from pathlib import Path

MODEL = "tiny:wan"
PROMPTS = ("a red square moving left", "a blue circle moving right")
STEPS = 4


def build_profiled_store(path: Path) -> Path:
    """A real profile (2 prompts x 4 steps, CFG) of tiny:wan and a fit, written into a new store at ``path``."""
    from sixbit_tune.predictor import fit_store, write_fit
    from sixbit_tune.profiling.runner import ProfileConfig, profile
    from sixbit_tune.store import Store

    profile(ProfileConfig(model=MODEL, prompts=list(PROMPTS), store=str(path), steps=STEPS, device="cpu",
                          progress=False))
    with Store.open(path) as store:
        write_fit(store.writer(), fit_store(store))
    return path
