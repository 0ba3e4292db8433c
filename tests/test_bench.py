"""The end-to-end benchmark (``benchmarks/e2e/``) on the CPU with tiny models.

The smoke run is the real benchmark started the documented way, ``python -m benchmarks.e2e --smoke``, as a
subprocess whose working directory is the repository root: a tiny Wan pipeline (the "reference" role: policy applied,
skip map recorded through the runtime's public API, FirstBlockCache measured, quality against the float32 eager
video) and tiny CogVideoX / Wan transformers (the "shape" role: the recorded skip maps replayed). Contenders that
need CUDA, torchao or cache-dit must say so in their row.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sixbit_tune.cli import main
from sixbit_tune.models.adapters import get_adapter
from sixbit_tune.models.specs import load_pipeline
from sixbit_tune.policy import save
from sixbit_tune.runtime import make_dynamic_policy

ROOT = Path(__file__).resolve().parents[1]
#: the keys every result row has (the published table's columns)
REQUIRED = ("workload", "contender", "latency_s", "speedup_vs_bf16_compiled", "peak_memory_bytes", "weight_bytes",
            "weight_reduction_vs_bf16", "psnr_db", "ssim", "nvfp4_share", "skip_share", "compiled", "gpu",
            "peak_memory_vs_bf16", "speedup_vs_best_peer")
WORKLOADS = ("tiny:wan (pipeline)", "tiny:cogvideox (transformer)", "tiny:wan (transformer)")


def _e2e():
    from sixbit_tune.commands.bench import _load

    return _load()


def _cache_dit_importable() -> bool:
    try:
        import cache_dit  # noqa: F401
    except ImportError:
        return False
    return True


def _run(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


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
    res = _run("-m", "benchmarks.e2e", "--smoke", "--no-compile", "--steps", "4", "--policy",
               str(tmp / "policy.json"), "--out", str(out), "--budget-s", "1200")
    assert res.returncode == 0, res.stderr[-4000:]
    data = json.loads((out / "e2e.json").read_text())
    return data, tmp


def _rows(data, workload):
    return {r["contender"]: r for r in data["results"] if r["workload"] == workload}


def test_every_contender_has_numbers_or_a_stated_reason(smoke):
    data, _ = smoke
    assert [w["name"] for w in data["workloads"]] == list(WORKLOADS)
    expected = {"bf16-eager", "bf16-compiled", "bf16-cudagraphs", "ours-int8", "ours-nvfp4", "torchao-fp8-dynamic"}
    for w in WORKLOADS:
        rows = _rows(data, w)
        assert expected <= set(rows), set(rows)
        for name, r in rows.items():
            for key in REQUIRED:
                assert key in r, (w, name, key)
            assert r["gpu"] == "cpu"
            if r["error"] is None:
                assert r["latency_s"] > 0 and math.isfinite(r["latency_s"]), (w, name)
                assert r["latency_step_s"] > 0 and r["warmup_s"] > 0
                assert r["weight_bytes"] > 0
            else:
                assert isinstance(r["error"], str) and r["error"], (w, name)
    meta = data["meta"]
    for key in ("torch", "triton", "date", "command", "device", "gpu"):
        assert key in meta
    assert meta["command"].startswith("python -m benchmarks.e2e --smoke")


def test_contenders_that_need_cuda_torchao_or_cache_dit_say_why_on_the_cpu(smoke):
    data, _ = smoke
    for w in WORKLOADS:
        rows = _rows(data, w)
        assert rows["bf16-cudagraphs"]["error"] == "not run: needs CUDA (this run is on cpu)"
        fp8 = rows["torchao-fp8-dynamic"]
        assert fp8["not_run"] and fp8["error"].startswith("not run: needs CUDA (this run is on cpu)")
        assert fp8["latency_s"] is None and fp8["needs"] == ["cuda", "fp8", "torchao"]
    wan = _rows(data, "tiny:wan (pipeline)")
    assert wan["fbc+torchao-fp8"]["not_run"]
    stacks = [r for n, r in _rows(data, "tiny:wan (transformer)").items() if n.endswith("+torchao-fp8 (replay)")]
    assert stacks and all(r["not_run"] for r in stacks)
    for name in ("dbcache-0.5", "dbcache-taylorseer-0.5"):
        row = wan[name]
        if _cache_dit_importable():
            assert row["error"] is None, row["error"]
        else:
            assert row["error"].startswith("not run: needs cache-dit (PyPI 'cache-dit'), which is not importable "
                                           "here (ModuleNotFoundError: No module named 'cache_dit')"), row["error"]


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
    # the best peer of our chosen policy is a bf16 or cache row at least as good as it, and the ratio is its own
    best = wan[chosen["best_peer"]]
    assert best["kind"] in ("baseline", "peer") and best["psnr_db"] >= chosen["psnr_db"]
    assert chosen["speedup_vs_best_peer"] == pytest.approx(best["latency_s"] / chosen["latency_s"])


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
    fbc = [r for n, r in rows.items() if n.startswith("fbc-") and n.endswith(" (replay)") and "+" not in n]
    assert fbc and fbc[0]["error"] is None and fbc[0]["skip_share"] == pytest.approx(
        fbc[0]["replay"]["replayed_map_share"], abs=1e-9)
    # the replayed cache stands for its reference quality, matched to ours
    assert fbc[0]["replay"]["reference_psnr_db"] >= data["replay"]["ours_psnr_db"] or \
        fbc[0]["replay"]["reference_psnr_db"] == max(e["psnr_db"] for e in data["replay"]["caches"]["fbc"])
    if replay["speedup_vs_best_peer"] is not None:
        assert rows[replay["best_peer"]]["kind"] in ("baseline", "peer")


def test_render_writes_table_and_figure_and_no_readme(smoke, tmp_path):
    data, tmp = smoke
    before = (ROOT / "README.md").read_text()
    rc = main(["bench", "--render", str(tmp / "out" / "e2e.json"), "--out", str(tmp_path / "e2e-test")])
    assert rc == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e2e-test.html", "e2e-test.json", "e2e-test.md"]
    md = (tmp_path / "e2e-test.md").read_text()
    assert "| ours-chosen | ours |" in md and "bf16-compiled" in md and "vs best peer" in md
    assert "plotly" in (tmp_path / "e2e-test.html").read_text().lower()
    assert json.loads((tmp_path / "e2e-test.json").read_text())["results"]
    assert (ROOT / "README.md").read_text() == before
    with pytest.raises(SystemExit):  # the option that rewrote a README section is gone
        main(["bench", "--render", str(tmp / "out" / "e2e.json"), "--readme", str(tmp_path / "README.md")])


def test_render_refuses_to_mix_gpus(smoke, tmp_path, capsys):
    data, tmp = smoke
    other = json.loads((tmp / "out" / "e2e.json").read_text())
    other["meta"]["gpu"] = "NVIDIA H200"
    (tmp_path / "h200.json").write_text(json.dumps(other))
    paths = [str(tmp / "out" / "e2e.json"), str(tmp_path / "h200.json")]
    with pytest.raises(_e2e().rendering.MixedGPUError, match="e2e.json: cpu, h200.json: NVIDIA H200"):
        _e2e().rendering.merge(paths)
    assert main(["bench", "--render", *paths, "--out", str(tmp_path / "mixed")]) != 0
    assert "measured on different GPUs" in capsys.readouterr().err
    assert not list(tmp_path.glob("mixed*"))


def test_scale_map_keeps_the_reference_share_per_context_and_is_conservative_when_batched():
    e2e = _e2e()
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
    step_cache = e2e.scale_map(frac, 4, 5, ["cond", "uncond"], head=1, tail=1)
    # a step cache's first and last blocks always run; the rest follow the step's decision (reference block 1)
    assert all(not row[0] and not row[-1] for m in step_cache.values() for row in m)
    assert step_cache["cond"][1][1:4] == [True] * 3 and step_cache["uncond"][2][1:4] == [False] * 3


def test_best_peer_and_memory_ratios_follow_their_definition():
    """speedup_vs_best_peer: the fastest bf16/peer row of the same workload whose quality is at least the row's
    (on a shape workload: the reference quality it stands for); peak_memory_vs_bf16: ÷ bf16-compiled's peak."""
    rendering = _e2e().rendering

    def row(w, name, kind, lat, psnr=None, peak=None, **extra):
        return {"workload": w, "contender": name, "kind": kind, "latency_s": lat, "psnr_db": psnr,
                "peak_memory_bytes": peak, "weight_bytes": 10, "error": None, **extra}

    ref, shape = "reference", "shape:wan2.1-1.3b"
    data = {"meta": {"gpu": "NVIDIA H100 80GB HBM3"},
            "workloads": [{"name": ref, "kind": "pipeline"}, {"name": shape, "kind": "transformer"}],
            "results": [
                row(ref, "bf16-compiled", "baseline", 1.0, 60.0, peak=100),
                row(ref, "bf16-cudagraphs", "baseline", 0.2, 60.0, peak=120),
                row(ref, "fbc-0.1", "peer", 0.5, 28.0, peak=110),  # faster than ours but worse: no peer of ours
                row(ref, "torchao-fp8-dynamic", "peer", 0.9, 35.0, peak=90),
                row(ref, "ours-chosen", "ours", 0.6, 31.0, peak=80),
                row(shape, "bf16-compiled", "baseline", 10.0, peak=1000),
                row(shape, "torchao-fp8-dynamic", "peer", 9.0, peak=900),
                row(shape, "fbc-0.05+torchao-fp8 (replay)", "peer", 4.0,
                    replay={"reference_psnr_db": 31.5}),
                row(shape, "fbc-0.2 (replay)", "peer", 3.0, replay={"reference_psnr_db": 25.0}),
                row(shape, "ours-chosen (replay)", "ours", 5.0, replay={"reference_psnr_db": 31.0}),
            ]}
    rendering.add_derived(data)
    r = {(x["workload"], x["contender"]): x for x in data["results"]}
    ours = r[(ref, "ours-chosen")]
    assert ours["best_peer"] == "bf16-cudagraphs" and ours["speedup_vs_best_peer"] == pytest.approx(0.2 / 0.6)
    assert ours["peak_memory_vs_bf16"] == pytest.approx(0.8) and ours["gpu"] == "NVIDIA H100 80GB HBM3"
    assert r[(ref, "fbc-0.1")]["best_peer"] == "bf16-cudagraphs"
    shape_ours = r[(shape, "ours-chosen (replay)")]
    # fbc-0.2's pattern stands for 25 dB < 31 dB: not a peer; the matched stack (31.5 dB) is
    assert shape_ours["best_peer"] == "fbc-0.05+torchao-fp8 (replay)"
    assert shape_ours["speedup_vs_best_peer"] == pytest.approx(4.0 / 5.0)
    assert shape_ours["peak_memory_vs_bf16"] is None  # no peak measured
    assert r[(shape, "torchao-fp8-dynamic")]["peak_memory_vs_bf16"] == pytest.approx(0.9)
    # torchao on the shape stands for its reference quality (35 dB): only lossless bf16 is at least as good
    assert r[(shape, "torchao-fp8-dynamic")]["best_peer"] == "torchao-fp8-dynamic"
    # a shape-only run (--replay-from) takes the reference qualities from the replayed run's record
    alone = {"meta": {"gpu": "NVIDIA H100 80GB HBM3"}, "workloads": [{"name": shape, "kind": "transformer"}],
             "replay": {"reference_quality": {"torchao-fp8-dynamic": 35.0}},
             "results": [row(shape, "bf16-compiled", "baseline", 10.0), row(shape, "torchao-fp8-dynamic", "peer", 4.5),
                         row(shape, "ours-chosen (replay)", "ours", 5.0, replay={"reference_psnr_db": 31.0})]}
    rendering.add_derived(alone)
    assert alone["results"][2]["best_peer"] == "torchao-fp8-dynamic"
    assert alone["results"][2]["speedup_vs_best_peer"] == pytest.approx(0.9)


def test_replay_forces_the_map_through_the_public_runtime_api():
    """The replay part skips exactly the map's blocks, and leaves the runtime's decision method alone."""
    import torch

    e2e = _e2e()
    c = e2e.contenders
    from argparse import Namespace

    from sixbit_tune.runtime import make_static_policy

    wl = e2e.workloads.Workload("tiny:wan (transformer)", "tiny:wan", "transformer", 4, 4, False, 1.0)
    runner = e2e.workloads.TransformerRunner(wl, torch.device("cpu"), torch.float32)
    blocks = len(runner.adapter.blocks())
    skip_map = e2e.scale_map([[0.0] * blocks, [1.0] * blocks, [0.5] * blocks, [1.0] * blocks], 4, blocks,
                             runner.contexts)
    ctx = c.Context(wl=wl, runner=runner, device=torch.device("cpu"), args=Namespace(no_compile_stats=True),
                    replay={}, deadline=0.0)
    part = c.policy_part(lambda ctx, row: make_static_policy(runner.transformer, "none", 1e-30, warmup=0, cooldown=0,
                                                             max_skips=10_000), replay_map=skip_map)
    row = {"notes": []}
    inst = part.install(ctx, row)
    try:
        assert "_decide" not in vars(inst.handle.controller)
        runner.measure(e2e.measurement.Clock("cpu"), handle=inst.handle, all_steps=True)
        assert inst.handle.stats().skip_share == pytest.approx(e2e.map_share(skip_map)) and \
            e2e.map_share(skip_map) > 0
    finally:
        inst.remove()


def test_whole_transformer_compile_clones_each_calls_outputs():
    """bf16-cudagraphs' wrapper (checked with the eager backend on the CPU): every call returns its own tensors,
    equal to the eager model's."""
    import torch

    e2e = _e2e()
    wl = e2e.workloads.Workload("tiny:wan (transformer)", "tiny:wan", "transformer", 2, 2, False, 1.0)
    runner = e2e.workloads.TransformerRunner(wl, torch.device("cpu"), torch.float32)
    tr = runner.transformer
    t = torch.full((1,), 500, dtype=torch.long)
    with torch.no_grad():
        want = [tr(hidden_states=runner.hidden, encoder_hidden_states=x, timestep=t, return_dict=False)[0]
                for x in (runner.text, runner.uncond)]
        e2e.compile_whole(tr, mode=None, backend="eager")
        try:
            got = [tr(hidden_states=runner.hidden, encoder_hidden_states=x, timestep=t, return_dict=False)[0]
                   for x in (runner.text, runner.uncond)]
        finally:
            e2e.uncompile(runner.adapter)
    assert "forward" not in vars(tr)
    assert got[0].data_ptr() != got[1].data_ptr()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_several_policies_each_need_a_distinct_name_and_an_existing_file(tmp_path):
    from argparse import Namespace

    e2e = _e2e()
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


def test_tdc_cap_sweep_runs_from_the_root():
    res = _run("benchmarks/tdc_cap_sweep.py", "--steps", "2", "--prompts", "1", "--grid", "0.5:2", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    table = [line for line in res.stdout.splitlines() if line.startswith("| bfloat16 | 0 | 0.5 | 2 |")]
    assert len(table) == 1, res.stdout


def test_interleaved_imports_the_benchmark_from_the_root():
    """Its imports (the benchmark package included) resolve; an unknown contender is refused before any model loads."""
    res = _run("benchmarks/interleaved.py", "--out", "unused.json", "--contenders", "nonsense", timeout=300)
    assert res.returncode == 2 and "unknown contender 'nonsense'" in res.stderr, res.stderr[-3000:]
    assert not (ROOT / "unused.json").exists()


def test_contenders_run_in_the_order_given_after_the_baseline(tmp_path):
    out = tmp_path / "out"
    res = _run("-m", "benchmarks.e2e", "--smoke", "--no-compile", "--steps", "2", "--workloads",
               "tiny:wan (transformer)", "--contenders", "ours-nvfp4-fp8,ours-fp8", "--out", str(out), timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    data = json.loads((out / "e2e.json").read_text())
    names = [r["contender"] for r in data["results"]]
    assert names == ["bf16-compiled", "ours-nvfp4-fp8", "ours-nvfp4-fp8-fast-accum", "ours-fp8",
                     "ours-fp8-fast-accum"]
    rows = {r["contender"]: r for r in data["results"]}
    # an NVFP4-stored policy holds 4.5 bits per in-block weight, a static FP8 one 8 bits and a scale per channel
    assert rows["ours-nvfp4-fp8"]["weight_bytes"] < rows["ours-fp8"]["weight_bytes"] < rows["bf16-compiled"][
        "weight_bytes"]
    assert all(r["error"] is None and r["latency_s"] for r in data["results"])
