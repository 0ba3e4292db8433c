"""The search searches the attention threshold where the fit has attention predictors, and each trial's policy
carries the attention section it was measured with."""

from __future__ import annotations

import math

from optuna.trial import TrialState
from search_helpers import search_config

from sixbit_tune.predictor import attention_predictors
from sixbit_tune.search.space import SearchSpace, attention_quantiles, derive_space


def _refit_trusting_every_line(path) -> str:
    """The tiny profile's attention lines miss the default trust bar (R² < 0.5): fit again with the bar at 0, so
    every block has a trusted attention predictor. Returns the new fit id (the store's latest)."""
    from sixbit_tune.predictor import FitSettings, fit_store, write_fit
    from sixbit_tune.store import Store

    with Store.open(path) as store:
        result = fit_store(store, settings=FitSettings(min_r2=0.0, max_rel_rmse=1e9))
        return write_fit(store.writer(), result)


def test_attention_quantiles_and_space_from_the_profiled_store(store_copy):
    from sixbit_tune.store import Store

    with Store.open(store_copy, read_only=True) as store:  # as profiled: no attention line is trusted
        preds = attention_predictors(store)
        assert not any(preds.trusted.values())
        assert attention_quantiles(store, preds.fit_id, preds.run_ids) == ({}, None)
    _refit_trusting_every_line(store_copy)
    with Store.open(store_copy, read_only=True) as store:
        preds = attention_predictors(store)
        attn_q, fmt = attention_quantiles(store, preds.fit_id, preds.run_ids)
    assert fmt == preds.format and attn_q["n"] > 0 and attn_q["q01"] <= attn_q["q99"]
    sp = derive_space({"q01": 0.1, "q99": 0.2, "n": 10}, {"q95": 0.3, "n": 5}, steps=4, attn_q=attn_q,
                      attn_format=fmt)
    assert sp.attn_tau_low <= attn_q["q01"] <= attn_q["q99"] <= sp.attn_tau_high
    assert SearchSpace.from_dict(sp.to_dict()) == sp
    assert derive_space({}, {}, steps=4).attn_tau_low is None  # no attention predictors: not searched


def test_search_tries_attention_thresholds_and_trial_policies_carry_them(store_copy):
    from sixbit_tune.runtime import apply_policy
    from sixbit_tune.search.quality import generate
    from sixbit_tune.search.runner import SearchContext
    from sixbit_tune.search.study import run_search

    _refit_trusting_every_line(store_copy)
    config = search_config(store_copy, trials=2, study="att", reference_corners=False, quality_floor_db=0.0)
    study = run_search(config, log=lambda *_: None)
    space = SearchSpace.from_dict(study.user_attrs["space"])
    assert space.attn_tau_low is not None and space.attn_format in ("fp8", "int8")
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert done, [t.user_attrs.get("fail_reason") for t in study.trials]
    ctx = SearchContext(config)
    for t in done:
        assert space.attn_tau_low <= t.params["attn_tau"] <= space.attn_tau_high
        policy = ctx.build_policy(t.params)
        att = policy.attention
        assert att is not None and att.threshold == t.params["attn_tau"] and att.format == space.attn_format
        assert att.blocks and all(b.mode == "dynamic" and b.predictor for b in att.blocks.values())
    # At a threshold above every prediction, every computation after a context's first step runs 8-bit attention.
    params = dict(done[0].params, attn_tau=1e9, delta=0.0)
    with apply_policy(ctx.pipe, ctx.build_policy(params)) as h:
        generate(ctx.pipe, ctx.prompts[0], 0, ctx.generation)
        stats = h.stats()
    later = [s.attention_calls for s in stats.steps if s.step > 0]
    assert later and all(set(c) == {"8bit"} for c in later)
    assert math.isclose(stats.attention_8bit_share, len(later) / len(stats.steps))

