"""Fixtures of the search tests: one real profiled + fitted store of the tiny Wan pipeline, copied per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from search_helpers import MODEL, PROMPTS, STEPS


@pytest.fixture(scope="session")
def profiled_store(tmp_path_factory) -> Path:
    """A store holding a real profile (2 prompts x 4 steps) of tiny:wan and a fit (session-wide; copy it)."""
    from sixbit_tune.predictor import fit_store, write_fit
    from sixbit_tune.profiling.runner import ProfileConfig, profile
    from sixbit_tune.store import Store

    path = tmp_path_factory.mktemp("profiled") / "store"
    profile(ProfileConfig(model=MODEL, prompts=list(PROMPTS), store=str(path), steps=STEPS, device="cpu",
                          progress=False))
    with Store.open(path) as store:
        write_fit(store.writer(), fit_store(store))
    return path


@pytest.fixture
def store_copy(profiled_store, tmp_path) -> Path:
    dest = tmp_path / "store"
    shutil.copytree(profiled_store, dest)
    return dest
