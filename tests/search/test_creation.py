"""Creating a study: killed half-way it resumes; two processes creating it at once enqueue each corner once.

Real worker processes on the real tiny profiled store and journal file. A process is killed at a chosen moment by
wrapping one Optuna ``Study`` method in that process so that its N-th call sends SIGKILL to the process itself.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from search_helpers import cli_env, search_config

from sixbit_tune.search.runner import CORNERS

TESTS = Path(__file__).resolve().parents[1]

_PRELUDE = f"""
import os, signal, sys, time
from pathlib import Path
sys.path[:0] = [{str(TESTS / "search")!r}, {str(TESTS)!r}]
import optuna
from search_helpers import search_config
from sixbit_tune.search.runner import SearchContext
from sixbit_tune.search.study import create_or_load
"""

_KILLED = _PRELUDE + """
store, study, method, n = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
original = getattr(optuna.study.Study, method)
calls = [0]
def dying(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args, **kwargs)
setattr(optuna.study.Study, method, dying)
config = search_config(store, trials=4, study=study)
create_or_load(config, SearchContext(config))
"""

_RACER = _PRELUDE + """
store, study, worker = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
config = search_config(store, trials=4, study=study)
ctx = SearchContext(config)
(store / f"ready-{worker}").touch()
while not (store / "go").exists():
    time.sleep(0.002)
create_or_load(config, ctx, worker)
"""


def _script(tmp_path, name, text) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _journal(store):
    from sixbit_tune.search.study import open_storage

    return open_storage(str(store / "optuna.journal"))


@pytest.mark.parametrize(
    ("method", "n"),
    [("set_user_attr", 2), ("enqueue_trial", 2)],
    ids=["killed-after-the-first-setting", "killed-after-the-first-corner"],
)
def test_a_search_killed_while_creating_its_study_resumes(store_copy, tmp_path, method, n):
    from sixbit_tune.search.study import run_search

    script = _script(tmp_path, "killed.py", _KILLED)
    res = subprocess.run([sys.executable, str(script), str(store_copy), "half", method, str(n)],
                         capture_output=True, text=True, timeout=300, env=cli_env())
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    half = optuna.load_study(study_name="half", storage=_journal(store_copy))
    assert "settings_recorded" not in half.user_attrs  # the creation was cut short

    config = search_config(store_copy, trials=4, study="half")
    study = run_search(config, log=lambda *_: None)
    trials = study.get_trials(deepcopy=False)
    assert [t.number for t in trials] == list(range(4))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert [t.user_attrs.get("reference") for t in trials[:3]] == list(CORNERS)
    assert trials[3].user_attrs.get("reference") is None
    assert set(study.user_attrs) == {
        "settings_recorded", "baseline", "space", "quality_floor_db", "generation", "prompts", "seeds", "fit_id",
        "profile_runs", "model", "device", "memory_metric", "dmpq", "max_memory_gib", "objectives", "sampler",
        "trials", "weights", "nvfp4_encoder", "measured_menu"}
    assert study.user_attrs["quality_floor_db"] == config.quality_floor_db


def test_two_processes_creating_one_study_at_once_enqueue_each_corner_once(store_copy, tmp_path):
    script = _script(tmp_path, "racer.py", _RACER)
    procs = [
        subprocess.Popen([sys.executable, str(script), str(store_copy), "race", str(w)], env=cli_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for w in (0, 1)
    ]
    try:
        deadline = time.time() + 300
        while not all((store_copy / f"ready-{w}").exists() for w in (0, 1)):
            assert time.time() < deadline, "the processes never got ready"
            assert all(p.poll() is None for p in procs), [p.communicate()[1][-3000:] for p in procs]
            time.sleep(0.05)
        (store_copy / "go").touch()
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    study = optuna.load_study(study_name="race", storage=_journal(store_copy))
    refs = [t.user_attrs.get("reference") for t in study.get_trials(deepcopy=False)]
    assert sorted(refs) == sorted(CORNERS)
    assert all(t.state == TrialState.WAITING for t in study.trials)


_LOCKER = """
import sys, time
from pathlib import Path
from sixbit_tune.search.study import creation_lock, open_storage
url, out, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
storage = open_storage(url)
Path(f"{out}.ready-{sys.argv[4]}").touch()
while not go.exists():
    time.sleep(0.002)
for _ in range(3):
    with creation_lock(storage, url, "locked"):
        start = time.time()
        time.sleep(0.15)
        end = time.time()
    with open(out, "a") as f:
        f.write(f"{start} {end}\\n")
"""


@pytest.mark.parametrize("kind", ["journal", "sqlite", "postgresql"])
def test_the_creation_lock_excludes_other_processes(tmp_path, kind):
    if kind == "journal":
        url = str(tmp_path / "optuna.journal")
    elif kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'optuna.db'}"
    else:
        import os

        url = os.environ.get("SIXBIT_TEST_PG_URL")
        if not url:
            pytest.skip("SIXBIT_TEST_PG_URL is not set (.ci/postgres starts a server and sets it)")
    from sixbit_tune.search.study import open_storage

    open_storage(url)  # creates the journal / the database's tables once, before the processes race
    script = _script(tmp_path, "locker.py", _LOCKER)
    out, go = tmp_path / "held.txt", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, str(script), url, str(out), str(go), str(i)], env=cli_env(),
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("held.txt.ready-*"))) < 3:
        assert time.time() < deadline and all(p.poll() is None for p in procs), "the processes never got ready"
        time.sleep(0.05)
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
    held = sorted(tuple(map(float, line.split())) for line in out.read_text().splitlines())
    assert len(held) == 9
    overlaps = [(a, b) for a, b in zip(held, held[1:]) if b[0] < a[1]]
    assert not overlaps, overlaps
