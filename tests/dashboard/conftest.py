"""Fixtures of the dashboard tests: ONE real store per session (profile, fit and search of tiny:wan), built through
the project's own APIs, plus a second store (a copy, standing for a second GPU) for the side-by-side page."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from dashboard_helpers import H100, H200, MODEL, PROMPTS, TRIALS, label_gpu


@pytest.fixture(scope="session")
def dash_store(profiled_tiny_store, tmp_path_factory) -> Path:
    """Profile (2 prompts x 4 steps, CFG) -> fit -> 4-trial search (3 enqueued corners + 1 TPE trial) of tiny:wan."""
    from sixbit_tune.search.config import SearchConfig
    from sixbit_tune.search.study import run_search

    path = tmp_path_factory.mktemp("dash") / "h200"
    shutil.copytree(profiled_tiny_store, path)
    config = SearchConfig(store=str(path), model=MODEL, trials=TRIALS, prompts=(PROMPTS[0],), repeats=1,
                          warmup_runs=0, quality_floor_db=25.0, device="cpu", progress=False, seed=0)
    run_search(config, log=lambda *_: None)
    return path


@pytest.fixture(scope="session")
def second_store(dash_store, tmp_path_factory) -> Path:
    """A second store (a copy of the first under another folder name), as results of another GPU would be."""
    dest = tmp_path_factory.mktemp("dash2") / "b200"
    shutil.copytree(dash_store, dest)
    return dest


@pytest.fixture(scope="session")
def gpu_stores(dash_store, profiled_tiny_store, tmp_path_factory) -> dict[str, Path]:
    """Two stores standing for two GPUs' searches of tiny:wan, plus the policies folder they exported into.

    ``h200``: the dashboard store's search, recorded as run on an H200 (nothing exported: its choice is its fastest
    feasible trial). ``h100``: a search of its own (another seed, one more trial) recorded as run on an H100, whose
    feasible trial with the largest NVFP4 share was exported with ``sixbit-tune export``'s code into
    ``policies/reference-h100.json``.
    The GPU names and facts are written through the store's writer (:func:`dashboard_helpers.label_gpu`); every
    figure is the CPU search's own.
    """
    from sixbit_tune.search.config import SearchConfig
    from sixbit_tune.search.export import export_trial
    from sixbit_tune.search.study import run_search
    from sixbit_tune.store import Store

    root = tmp_path_factory.mktemp("gpus")
    h200, h100, policies = root / "h200", root / "h100", root / "policies"
    shutil.copytree(dash_store, h200)
    shutil.copytree(profiled_tiny_store, h100)
    config = SearchConfig(store=str(h100), model=MODEL, trials=TRIALS + 1, prompts=(PROMPTS[0],), repeats=1,
                          warmup_runs=0, quality_floor_db=25.0, device="cpu", progress=False, seed=1)
    run_search(config, log=lambda *_: None)
    with Store.open(h100, read_only=True) as s:
        t = s.trials()
    ok = t[(t["state"] == "COMPLETE") & t["quality"].map(lambda q: json.loads(q)["feasible"])]
    best = ok.sort_values(["nvfp4_share", "number"], ascending=[False, True]).iloc[0]
    export_trial(h100, best["study"], int(best["number"]), policies / "reference-h100.json")
    label_gpu(h200, H200)
    label_gpu(h100, H100)
    return {"h200": h200, "h100": h100, "policies": policies}


@pytest.fixture(scope="session")
def profile_only_store(tmp_path_factory) -> Path:
    """A store with one profile run and nothing else (no fit, no search): 1 prompt x 2 steps."""
    from sixbit_tune.profiling.runner import ProfileConfig, profile

    path = tmp_path_factory.mktemp("profonly") / "store"
    profile(ProfileConfig(model=MODEL, prompts=[PROMPTS[0]], store=str(path), steps=2, device="cpu", progress=False))
    return path


@pytest.fixture
def store_copy(dash_store, tmp_path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(dash_store, dest)
    return dest


@pytest.fixture
def empty_store(tmp_path) -> Path:
    from sixbit_tune.store import Store

    path = tmp_path / "empty"
    Store.create(path).close()
    return path


@pytest.fixture(autouse=True)
def _fresh_streamlit_caches():
    """cache_resource and cache_data outlive AppTest instances in one process: start each test clean."""
    import streamlit as st

    st.cache_data.clear()
    st.cache_resource.clear()
    yield
    st.cache_data.clear()
    st.cache_resource.clear()


@pytest.fixture
def app_argv(monkeypatch):
    """Set the app's command line (what `sixbit-tune dashboard` passes after `--`)."""

    def set_argv(*stores: Path, policies_dir: Path | None = None, extra: tuple[str, ...] = ()) -> None:
        argv = ["app.py"]
        for s in stores:
            argv += ["--store", str(s)]
        if policies_dir is not None:
            argv += ["--policies-dir", str(policies_dir)]
        monkeypatch.setattr(sys, "argv", argv + list(extra))

    return set_argv


@pytest.fixture(autouse=True)
def _restore_main_module():
    """AppTest runs the app through Streamlit's script runner, which installs the script as ``sys.modules["__main__"]``
    and never puts the old one back. Later tests that start ``multiprocessing`` spawn workers (the profiler's
    ``--workers``) would then re-run the Streamlit app in every child: restore ``__main__`` after each test."""
    main = sys.modules.get("__main__")
    yield
    if main is not None:
        sys.modules["__main__"] = main
