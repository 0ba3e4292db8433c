"""The gptq NVFP4 weight encoder in a search: the profile records each in-block linear's ``sum xᵀx`` (opt-in), a
gptq search uses it, a gptq search without it is refused naming what to run, and the export writes the Hessians
beside the policy so that the policy can be applied elsewhere.

Real tiny pipelines, real profiles, fits and searches on real files.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from search_helpers import MODEL, PROMPTS, STEPS, search_config

from sixbit_tune import policy as P
from sixbit_tune.cli import main
from sixbit_tune.errors import PolicyError
from sixbit_tune.profiling.calibration import CalibrationMissingError, hessian_files, load_hessians


@pytest.fixture(scope="module")
def calibrated_store(tmp_path_factory):
    """A profile of tiny:wan with Hessians (one prompt) and a fit: built once, copied by each test."""
    from sixbit_tune.predictor import fit_store, write_fit
    from sixbit_tune.profiling.runner import ProfileConfig, profile
    from sixbit_tune.store import Store

    path = tmp_path_factory.mktemp("calibrated") / "store"
    profile(ProfileConfig(model=MODEL, prompts=list(PROMPTS), store=str(path), steps=STEPS, device="cpu",
                          progress=False, nvfp4_hessians=True))
    with Store.open(path) as store:
        write_fit(store.writer(), fit_store(store))
    return path


def test_profile_hessians_equal_an_independent_sum_over_the_linears_inputs():
    from sixbit_tune.models.specs import load_pipeline
    from sixbit_tune.profiling.hooks import instrument
    from sixbit_tune.search.quality import GenerationSettings, generate

    pipe = load_pipeline(MODEL, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    inst = instrument(pipe, formats=("nvfp4",), attention_formats=(), hessians=True)
    mine, handles = {}, []
    try:
        linears = {n: m for n, m in pipe.transformer.named_modules() if n in set(inst.layer_names)}
        assert len(linears) == len(inst.layer_names) > 0

        def hook_for(name):
            def hook(_mod, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                mine[name] = mine.get(name, 0) + x.T @ x
            return hook

        handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in linears.items()]
        generate(pipe, PROMPTS[0], 0, GenerationSettings.for_model(MODEL, steps=2))
    finally:
        for h in handles:
            h.remove()
        inst.remove()
    hess, rows = inst.nvfp4_hessians()
    assert set(hess) == {n for n, m in linears.items() if m.in_features % 16 == 0} == set(mine)
    for name, h in hess.items():
        assert h.dtype == torch.float64 and h.shape == (linears[name].in_features,) * 2
        torch.testing.assert_close(h, mine[name], rtol=1e-9, atol=1e-9)
        assert rows[name] > 0


def test_profile_without_the_option_writes_no_hessians(store_copy):
    from sixbit_tune.store import Store

    with Store.open(store_copy) as st:
        runs = list(st.runs()["run_id"])
    assert runs and hessian_files(store_copy, runs) == []
    with pytest.raises(CalibrationMissingError, match="--nvfp4-hessians"):
        load_hessians(store_copy, runs)


def test_gptq_search_without_hessians_names_what_to_run(store_copy, capsys):
    code = main(["search", "--store", str(store_copy), "--model", MODEL, "--trials", "3", "--prompt", PROMPTS[0],
                 "--repeats", "1", "--warmup-runs", "0", "--device", "cpu", "--no-progress",
                 "--weights", "nvfp4", "--nvfp4-encoder", "gptq"])
    err = capsys.readouterr().err
    assert code == 2
    assert "gptq NVFP4 weight encoder needs calibration Hessians" in err
    assert "sixbit-tune profile ... --nvfp4-hessians" in err and "ProfileConfig(nvfp4_hessians=True)" in err
    assert not (store_copy / "optuna.journal").exists()  # refused before any study was created


def test_gptq_search_and_export_give_a_deployable_policy(calibrated_store, tmp_path, capsys):
    from sixbit_tune.models.specs import load_pipeline
    from sixbit_tune.runtime import apply_policy
    from sixbit_tune.search.export import export_trial, hessians_path
    from sixbit_tune.search.quality import compare, generate
    from sixbit_tune.search.runner import SearchContext
    from sixbit_tune.search.study import run_search

    store = tmp_path / "store"
    shutil.copytree(calibrated_store, store)
    config = search_config(store, trials=1, weights="nvfp4", nvfp4_encoder="gptq", study="g", reference_corners=False)
    study = run_search(config, log=lambda *_: None)
    assert study.user_attrs["nvfp4_encoder"] == "gptq"
    trial = study.get_trials(deepcopy=False)[0]
    out = tmp_path / "policies" / "g.json"
    path, policy, _ = export_trial(store, "g", trial.number, out)
    policy = P.load(path)
    # the CLI export names the Hessians file and how to apply the policy with it
    cli_out = tmp_path / "policies" / "cli.json"
    assert main(["export", "--store", str(store), "--study", "g", "--trial", str(trial.number), "--out",
                 str(cli_out)]) == 0
    printed = capsys.readouterr().out
    assert str(hessians_path(cli_out)) in printed and "nvfp4_hessians=torch.load(" in printed
    assert hessians_path(cli_out).is_file()
    assert policy.dmpq.nvfp4_weight_encoder == "gptq"
    assert {lp.weight for lp in policy.dmpq.layers.values()} == {"nvfp4"}
    hess = torch.load(hessians_path(out), weights_only=True)
    assert set(hess) == set(policy.dmpq.layers)
    # the exported policy with the exported Hessians generates what the trial measured
    ctx = SearchContext(config)
    pipe = load_pipeline(MODEL, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(PolicyError, match="nvfp4_hessians"):
        apply_policy(pipe, path)
    handle = apply_policy(pipe, path, nvfp4_hessians=hess)
    try:
        gen = generate(pipe, PROMPTS[0], 0, ctx.generation)
    finally:
        handle.remove()
    q = compare(gen, ctx.reference(PROMPTS[0], 0))
    assert q["psnr_db"] == pytest.approx(trial.user_attrs["figures"]["psnr_db"], abs=1e-6)


def test_gptq_trials_memory_counts_what_a_measurement_of_the_installation_counts(calibrated_store, tmp_path):
    """A gptq policy is installed before the CPU allocator's measurement begins (its encoder's many small
    operations would swamp the profiler); the figure still counts the encodings and the replaced weights: it equals
    the figure of the same policy installed under the measurement."""
    from sixbit_tune.runtime import apply_policy
    from sixbit_tune.search.runner import SearchContext

    store = tmp_path / "store"
    shutil.copytree(calibrated_store, store)
    ctx = SearchContext(search_config(store, weights="nvfp4", nvfp4_encoder="gptq"))
    policy = ctx.build_policy({"tau": 0.0, "delta": 0.0, "warmup": 1, "cooldown": 1, "max_skips": 1})
    figures, _ = ctx.measure(policy)
    _, measured_whole, handle = ctx._run_cases(
        None, apply=lambda: apply_policy(ctx.pipe, policy, nvfp4_hessians=ctx.nvfp4_hessians))
    handle.remove()
    quantized = sum(1 for lp in policy.dmpq.layers.values() if lp.weight == "nvfp4")
    assert quantized == len(policy.dmpq.layers) > 0
    assert figures.memory_bytes == pytest.approx(measured_whole, rel=0.01)


def test_profile_cli_records_the_hessians_only_when_asked(tmp_path):
    for flag, expected in ((["--nvfp4-hessians"], 1), ([], 0)):
        store = tmp_path / f"s{expected}"
        assert main(["profile", "--model", MODEL, "--prompt", PROMPTS[0], "--steps", "2", "--store", str(store),
                     "--device", "cpu", "--no-progress", "--attention-formats", "none", *flag]) == 0
        assert len(list((store / "calibration").glob("*.nvfp4-hessians.pt"))) == expected
