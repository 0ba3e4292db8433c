"""The policy page's precision and skip maps on real profiles of a two-block-list model (tiny HunyuanVideo) and a
batched-CFG model (tiny CogVideoX), each checked against the rule computed independently from the stored block
rows; layer rows of a prompt still in flight; how a slow-down reads."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pandas as pd
import pytest
from sixbit_tune.dashboard import data, figures

from sixbit_tune.store import Store

STEPS = 4
PROMPT = "a red square moving left"


def _profile(tmp_path_factory, family: str):
    from sixbit_tune.profiling.runner import ProfileConfig, profile

    path = tmp_path_factory.mktemp(family) / "store"
    profile(ProfileConfig(model=f"tiny:{family}", prompts=[PROMPT], store=str(path), steps=STEPS, device="cpu",
                          progress=False))
    return path


@pytest.fixture(scope="module")
def hunyuan_store(tmp_path_factory):
    return _profile(tmp_path_factory, "hunyuanvideo")


@pytest.fixture(scope="module")
def cogvideox_store(tmp_path_factory):
    return _profile(tmp_path_factory, "cogvideox")


def _all_dynamic_policy(family: str, threshold: float, **tdc) -> tuple[dict, dict[str, int]]:
    """Every in-block linear dynamic with predictor 1·Γ + 0 (so a layer is fast iff its block's Γ ≤ τ), and each
    layer's block index from the model adapter."""
    from sixbit_tune.models.adapters import get_adapter
    from sixbit_tune.models.tiny import tiny_transformer
    from sixbit_tune.runtime.build import make_dynamic_policy

    model = tiny_transformer(family)
    adapter = get_adapter(model)
    block_of = {f"{ref.name}.{rel}": ref.index for ref in adapter.blocks() for rel in adapter.linears(ref)}
    policy = make_dynamic_policy(model, {n: (1.0, 0.0, None, None) for n in block_of}, threshold, **tdc)
    return policy.to_dict(), block_of


def _gamma(store: Store, run: str) -> pd.DataFrame:
    return store.block_steps([run])[["prompt_index", "branch", "block_index", "block", "step", "gamma"]]


def test_hunyuan_single_stream_layers_follow_their_own_block(hunyuan_store):
    with Store.open(hunyuan_store, read_only=True) as store:
        run = store.runs(kind="profile")["run_id"].iloc[0]
        g = _gamma(store, run)
        names = g.drop_duplicates("block_index").set_index("block_index")["block"].to_dict()
        assert names == {0: "transformer_blocks.0", 1: "single_transformer_blocks.0"}
        g0 = g[(g["block_index"] == 0) & (g["step"] == 0)]["gamma"].to_numpy()
        g1 = g[(g["block_index"] == 1) & (g["step"] == 0)]["gamma"].to_numpy()
        assert (g0 != g1).all()  # the test needs blocks that decide differently
        tau = float((g0.mean() + g1.mean()) / 2) if abs(g0.mean() - g1.mean()) > 0 else 0.0
        policy, block_of = _all_dynamic_policy("hunyuanvideo", tau)
        precision, skips = data.policy_maps(store, policy, run)

    single = [n for n in block_of if n.startswith("single_transformer_blocks.")]
    assert single and all(block_of[n] == 1 for n in single)
    got_blocks = precision.drop_duplicates("layer").set_index("layer")["block_index"].to_dict()
    assert got_blocks == block_of
    assert set(precision[precision["block_index"] == 1]["block"]) == {"single_transformer_blocks.0"}
    assert set(skips[skips["block_index"] == 1]["block"]) == {"single_transformer_blocks.0"}
    checked = 0
    for layer, b in block_of.items():
        got = precision[precision["layer"] == layer].set_index("step")["nvfp4_share"]
        assert got[0] == 0.0  # first step: the policy's first-step format (int8)
        for t in range(1, STEPS):
            prev = g[(g["block_index"] == b) & (g["step"] == t - 1)]["gamma"].to_numpy()
            assert got[t] == pytest.approx(np.mean(prev <= tau)), (layer, t)
            checked += 1
    assert checked == len(block_of) * (STEPS - 1)
    # The two blocks really decided differently at step 1 (so a layer put on the wrong block shows).
    at1 = precision[precision["step"] == 1].groupby("block_index")["nvfp4_share"].mean()
    assert at1[0] != at1[1]


def test_tdc_blocks_are_the_adapters_indices(hunyuan_store):
    with Store.open(hunyuan_store, read_only=True) as store:
        run = store.runs(kind="profile")["run_id"].iloc[0]
        policy, _ = _all_dynamic_policy("hunyuanvideo", 0.0, tdc_tolerance=1e9, warmup=0, cooldown=0, max_skips=1,
                                        blocks=[1])
        _, skips = data.policy_maps(store, policy, run)
    by_block = skips.pivot_table(index="block_index", columns="step", values="skip_share")
    assert by_block.loc[0].tolist() == [0.0] * STEPS  # not allowed to cache
    # computed at 0 and 1 (a change rate needs two computations), skipped at 2, computed at 3 (max_skips 1)
    assert by_block.loc[1].tolist() == [0.0, 0.0, 1.0, 0.0]


def test_batched_cfg_decides_both_branches_jointly(cogvideox_store):
    """CogVideoX carries [uncond; cond] in one transformer call: a layer runs NVFP4 only if both rows allow it."""
    with Store.open(cogvideox_store, read_only=True) as store:
        run = store.runs(kind="profile")["run_id"].iloc[0]
        assert data.run_settings(store, run)["cfg_mode"] == "batched"
        g = _gamma(store, run)
        first = g[(g["block_index"] == 0) & (g["step"] == 0)].set_index("branch")["gamma"]
        assert set(first.index) == {"cond", "uncond"} and first["cond"] != first["uncond"]
        tau = float(first.mean())  # between the two branches' Γ: one row allows NVFP4, the other does not
        policy, block_of = _all_dynamic_policy("cogvideox", tau)
        precision, _ = data.policy_maps(store, policy, run)
    for layer, b in block_of.items():
        got = precision[precision["layer"] == layer].set_index("step")["nvfp4_share"]
        for t in range(1, STEPS):
            prev = g[(g["block_index"] == b) & (g["step"] == t - 1)]["gamma"].to_numpy()
            assert len(prev) == 2
            assert got[t] == float((prev <= tau).all()), (layer, t)
    assert precision[(precision["step"] == 1) & (precision["block_index"] == 0)]["nvfp4_share"].eq(0.0).all()


def test_layer_rows_of_a_prompt_in_flight_are_not_averaged(hunyuan_store, tmp_path):
    path = tmp_path / "store"
    shutil.copytree(hunyuan_store, path)
    with Store.open(path, read_only=True) as store:
        run = store.runs(kind="profile")["run_id"].iloc[0]
        before = {f: data.layer_error_grid(store, run, f) for f in ("nvfp4", "int8")}
        summary = data.format_summary(store, run)
        rows = store.layer_steps([run])
    # A second prompt whose layer rows are written but whose block rows are not yet (the profiler writes a
    # prompt's layer rows first), with errors far from the first prompt's.
    late = rows[["prompt_index", "branch", "step", "block_index", "layer", "format", "act_err", "out_err"]].copy()
    late["prompt_index"] = 1
    late["out_err"] = late["out_err"] * 1000.0
    with Store.open(path) as store:
        store.writer("late").write_layer_steps(late, run_id=run)
    with Store.open(path, read_only=True) as store:
        assert len(store.layer_steps([run])) == 2 * len(rows)  # the rows are there
        for f, grid in before.items():
            pd.testing.assert_frame_equal(data.layer_error_grid(store, run, f), grid)
        pd.testing.assert_frame_equal(data.format_summary(store, run), summary)


# ------------------------------------------------------------------------------------------------ speed-up


@pytest.mark.parametrize(
    ("speedup", "negative", "words"),
    [(0.45, True, "2.22× slower than baseline"), (0.84, True, "1.19× slower"), (1.8, False, "1.80× faster"),
     (1.25, False, "+25% speed")],
)
def test_speed_delta_reads_a_slowdown_as_one(speedup, negative, words):
    from streamlit.elements.metric import _determine_delta_color_and_direction
    from streamlit.proto.Metric_pb2 import Metric as MetricProto

    d = data.speed_delta(speedup)
    assert words in d["delta"]
    shown = _determine_delta_color_and_direction(d["delta_color"], d["delta"])
    if negative:
        assert "faster" not in d["delta"]
        assert shown.direction == MetricProto.MetricDirection.DOWN and shown.color == MetricProto.MetricColor.RED
    else:
        assert "slower" not in d["delta"]
        assert shown.direction == MetricProto.MetricDirection.UP and shown.color == MetricProto.MetricColor.GREEN


def test_speed_delta_no_change_and_missing():
    assert data.speed_delta(1.001)["delta_color"] == "off" and "same speed" in data.speed_delta(1.001)["delta"]
    assert data.speed_delta(None)["delta"] is None
    assert data.speed_delta(math.nan)["delta"] is None
    with pytest.raises(ValueError, match="positive finite"):
        data.speed_delta(0.0)


def test_gpu_comparison_figure_marks_a_slowdown():
    comp = pd.DataFrame({"store": ["a", "b"], "gpu": ["CPU", "H200"], "latency_ms": [10.0, 5.0],
                         "speedup": [0.45, 1.8], "psnr_db": [40.0, 35.0], "nvfp4_share": [0.0, 0.5],
                         "skip_share": [0.2, 0.3]})
    fig = figures.gpu_comparison_figure(comp)
    speed = [t for t in fig.data if t.name == "speedup"][0]
    assert list(speed.marker.color) == [figures.SLOWER, figures.FASTER]
    assert "slower" in speed.text[0] and "slower" not in speed.text[1]
    assert any(s.y0 == 1.0 and s.y1 == 1.0 for s in fig.layout.shapes)  # the 1× baseline
