"""Peak memory as a measured objective and a constraint (``--max-memory``), and the cache-only search.

Real tiny Wan pipeline, real profile and fit, real Optuna journal storage and store; on the CPU the peak comes from
torch's CPU allocator (``sixbit_tune.search.memory``).
"""

from __future__ import annotations

import json
import math

import optuna
import pytest
import torch
from optuna.trial import TrialState
from search_helpers import MODEL, cli_args, run_cli, search_config


def _mirror(store_path, study):
    from sixbit_tune.store import Store

    with Store.open(store_path, read_only=True) as s:
        return s.trials(study)


def _journal(store):
    from sixbit_tune.search.study import open_storage

    return open_storage(str(store / "optuna.journal"))


def _peak(t) -> int:
    return t.user_attrs["figures"]["memory_bytes"]


# ------------------------------------------------------------------------------------------------ the measurement
def test_allocator_peak_sees_the_highest_bytes_torch_tensors_held_on_the_cpu():
    from sixbit_tune.search.memory import AllocatorPeak

    n = 1 << 20
    before = torch.empty(n)  # held before the measurement: released inside, never subtracted
    with AllocatorPeak() as mem:
        a = torch.empty(n)
        b = torch.empty(2 * n)
        a_bytes = a.nbytes
        del a
        c = torch.empty(n)
        del before
    expected = b.nbytes + max(a_bytes, c.nbytes)  # a and b together, then b and c
    assert mem.peak_bytes >= expected
    assert mem.peak_bytes < expected + n  # nothing else of that size was allocated


def test_each_trial_records_its_measured_peak_memory(store_copy):
    from sixbit_tune.models.specs import load_pipeline
    from sixbit_tune.search.memory import CPU_METHOD, AllocatorPeak, resident_bytes
    from sixbit_tune.search.quality import GenerationSettings, generate
    from sixbit_tune.search.study import run_search

    config = search_config(store_copy, trials=3, study="mem", dmpq=False)
    study = run_search(config, log=lambda *_: None)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 3, [t.user_attrs.get("fail_reason") for t in study.trials]
    assert study.user_attrs["memory_metric"] == CPU_METHOD
    rows = _mirror(store_copy, "mem")
    pipe = load_pipeline(MODEL)
    weights = resident_bytes(pipe)
    for t in done:
        f = t.user_attrs["figures"]
        # the objective is the measured peak, the same figure the store row records, above the weights alone
        assert t.values[1] == f["memory_bytes"] == f["peak_memory_bytes"]
        assert f["memory_bytes"] > weights
        r = rows[rows["number"] == t.number].iloc[0]
        assert int(r["peak_memory_bytes"]) == f["memory_bytes"]
        assert json.loads(r["quality"])["memory_metric"] == CPU_METHOD
    # the baseline's peak is what one unquantized generation of the same case holds, measured independently
    base = study.user_attrs["baseline"]
    settings = GenerationSettings(**study.user_attrs["generation"])
    pipe.set_progress_bar_config(disable=True)
    with AllocatorPeak() as mem:
        generate(pipe, config.prompts[0], config.seeds[0], settings)
    assert base["peak_memory_bytes"] == pytest.approx(weights + mem.peak_bytes, rel=0.05)


# ------------------------------------------------------------------------------------------------ --max-memory
@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "lots"])
def test_bad_max_memory_values_give_one_clear_cli_error(store_copy, value):
    res = run_cli(cli_args(store_copy, 1, f"--max-memory={value}"))
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "--max-memory" in lines[-1] and "GiB" in lines[-1], res.stderr
    assert "Traceback" not in res.stderr
    assert not (store_copy / "optuna.journal").exists()  # nothing started


@pytest.mark.parametrize("value", [-1.0, 0.0, math.nan, math.inf])
def test_bad_max_memory_values_are_refused_by_the_config(store_copy, value):
    with pytest.raises(ValueError, match="max_memory_gib must be a positive, finite number of GiB"):
        search_config(store_copy, max_memory_gib=value)


def test_max_memory_below_every_peak_records_infeasible_trials_and_names_the_smallest_peak(store_copy):
    from sixbit_tune.models.specs import load_pipeline
    from sixbit_tune.search.memory import resident_bytes

    # below the model's own weights: no policy can fit
    budget = resident_bytes(load_pipeline(MODEL)) / 2 / 2**30
    args = [a for a in cli_args(store_copy, 2, "--study", "tight", "--cache-only", "--max-memory", repr(budget))
            if a != "--no-progress"]
    res = run_cli(args)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    # the progress bar shows the latest peak and how many trials fit
    assert "peak=" in res.stderr and "fit=0/2" in res.stderr, res.stderr[-2000:]
    study = optuna.load_study(study_name="tight", storage=_journal(store_copy))
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 2  # measured and kept, not failed
    smallest = min(done, key=_peak)
    line = res.stderr.strip().splitlines()[-1]
    assert "fits --max-memory" in line and f"({_peak(smallest)} bytes" in line and f"trial {smallest.number}" in line
    for t in done:
        assert t.constraints["max_memory"] == pytest.approx(_peak(t) / 2**30 - budget)
        assert t.constraints["max_memory"] > 0
    rows = _mirror(store_copy, "tight")
    assert set(rows["state"]) == {"COMPLETE"}
    assert all(json.loads(q)["feasible"] is False for q in rows["quality"])
    assert "no (memory)" in res.stdout  # the table says why


def test_max_memory_between_peaks_chooses_only_trials_that_fit(store_copy, tmp_path):
    from sixbit_tune.commands.export import best_trial
    from sixbit_tune.policy import load
    from sixbit_tune.search.study import feasible, run_search

    # The reference corners (static INT8, static NVFP4, DMPQ without the cache) store different encodings: a
    # first study tells the peaks they measure, a second one searches them under a budget between those peaks.
    probe = run_search(search_config(store_copy, trials=3, study="probe", quality_floor_db=0.0),
                       log=lambda *_: None)
    peaks = sorted({_peak(t) for t in probe.trials if t.state == TrialState.COMPLETE})
    assert len(peaks) >= 2, peaks
    budget = (peaks[0] + peaks[-1]) / 2 / 2**30
    res = run_cli(cli_args(store_copy, 3, "--study", "fit", "--quality-floor", "0", "--max-memory", repr(budget)))
    assert res.returncode == 0, res.stderr[-3000:]
    study = optuna.load_study(study_name="fit", storage=_journal(store_copy))
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    over = [t for t in done if _peak(t) > budget * 2**30]
    under = [t for t in done if _peak(t) <= budget * 2**30]
    assert over and under, [(t.number, _peak(t)) for t in done]
    assert not any(feasible(t) for t in over)
    assert all(feasible(t) for t in under)
    # only fitting trials are on the reported Pareto front and chosen: the fastest of them
    assert {t.number for t in study.best_trials} <= {t.number for t in under}
    chosen = best_trial(study)
    assert chosen.number == min(under, key=lambda t: (t.values[0], t.values[1], t.number)).number
    assert f"trial {chosen.number}," in res.stdout and f"{budget:g} GiB of peak memory" in res.stdout
    out = tmp_path / "p.json"
    exp = run_cli([*cli_args(store_copy, 1)[:3], "export", "--store", str(store_copy), "--study", "fit",
                   "--out", str(out)])
    assert exp.returncode == 0, exp.stderr[-2000:]
    policy = load(out)
    assert policy.provenance.trial == chosen.number
    assert policy.measured.peak_memory_bytes <= budget * 2**30

    # a study searched under one budget is not resumed under another
    with pytest.raises(ValueError, match="max_memory_gib"):
        run_search(search_config(store_copy, trials=4, study="fit", quality_floor_db=0.0, max_memory_gib=2 * budget),
                   log=lambda *_: None)


# ------------------------------------------------------------------------------------------------ cache only
def test_cache_only_search_keeps_every_linear_unquantized_and_searches_only_the_cache(store_copy):
    from sixbit_tune.search.study import run_search

    study = run_search(search_config(store_copy, trials=3, study="cache", dmpq=False), log=lambda *_: None)
    assert study.user_attrs["dmpq"] is False and study.user_attrs["space"]["dmpq"] is False
    assert not any(t.user_attrs.get("reference") for t in study.trials)  # no quantized corners
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 3, [t.user_attrs.get("fail_reason") for t in study.trials]
    for t in done:
        assert "tau" not in t.params and t.params["refresh_robust"] == 0
        assert {"delta", "warmup", "cooldown", "max_skips", "cache_dtype", "extrapolate"} <= set(t.params)
        layers = t.user_attrs["policy"]["dmpq"]["layers"]
        assert layers and {v["weight"] for v in layers.values()} == {"none"}
        assert t.user_attrs["figures"]["nvfp4_share"] in (None, 0.0)
        assert t.user_attrs["policy"]["tdc"]["tolerance"] == pytest.approx(t.params["delta"])
    # the cache-only study is not resumed as a mixed-precision one
    with pytest.raises(ValueError, match="dmpq"):
        run_search(search_config(store_copy, trials=4, study="cache"), log=lambda *_: None)
