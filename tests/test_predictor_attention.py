"""The attention predictor: attn_err_t ≈ α·Γ_{t−1} + β per block and guidance branch, fitted by the layer fit's own
machinery, recorded in attn_predictors under the fit's id and read back by attention_predictors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sixbit_tune.predictor import attention_predictors, fit_store, write_fit
from sixbit_tune.store import Store


def _synthetic(tmp_path, per_branch: bool):
    """A real store whose attn_err follows known lines of the block's previous Γ (per branch when asked)."""
    rng = np.random.default_rng(3)
    store = Store.create(tmp_path / "store")
    w = store.writer()
    run = w.begin_run("profile", "synthetic", config_hash="h0")
    lines = {0: {"cond": (0.2, 0.01), "uncond": (0.2, 0.01)}, 1: {"cond": (0.05, 0.03), "uncond": (0.05, 0.03)}}
    if per_branch:
        lines[0]["uncond"] = (-0.1, 0.2)
        lines[1]["uncond"] = (0.3, 0.0)
    bs, ls, att = [], [], []
    for p in range(2):
        for br in ("cond", "uncond"):
            gamma = {}
            for t in range(5):
                for b in (0, 1):
                    gamma[t, b] = float(rng.uniform(0.1, 1.0))
                    bs.append(dict(prompt_index=p, branch=br, step=t, block_index=b, gamma=gamma[t, b]))
                    ls.append(dict(prompt_index=p, branch=br, step=t, block_index=b, layer=f"b{b}.q",
                                   format="nvfp4", out_err=0.1))
                    if t:
                        a, c = lines[b][br]
                        att.append(dict(prompt_index=p, branch=br, step=t, block_index=b, format="fp8",
                                        attn_err=a * gamma[t - 1, b] + c))
    w.write_layer_steps(ls, run_id=run)
    w.write_attn_steps(att, run_id=run)
    w.write_block_steps(bs, run_id=run)
    w.finish_run(run)
    return store, lines


@pytest.mark.parametrize("per_branch", [False, True])
def test_known_lines_are_recovered_and_written_per_block_and_branch(tmp_path, per_branch):
    store, lines = _synthetic(tmp_path, per_branch)
    with store:
        result = fit_store(store)
        (fmt,) = result.attention
        att = result.attention[fmt]
        assert fmt == "fp8" and att.fit_id == result.fit_id
        assert att.pooling == ("per_branch" if per_branch else "pooled")
        fit_id = write_fit(store.writer(), result)
        back = attention_predictors(store, fit_id)
    assert back.fit_id == fit_id and back.format == "fp8" and back.pooling == att.pooling
    assert sorted(back.blocks) == [0, 1] and back.trusted == {0: True, 1: True}
    for b, branches in lines.items():
        assert sorted(back.blocks[b]) == ["cond", "uncond"]
        for br, (a, c) in branches.items():
            line = back.blocks[b][br]
            assert line.alpha == pytest.approx(a, abs=1e-9) and line.beta == pytest.approx(c, abs=1e-9)
            assert line.r2 == pytest.approx(1.0) and line.n == (4 * 2 if per_branch else 4 * 2 * 2)


def test_a_fit_without_attention_rows_has_no_attention_predictors_and_says_so(tmp_path):
    store, _ = _synthetic(tmp_path, False)
    with store:
        run = store.runs()["run_id"].iloc[0]
        w = store.writer()
        # a second run of the same model, profiled without attention errors
        r2 = w.begin_run("profile", "synthetic", config_hash="h1")
        w.write_layer_steps([dict(prompt_index=0, branch="cond", step=s, block_index=0, layer="b0.q",
                                  format="nvfp4", out_err=0.1 + s) for s in range(3)], run_id=r2)
        w.write_block_steps([dict(prompt_index=0, branch="cond", step=s, block_index=0, gamma=0.5 + s)
                             for s in range(3)], run_id=r2)
        w.finish_run(r2)
        result = fit_store(store, [r2])
        assert result.attention == {}
        fit_id = write_fit(w, result)
        with pytest.raises(ValueError, match="recorded no attention errors"):
            attention_predictors(store, fit_id)
        with_att = write_fit(w, fit_store(store, [run]))
        with pytest.raises(ValueError, match=r"no int8 attention predictors \(it has \['fp8'\]\)"):
            attention_predictors(store, with_att, "int8")


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory):
    """A real profile of the reference model: 1 prompt x 3 steps with CFG, attn_err in fp8 at every step, INT8
    layer errors at steps 0 and 2."""
    from sixbit_tune.profiling.config import ProfileConfig
    from sixbit_tune.profiling.runner import profile

    path = tmp_path_factory.mktemp("ref") / "store"
    profile(ProfileConfig(model="reference", prompts=["a red square moving left"], store=str(path), steps=3,
                          formats=("int8",), layer_every=2, progress=False))
    return path


def test_fit_on_the_reference_profile(reference_store):
    from sixbit_tune.commands.fit import summarize
    from sixbit_tune.predictor import FitSettings

    with Store.open(reference_store) as store:
        result = fit_store(store, settings=FitSettings(format="int8"))
        fit_id = write_fit(store.writer(), result)
        back = attention_predictors(store)
        pairs = store.query(
            "SELECT a.block_index, a.branch, b.gamma AS g, a.attn_err AS e FROM attn_steps a JOIN block_steps b "
            "ON a.run_id = b.run_id AND a.prompt_index = b.prompt_index AND a.branch = b.branch "
            "AND a.block_index = b.block_index AND b.step = a.step - 1 WHERE a.format = 'fp8'")
        n_blocks = store.query("SELECT count(DISTINCT block_index) AS n FROM block_steps")["n"][0]
    assert back.fit_id == fit_id and sorted(back.blocks) == list(range(n_blocks)) == list(range(8))
    att = result.attention["fp8"]
    for b in range(n_blocks):
        mine = pairs[pairs["block_index"] == b]
        assert len(mine) == 2 * 2  # (steps 1, 2) x (cond, uncond)
        pooled = att.layers[str(b)].pooled
        slope, intercept = np.polyfit(mine["g"], mine["e"], 1)
        assert pooled.n == len(mine)
        assert pooled.alpha == pytest.approx(slope, rel=1e-6) and pooled.beta == pytest.approx(intercept, rel=1e-6)
        for br, line in back.blocks[b].items():
            assert all(math.isfinite(v) for v in (line.alpha, line.beta, line.r2))
            assert 0.0 <= line.r2 <= 1.0
            n_branch = int((mine["branch"] == br).sum())
            assert line.n == (n_branch if back.pooling == "per_branch" else len(mine))
        assert back.trusted[b] is False  # 4 pairs (2 per branch) < min_n: too few to trust, and said so
        assert ("cond: n=2 < 8" if back.pooling == "per_branch" else "n=4 < 8") in back.reasons[b]
    text = summarize(result, fit_id)
    assert f"attention (fp8): {n_blocks} blocks" in text
