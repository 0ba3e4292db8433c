"""``--menu measure``: the search measures the device's route menu at the model's linear shapes once per worker,
every trial's policy records it in ``target.menu`` and runs each 8-bit layer on the faster of INT8 and FP8 at its
shape; the setting is part of the study. Real searches of the tiny profiled store on a real journal file (CPU: the
reference numerics are timed, so which format wins is whatever this machine measures)."""

from __future__ import annotations

import pytest
from optuna.trial import TrialState
from search_helpers import MODEL, PROMPTS, search_config

from sixbit_tune import policy as P
from sixbit_tune import routes as R
from sixbit_tune.cli import main
from sixbit_tune.runtime.menu import EIGHT_BIT_ALTERNATIVES
from sixbit_tune.search.config import SearchConfig
from sixbit_tune.search.runner import SearchContext
from sixbit_tune.search.study import run_search


def test_menu_measured_search_runs_the_faster_8bit_route_of_each_layer_shape(store_copy):
    config = search_config(store_copy, trials=4, study="menu", menu="measure")
    assert config.measures_menu
    ctx = SearchContext(config)
    menu = ctx.route_menu()
    assert ctx.route_menu() is menu  # measured once per worker
    assert set(menu.menu) == {r for pair in EIGHT_BIT_ALTERNATIVES for r in pair} and not menu.failed
    study = run_search(config, log=lambda *_: None)
    assert study.user_attrs["measured_menu"] is True
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    kn_fastest = {}
    for pair in EIGHT_BIT_ALTERNATIVES:
        for shape, times in menu.per_shape.items():
            kn = shape[1:]
            acc = kn_fastest.setdefault((pair, kn), dict.fromkeys(pair, 0.0))
            for r in pair:
                acc[r] += times[r] * menu.counts[shape]
    eight_bit = 0
    for t in trials:
        policy = P.Policy.from_dict(t.user_attrs["policy"])
        assert set(policy.target.menu) >= set(menu.menu)
        assert all(policy.target.menu[k].speedup is not None for k in menu.menu)
        for lp in policy.dmpq.layers.values():
            for act in {lp.fast, lp.robust}:
                key = R.Route(lp.weight, act).key
                pair = next((p for p in EIGHT_BIT_ALTERNATIVES if key in p), None)
                if pair is None:
                    continue
                eight_bit += 1
                acc = kn_fastest[(pair, (lp.in_features, lp.out_features))]
                assert key == min(pair, key=acc.__getitem__), (t.number, key, acc)
    assert eight_bit > 0


def test_menu_setting_is_checked_and_kept_with_the_study(store_copy):
    with pytest.raises(ValueError, match="menu must be one of"):
        SearchConfig(store=str(store_copy), model=MODEL, menu="fastest")
    off = search_config(store_copy, trials=3, study="keep-menu", menu="off")
    assert not off.measures_menu
    assert not search_config(store_copy, menu="auto", device="cpu").measures_menu  # auto: on a GPU only
    assert not search_config(store_copy, menu="measure", dmpq=False).measures_menu  # nothing quantized
    run_search(off, log=lambda *_: None)
    with pytest.raises(ValueError, match=r"measured_menu: study False vs now True"):
        run_search(search_config(store_copy, trials=4, study="keep-menu", menu="measure"), log=lambda *_: None)


def test_cli_menu_choices(store_copy, capsys):
    with pytest.raises(SystemExit):
        main(["search", "--store", str(store_copy), "--model", MODEL, "--prompt", PROMPTS[0], "--menu", "fast"])
    assert "argument --menu: invalid choice: 'fast'" in capsys.readouterr().err
