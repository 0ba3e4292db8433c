"""``--weights nvfp4``: every in-block linear of every trial's policy stores its weight in NVFP4 (trusted layers
dynamic, the others on the robust route); the corners are NVFP4-stored too; the setting is part of the study.

Real searches of the tiny profiled store (tests/conftest.py) on a real journal file, through the Python API and
the CLI's own parser.
"""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState
from search_helpers import MODEL, PROMPTS, search_config

from sixbit_tune import policy as P
from sixbit_tune.cli import main
from sixbit_tune.search.export import export_trial, hessians_path
from sixbit_tune.search.runner import NVFP4_CORNERS
from sixbit_tune.search.study import open_storage, run_search


def _layers(policy: P.Policy) -> dict[str, tuple[str, str]]:
    return {n: (lp.weight, lp.mode) for n, lp in policy.dmpq.layers.items()}


def test_weights_nvfp4_every_trial_and_the_export_store_nvfp4(store_copy, tmp_path):
    study = run_search(search_config(store_copy, trials=4, weights="nvfp4", study="w4"), log=lambda *_: None)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert [t.user_attrs.get("reference") for t in trials[:3]] == list(NVFP4_CORNERS)
    modes_seen = set()
    for t in trials:
        layers = _layers(P.Policy.from_dict(t.user_attrs["policy"]))
        assert {w for w, _ in layers.values()} == {"nvfp4"}, (t.number, layers)
        modes_seen |= {m for _, m in layers.values()}
    # the searched trial mixes dynamic (trusted) and robust (untrusted) layers; the corners are static
    searched = _layers(P.Policy.from_dict(trials[3].user_attrs["policy"]))
    assert {m for _, m in searched.values()} == {"dynamic", "robust"}
    assert {m for _, m in _layers(P.Policy.from_dict(trials[0].user_attrs["policy"])).values()} == {"robust"}
    assert {m for _, m in _layers(P.Policy.from_dict(trials[1].user_attrs["policy"])).values()} == {"fast"}
    out = tmp_path / "pol" / "w4.json"
    path, policy, _ = export_trial(store_copy, "w4", 3, out)
    exported = P.load(path)
    assert {w for w, _ in _layers(exported).values()} == {"nvfp4"}
    assert exported.dmpq.nvfp4_weight_encoder == "standard"
    assert not hessians_path(out).exists()  # a standard-encoded policy needs no calibration file


def test_default_search_keeps_the_untrusted_layers_in_the_fits_format(store_copy):
    """The default (``weights="mixed"``) is today's behaviour: untrusted layers store the fit's format (INT8)."""
    study = run_search(search_config(store_copy, trials=4, study="mixed"), log=lambda *_: None)
    t = study.get_trials(deepcopy=False)[3]
    layers = _layers(P.Policy.from_dict(t.user_attrs["policy"]))
    assert ("int8", "fast") in set(layers.values()) and ("nvfp4", "dynamic") in set(layers.values())
    assert study.user_attrs["weights"] == "mixed" and study.user_attrs["nvfp4_encoder"] == "standard"


def test_reopened_study_keeps_its_weights_setting(store_copy):
    run_search(search_config(store_copy, trials=3, weights="nvfp4", study="keep"), log=lambda *_: None)
    with pytest.raises(ValueError, match=r"weights: study 'nvfp4' vs now 'mixed'"):
        run_search(search_config(store_copy, trials=4, study="keep"), log=lambda *_: None)
    with pytest.raises(ValueError, match=r"nvfp4_encoder: study 'standard' vs now 'scale-search'"):
        run_search(search_config(store_copy, trials=4, weights="nvfp4", nvfp4_encoder="scale-search", study="keep"),
                   log=lambda *_: None)
    study = optuna.load_study(study_name="keep", storage=open_storage(str(store_copy / "optuna.journal")))
    assert len(study.get_trials(deepcopy=False)) == 3  # the refused runs added no trial
    study = run_search(search_config(store_copy, trials=4, weights="nvfp4", study="keep"), log=lambda *_: None)
    assert study.user_attrs["weights"] == "nvfp4"
    last = study.get_trials(deepcopy=False)[3]
    assert {w for w, _ in _layers(P.Policy.from_dict(last.user_attrs["policy"])).values()} == {"nvfp4"}


def _cli(store, capsys, *extra):
    code = main(["search", "--store", str(store), "--model", MODEL, "--trials", "3", "--prompt", PROMPTS[0],
                 "--repeats", "1", "--warmup-runs", "0", "--device", "cpu", "--no-progress", *extra])
    return code, capsys.readouterr()


@pytest.mark.parametrize(("extra", "message"), [
    (("--weights", "int4"), "argument --weights: invalid choice: 'int4' (choose from mixed, nvfp4)"),
    (("--nvfp4-encoder", "hadamard"), "argument --nvfp4-encoder: invalid choice: 'hadamard'"),
])
def test_bad_option_values_are_refused_by_the_cli(store_copy, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        _cli(store_copy, capsys, *extra)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err.replace("'mixed', 'nvfp4'", "mixed, nvfp4")
    assert not (store_copy / "optuna.journal").exists()


def test_cache_only_with_nvfp4_weights_is_refused(store_copy, capsys):
    code, out = _cli(store_copy, capsys, "--cache-only", "--weights", "nvfp4")
    assert code == 2
    assert "cache-only search (dmpq off) quantizes nothing" in out.err
    assert not (store_copy / "optuna.journal").exists()
