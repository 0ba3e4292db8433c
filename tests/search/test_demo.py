"""`sixbit-tune demo --quick` end to end, as CI runs it."""

from __future__ import annotations

import sys

from search_helpers import run_cli


def test_demo_quick_runs_offline_and_exports_a_loadable_policy(tmp_path):
    from sixbit_tune.policy import load

    res = run_cli([sys.executable, "-m", "sixbit_tune.cli", "demo", "--quick", "--out-dir", "tmp", "--device", "cpu"],
                  timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    for needle in ("fit fit-", "R² over", "study demo-", "PSNR vs unquantized", "NVFP4 layer-calls",
                   "skipped blocks", "sixbit-tune dashboard --store tmp/store", "searches only the cache",
                   "side by side", "on this cpu the policy is"):
        assert needle in out, needle
    assert "profile:" in res.stderr, "the profile stage shows its progress"
    # everything the demo writes lies beside its store: nothing in the working folder's policies/
    assert not (tmp_path / "policies").exists()
    policy = load(tmp_path / "tmp" / "policy.json")
    assert policy.provenance.study.startswith("demo-") and policy.measured.psnr_db is not None
    assert (tmp_path / "tmp" / "store" / "meta.json").is_file()
    # on a CPU the demo searches the cache alone (the search's cache-only option): every layer keeps its weights,
    # the cache is on
    assert {layer.weight for layer in policy.dmpq.layers.values()} == {"none"}
    assert policy.tdc.tolerance > 0
    import optuna

    from sixbit_tune.search.study import open_storage

    study = optuna.load_study(study_name=policy.provenance.study,
                              storage=open_storage(str(tmp_path / "tmp" / "store" / "optuna.journal")))
    assert study.user_attrs["dmpq"] is False
    assert "tau" not in study.trials[policy.provenance.trial].params
    # a cache-only search uses no attention predictors: the CPU demo's profile records no attention errors
    from sixbit_tune.store import Store

    with Store.open(tmp_path / "tmp" / "store", read_only=True) as store:
        assert len(store.attn_steps()) == 0 and len(store.block_steps()) > 0
