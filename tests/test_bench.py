"""``sixbit-tune bench --smoke``: the end-to-end benchmark's code paths on the CPU with tiny models.

Runs the real benchmark (benchmarks/e2e.py through the CLI) on a tiny Wan pipeline (the "reference" role: policy
applied, skip map recorded, FirstBlockCache measured, quality against the float32 eager video) and a tiny CogVideoX
transformer (the "shape" role: the recorded skip map replayed), then checks the result file.
"""

from __future__ import annotations

import json
import math

import pytest

from sixbit_tune.cli import main
from sixbit_tune.models.adapters import get_adapter
from sixbit_tune.models.specs import load_pipeline
from sixbit_tune.policy import save
from sixbit_tune.runtime import make_dynamic_policy

REQUIRED = ("latency_s", "speedup_vs_bf16_compiled", "peak_memory_bytes", "weight_bytes", "psnr_db", "nvfp4_share",
            "skip_share")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    pipe = load_pipeline("tiny:wan")
    names = list(get_adapter(pipe).all_linears())
    # half the layers dynamic (predicted error = Γ), the rest NVFP4; a loose cache so that blocks are skipped
    policy = make_dynamic_policy(pipe, {n: (1.0, 0.0, None, None) for n in names[::2]}, 0.5, other_layers="nvfp4",
                                 tdc_tolerance=5.0, warmup=1, cooldown=1, spec="tiny:wan")
    save(policy, tmp / "policy.json")
    out = tmp / "out"
    rc = main(["bench", "--smoke", "--no-compile", "--steps", "4", "--policy", str(tmp / "policy.json"),
               "--out", str(out), "--budget-s", "900"])
    assert rc == 0
    data = json.loads((out / "e2e.json").read_text())
    return data, tmp


def _rows(data, workload):
    return {r["contender"]: r for r in data["results"] if r["workload"] == workload}


def test_every_contender_has_numbers_or_a_stated_reason(smoke):
    data, _ = smoke
    assert [w["spec"] for w in data["workloads"]] == ["tiny:wan", "tiny:cogvideox", "tiny:wan"]
    expected = {"bf16-eager", "bf16-compiled", "ours-int8", "ours-nvfp4", "torchao-int8-dynamic",
                "torchao-fp8-dynamic"}
    for w in ("tiny:wan (pipeline)", "tiny:cogvideox (transformer)", "tiny:wan (transformer)"):
        rows = _rows(data, w)
        assert expected <= set(rows), set(rows)
        for name, r in rows.items():
            for key in REQUIRED:
                assert key in r, (w, name, key)
            if r["error"] is None:
                assert r["latency_s"] > 0 and math.isfinite(r["latency_s"]), (w, name)
                assert r["latency_step_s"] > 0
                assert r["weight_bytes"] > 0
            else:
                assert isinstance(r["error"], str) and r["error"], (w, name)
    meta = data["meta"]
    for key in ("torch", "triton", "date", "command", "device"):
        assert key in meta
    assert "--smoke" in meta["command"]


def test_baselines_ours_and_quality(smoke):
    data, _ = smoke
    wan = _rows(data, "tiny:wan (pipeline)")
    for name in ("bf16-eager", "bf16-compiled", "ours-int8", "ours-nvfp4", "ours-chosen"):
        assert wan[name]["error"] is None, (name, wan[name]["error"])
    assert wan["bf16-compiled"]["speedup_vs_bf16_compiled"] == pytest.approx(1.0)
    assert wan["bf16-eager"]["psnr_db"] == 100.0  # the quality reference itself
    # quantized runs differ from the float32 reference, but finitely
    assert 10.0 < wan["ours-nvfp4"]["psnr_db"] < 100.0
    assert wan["ours-nvfp4"]["nvfp4_share"] == 1.0 and wan["ours-int8"]["nvfp4_share"] == 0.0
    # NVFP4 weights are smaller than INT8 ones, both smaller than float32
    assert wan["ours-nvfp4"]["linear_weight_bytes"] < wan["ours-int8"]["linear_weight_bytes"] < \
        wan["bf16-eager"]["linear_weight_bytes"]
    chosen = wan["ours-chosen"]
    assert chosen["skip_share"] > 0, "the loose cache should skip blocks"
    assert 0 < chosen["nvfp4_share"] < 1
    fbc = [r for n, r in wan.items() if n.startswith("fbc-")]
    assert fbc and all(r["error"] is None and r["skip_share"] is not None for r in fbc)


@pytest.mark.parametrize("workload", ["tiny:cogvideox (transformer)", "tiny:wan (transformer)"])
def test_shape_role_replays_the_recorded_skip_map(smoke, workload):
    """Batched CFG (CogVideoX, one call) and separate CFG (Wan, two contexts) both replay the recorded map."""
    data, _ = smoke
    assert data["replay"]["ours_map"], "the skip map of the chosen policy was not recorded"
    rows = _rows(data, workload)
    replay = rows["ours-chosen (replay)"]
    assert replay["error"] is None, replay["error"]
    assert replay["psnr_db"] is None  # random weights: no quality figure
    assert replay["replay"]["replayed_map_share"] > 0
    assert replay["skip_share"] == pytest.approx(replay["replay"]["replayed_map_share"], abs=1e-9)
    assert 0 < replay["nvfp4_share"] < 1
    fbc = [r for n, r in rows.items() if n.startswith("fbc-")]
    assert fbc and fbc[0]["error"] is None and fbc[0]["skip_share"] == pytest.approx(
        fbc[0]["replay"]["replayed_map_share"], abs=1e-9)


def test_render_writes_table_figure_and_readme_section(smoke, tmp_path):
    data, tmp = smoke
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nintro\n\n## Results on the H200\n\nold\n\n## Later\n\nkept\n")
    rc = main(["bench", "--render", str(tmp / "out" / "e2e.json"), "--out", str(tmp_path / "e2e-test"),
               "--readme", str(readme)])
    assert rc == 0
    md = (tmp_path / "e2e-test.md").read_text()
    assert "| ours-chosen |" in md and "bf16-compiled" in md
    html = (tmp_path / "e2e-test.html").read_text()
    assert "plotly" in html.lower()
    text = readme.read_text()
    assert "old" not in text and "| ours-chosen |" in text and text.endswith("## Later\n\nkept\n")
    assert json.loads((tmp_path / "e2e-test.json").read_text())["results"]


def test_scale_map_keeps_the_reference_share_per_context_and_is_conservative_when_batched():
    from sixbit_tune.commands.bench import _load

    e2e = _load()
    # 4 steps x 2 blocks of skip fractions over two reference contexts (0.5: one of the two skipped)
    frac = [[0.0, 0.0], [1.0, 0.5], [0.5, 0.5], [1.0, 1.0]]
    two = e2e.scale_map(frac, 4, 2, ["cond", "uncond"])
    assert two["cond"] == [[False, False], [True, True], [True, True], [True, True]]
    assert two["uncond"] == [[False, False], [True, False], [False, False], [True, True]]
    assert e2e.map_share(two) == pytest.approx(sum(map(sum, frac)) / 8)  # the reference's share, exactly
    one = e2e.scale_map(frac, 4, 2, ["cond_uncond"])
    assert one["cond_uncond"] == [[False, False], [True, False], [False, False], [True, True]]
    # more target blocks than reference blocks: each follows its reference block; step 0 never skips
    wide = e2e.scale_map(frac, 4, 4, ["cond", "uncond"])
    assert [row[:2] == [row[0]] * 2 for row in wide["cond"]] == [True] * 4
    assert not any(wide["cond"][0]) and e2e.map_share(wide) == pytest.approx(e2e.map_share(two))
    fbc = e2e.scale_map(frac, 4, 3, ["cond", "uncond"], fbc=True)
    assert all(not row[0] for m in fbc.values() for row in m)  # FirstBlockCache's head block always runs


def test_several_policies_each_need_a_distinct_name_and_an_existing_file(tmp_path, capsys):
    from argparse import Namespace

    from sixbit_tune.commands.bench import _load

    e2e = _load()
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text("{}")
    b.write_text("{}")
    got = e2e.policy_args(Namespace(policy=f"{a}, {b}", policy_name="ours-tuned,ours-bf16-tdc"))
    assert got == [("ours-tuned", str(a)), ("ours-bf16-tdc", str(b))]
    for policy, names, match in ((f"{a},{b}", "ours-chosen", "2 policies and --policy-name 1"),
                                 (f"{a},{b}", "x,x", "distinct names"),
                                 (str(tmp_path / "missing.json"), "x", "no such file")):
        with pytest.raises(SystemExit, match=match):
            e2e.policy_args(Namespace(policy=policy, policy_name=names))
    # the CLI refuses before loading any model or writing any result
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="one name per policy"):
        main(["bench", "--smoke", "--policy", f"{a},{b}", "--out", str(out)])
    assert not out.exists()
