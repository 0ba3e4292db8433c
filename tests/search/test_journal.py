"""A journal file damaged by a process killed while writing: real Optuna journal storages, real files.

A write cut short is reproduced by appending the first half of an operation line the journal itself wrote (what a
process killed inside ``write`` leaves); a write glued to it by appending through Optuna's own
``JournalFileBackend``, which does not check the end of the file.
"""

from __future__ import annotations

import json
import warnings

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from sixbit_tune.search.journal import JournalRepairedWarning
from sixbit_tune.search.study import open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _objective(trial):
    return trial.suggest_float("x", 0.0, 1.0) ** 2


def _study_with_trials(path, n=3):
    study = optuna.create_study(storage=open_storage(str(path)), study_name="s")
    study.set_user_attr("space", {"x": [0, 1]})
    study.optimize(_objective, n_trials=n)
    return study


def _cut_write(path) -> bytes:
    """Append the first half of the journal's last line without its newline; returns those bytes."""
    last = path.read_bytes().rstrip(b"\n").rsplit(b"\n", 1)[-1]
    partial = last[: len(last) // 2]
    with open(path, "ab") as f:
        f.write(partial)
    return partial


def _backups(path):
    return sorted(path.parent.glob(path.name + ".damaged-*"))


def _load(path):
    return optuna.load_study(study_name="s", storage=open_storage(str(path)))


def test_a_partial_last_line_is_moved_aside_and_the_study_resumes(tmp_path):
    path = tmp_path / "optuna.journal"
    _study_with_trials(path)
    intact = path.read_bytes()
    partial = _cut_write(path)

    with pytest.warns(JournalRepairedWarning) as rec:
        study = _load(path)
    (backup,) = _backups(path)
    assert str(backup) in str(rec[0].message)
    assert backup.read_bytes() == partial
    assert path.read_bytes() == intact
    study.optimize(_objective, n_trials=2)

    with warnings.catch_warnings():
        warnings.simplefilter("error", JournalRepairedWarning)  # repaired once: no further warning
        again = _load(path)
    assert [t.number for t in again.trials] == list(range(5))
    assert all(t.state == TrialState.COMPLETE for t in again.trials)
    assert again.user_attrs["space"] == {"x": [0, 1]}
    for line in path.read_bytes().splitlines():
        json.loads(line)


def test_a_write_glued_to_a_partial_line_is_salvaged(tmp_path):
    path = tmp_path / "optuna.journal"
    _study_with_trials(path)
    _cut_write(path)
    # what a process that does not check the end of the journal leaves: its next write glued to the cut one
    plain = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(path))))
    plain.set_user_attr("glued", 1)
    with pytest.raises(ValueError):  # written, but from now on Optuna alone cannot read the journal back
        plain.set_user_attr("after", 2)
    with pytest.raises(ValueError):
        optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(path))))
    damaged = path.read_bytes()

    with pytest.warns(JournalRepairedWarning, match="original journal is copied"):
        study = _load(path)
    (backup,) = _backups(path)
    assert backup.read_bytes() == damaged
    assert study.user_attrs["glued"] == 1 and study.user_attrs["after"] == 2
    assert len(study.trials) == 3
    study.optimize(_objective, n_trials=1)
    assert len(_load(path).trials) == 4


def test_a_live_writer_sets_a_partial_line_aside_instead_of_gluing_to_it(tmp_path):
    path = tmp_path / "optuna.journal"
    study = _study_with_trials(path, n=2)  # a worker that stays alive
    partial = _cut_write(path)  # another worker killed in the middle of its write
    with pytest.warns(JournalRepairedWarning, match="partial line"):
        study.optimize(_objective, n_trials=2)
    (backup,) = _backups(path)
    assert backup.read_bytes() == partial
    with warnings.catch_warnings():
        warnings.simplefilter("error", JournalRepairedWarning)
        again = _load(path)
    assert [t.state for t in again.trials] == [TrialState.COMPLETE] * 4


def test_garbage_lines_at_the_end_are_moved_aside(tmp_path):
    path = tmp_path / "optuna.journal"
    _study_with_trials(path, n=1)
    intact = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b"\x00" * 64 + b"\n" + b"not json\n")  # zeros where a crash left unwritten blocks
    with pytest.warns(JournalRepairedWarning):
        study = _load(path)
    assert path.read_bytes() == intact
    (backup,) = _backups(path)
    assert backup.read_bytes() == b"\x00" * 64 + b"\nnot json\n"
    assert len(study.trials) == 1


def test_an_intact_journal_is_not_touched(tmp_path):
    path = tmp_path / "optuna.journal"
    _study_with_trials(path, n=2)
    before = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error", JournalRepairedWarning)
        _load(path)
    assert path.read_bytes() == before and not _backups(path)


def test_a_search_whose_journal_write_was_cut_resumes(store_copy):
    from search_helpers import search_config

    from sixbit_tune.search.study import run_search

    run_search(search_config(store_copy, trials=3, study="cut"), log=lambda *_: None)
    path = store_copy / "optuna.journal"
    partial = _cut_write(path)
    with pytest.warns(JournalRepairedWarning):
        study = run_search(search_config(store_copy, trials=4, study="cut"), log=lambda *_: None)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    assert [b.read_bytes() for b in _backups(path)] == [partial]
    again = optuna.load_study(study_name="cut", storage=open_storage(str(path)))
    assert len(again.trials) == 4
