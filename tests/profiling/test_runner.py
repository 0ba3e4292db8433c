"""Profiling runs end to end into a real store: every tiny family, the CLI, two workers, a killed run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sixbit_tune.cli import main
from sixbit_tune.models.adapters import get_adapter
from sixbit_tune.models.tiny import tiny_transformer
from sixbit_tune.profiling.config import ProfileConfig, load_prompts
from sixbit_tune.profiling.runner import profile
from sixbit_tune.routes import PROFILE_DEFAULT_ROUTES
from sixbit_tune.store import Store

FAMILIES = ["cogvideox", "wan", "hunyuanvideo", "ltx", "mochi"]


def _expected(family):
    adapter = get_adapter(tiny_transformer(family))
    n_layers = sum(len(adapter.linears(b)) for b in adapter.blocks())
    return len(adapter.blocks()), n_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_profiles_into_a_store(tmp_path, family):
    steps = 2
    run_id = profile(ProfileConfig(model=f"tiny:{family}", prompts=["a cat runs on the beach"],
                                   store=str(tmp_path / "s"), steps=steps, progress=False))
    n_blocks, n_layers = _expected(family)
    with Store.open(tmp_path / "s", read_only=True) as s:
        runs = s.runs()
        assert list(runs["run_id"]) == [run_id]
        run = runs.iloc[0]
        assert run["status"] == "finished" and run["family"] == family and run["kind"] == "profile"
        assert len(run["timesteps"]) == steps
        assert run["gpu_name"] is None or run["gpu_name"] != run["gpu_name"]  # NULL without a GPU (None/NaN)
        settings = json.loads(run["settings"])
        assert settings["steps"] == steps and settings["formats"] == list(PROFILE_DEFAULT_ROUTES)
        assert json.loads(run["versions"])["torch"]
        b = s.query("SELECT branch, step, count(*) AS n, count(delta_change) AS nc, min(gamma) AS g, "
                    "any_value(timestep) AS t FROM block_steps WHERE run_id = ? GROUP BY ALL ORDER BY ALL", [run_id])
        assert list(b["branch"]) == ["cond", "cond", "uncond", "uncond"]
        assert list(b["n"]) == [n_blocks] * 4
        assert list(b["nc"]) == [0, n_blocks, 0, n_blocks]  # Δ change is defined from the second step on
        assert (b["g"] > 0).all()
        assert sorted(set(b["t"])) == sorted(run["timesteps"])
        lay = s.query("SELECT format, count(*) AS n, min(out_err) AS lo, max(out_err) AS hi FROM layer_steps "
                      "WHERE run_id = ? GROUP BY ALL ORDER BY format", [run_id])
        assert list(lay["format"]) == sorted(PROFILE_DEFAULT_ROUTES)  # every route: the tiny models' K % 16 == 0
        assert list(lay["n"]) == [n_layers * 2 * steps] * len(PROFILE_DEFAULT_ROUTES)
        assert (lay["lo"] > 0).all() and (lay["hi"] < 1.5).all()
        # attn_err of every block's self-attention, at every step and branch, in the default format
        assert settings["attention_formats"] == ["fp8"] and len(settings["attention_modules"]) == n_blocks
        att = s.query("SELECT branch, step, format, count(DISTINCT block_index) AS nb, count(*) AS n, "
                      "min(attn_err) AS lo, max(attn_err) AS hi FROM attn_steps WHERE run_id = ? GROUP BY ALL "
                      "ORDER BY ALL", [run_id])
        assert list(zip(att["branch"], att["step"])) == [("cond", 0), ("cond", 1), ("uncond", 0), ("uncond", 1)]
        assert set(att["format"]) == {"fp8"} and list(att["nb"]) == [n_blocks] * 4 and list(att["n"]) == [n_blocks] * 4
        assert (att["lo"] > 0).all() and (att["hi"] < 0.5).all()


def test_cli_prompts_file_and_two_workers(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# calibration prompts\na cat runs\n\na dog jumps in snow\na red car\n")
    assert load_prompts(prompts) == ["a cat runs", "a dog jumps in snow", "a red car"]
    store = tmp_path / "s"
    rc = main(["profile", "--model", "tiny:wan", "--prompts", str(prompts), "--steps", "2", "--store", str(store),
               "--workers", "2", "--no-progress", "--device", "cpu", "--attention-formats", "int8"])
    assert rc == 0
    n_blocks, n_layers = _expected("wan")
    with Store.open(store, read_only=True) as s:
        assert list(s.runs()["status"]) == ["finished"]
        b = s.query("SELECT prompt_index, any_value(prompt) AS prompt, count(*) AS n FROM block_steps "
                    "GROUP BY ALL ORDER BY ALL")
        assert list(b["prompt_index"]) == [0, 1, 2]
        assert list(b["prompt"]) == ["a cat runs", "a dog jumps in snow", "a red car"]
        assert list(b["n"]) == [n_blocks * 2 * 2] * 3
        n = s.query("SELECT count(*) AS n FROM layer_steps")["n"][0]
        assert n == 3 * n_layers * len(PROFILE_DEFAULT_ROUTES) * 2 * 2
        att = s.query("SELECT format, count(*) AS n FROM attn_steps GROUP BY ALL")
        assert list(att["format"]) == ["int8"] and list(att["n"]) == [3 * n_blocks * 2 * 2]
    parts = [p.name for p in (store / "block_steps").glob("*.parquet")]
    assert any("-w0-" in p for p in parts) and any("-w1-" in p for p in parts)  # each worker wrote its part


def test_same_prompt_same_statistics_regardless_of_sharding(tmp_path):
    a = profile(ProfileConfig(model="tiny:cogvideox", prompts=["a", "b cat"], store=str(tmp_path / "s"), steps=2,
                              progress=False))
    b = profile(ProfileConfig(model="tiny:cogvideox", prompts=["b cat"], store=str(tmp_path / "s"), steps=2,
                              seed=1, progress=False))
    with Store.open(tmp_path / "s", read_only=True) as s:
        q = ("SELECT branch, step, block_index, gamma FROM block_steps WHERE run_id = ? AND prompt = 'b cat' "
             "ORDER BY ALL")
        assert s.query(q, [a]).equals(s.query(q, [b]))


def test_killed_run_leaves_finished_prompts_readable(tmp_path):
    store = tmp_path / "s"
    n_prompts = 40
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([f"prompt {i} a cat" for i in range(n_prompts)]))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sixbit_tune", "profile", "--model", "tiny:wan", "--prompts", str(prompts),
         "--steps", "3", "--store", str(store), "--no-progress", "--device", "cpu"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            if len(list((store / "block_steps").glob("*-w0-*.parquet"))) >= 1:
                break
            if proc.poll() is not None:
                pytest.fail(f"profile process ended early with {proc.returncode}")
            time.sleep(0.05)
        else:
            pytest.fail("no prompt finished within 90 s")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    n_blocks, n_layers = _expected("wan")
    with Store.open(store, read_only=True) as s:
        assert list(s.runs()["status"]) == ["running"]  # killed: never marked finished
        b = s.query("SELECT prompt_index, count(*) AS n FROM block_steps GROUP BY ALL ORDER BY ALL")
        assert 1 <= len(b) < n_prompts
        assert list(b["prompt_index"]) == list(range(len(b)))
        assert (b["n"] == n_blocks * 2 * 3).all()
        lay = s.query("SELECT prompt_index, count(*) AS n FROM layer_steps GROUP BY ALL ORDER BY ALL")
        # every prompt with block rows has all its layer rows (layer rows are written first)
        done = lay[lay["prompt_index"].isin(b["prompt_index"])]
        assert len(done) == len(b) and (done["n"] == n_layers * len(PROFILE_DEFAULT_ROUTES) * 3 * 2).all()


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_transformer_only_mode_on_a_tiny_transformer(tmp_path, family):
    """The shape: code path (a step = one transformer forward per CFG branch on random latents), run on a tiny
    transformer of the same family so it fits the CPU."""
    import torch

    from sixbit_tune.profiling.hooks import instrument
    from sixbit_tune.profiling.runner import _shape_defaults, _shape_prompt

    model = tiny_transformer(family)
    config = ProfileConfig(model=f"shape:{family}", prompts=["p"], store=str(tmp_path), steps=2, frames=9, height=16,
                           width=16)
    d = _shape_defaults(get_adapter(model), config)
    assert (d["frames"], d["height"], d["width"], d["guidance"]) == (9, 16, 16, 6.0)
    with instrument(model) as inst:
        steps = []
        records, timesteps = _shape_prompt(model, inst, config, 0, "cpu", torch.float32, steps.append)
    assert steps == [1, 1] and len(timesteps) == 2 and timesteps[0] > timesteps[1]
    n_blocks = len(get_adapter(model).blocks())
    assert sorted(set(records.blocks["branch"])) == ["cond", "uncond"]
    assert len(records.blocks["step"]) == n_blocks * 2 * 2
    assert records.blocks["delta_change"].count(None) == n_blocks * 2


def test_bad_settings_are_clear_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        ProfileConfig(model="tiny:wan", prompts=["a"], store=str(tmp_path), steps=0)
    with pytest.raises(ValueError, match=r"unknown format or route 'fp4' to profile; choose from \['nvfp4', "):
        ProfileConfig(model="tiny:wan", prompts=["a"], store=str(tmp_path), formats=("fp8", "fp4"))
    with pytest.raises(ValueError, match="unknown format or route 'int8/fp8'"):
        ProfileConfig(model="tiny:wan", prompts=["a"], store=str(tmp_path), formats=("int8/fp8",))
    with pytest.raises(ValueError, match=r"formats: \['int8'\] given more than once"):
        ProfileConfig(model="tiny:wan", prompts=["a"], store=str(tmp_path), formats=("int8", "int8/int8"))
    with pytest.raises(ValueError, match="formats: give at least one of"):
        ProfileConfig(model="tiny:wan", prompts=["a"], store=str(tmp_path), formats=())
    # a format f and the route f/f are one name; the order given does not matter
    cfg = ProfileConfig(model="tiny:wan", prompts=["a"], store=str(tmp_path),
                        formats=("nvfp4/fp8", "int8/int8", "nvfp4/nvfp4", " nvfp4/int8 "))
    assert cfg.formats == ("nvfp4", "int8", "nvfp4/int8", "nvfp4/fp8")
    assert ProfileConfig(model="tiny:wan", prompts=["a"], store=str(tmp_path), formats="fp8").formats == ("fp8",)
    with pytest.raises(SystemExit) as e:
        main(["profile", "--model", "tiny:wan", "--prompt", "a", "--store", str(tmp_path / "s"),
              "--formats", "nvfp4,w4a8"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown format or route 'w4a8'" in err and "nvfp4/int8" in err
    with pytest.raises(ValueError, match="attention_formats must be distinct values of"):
        ProfileConfig(model="tiny:wan", prompts=["a"], store=str(tmp_path), attention_formats=("nvfp4",))
    with pytest.raises(ValueError, match="attention_every must be an integer >= 1"):
        ProfileConfig(model="tiny:wan", prompts=["a"], store=str(tmp_path), attention_every=0)
    with pytest.raises(SystemExit) as e:
        main(["profile", "--model", "tiny:wan", "--prompt", "a", "--store", str(tmp_path / "s"),
              "--attention-formats", "fp4"])
    assert e.value.code == 2 and "attention_formats" in capsys.readouterr().err
    with pytest.raises(ValueError, match="prompts"):
        ProfileConfig(model="tiny:wan", prompts=[], store=str(tmp_path))
    with pytest.raises(SystemExit) as e:
        main(["profile", "--model", "tiny:wan", "--prompt", "a", "--store", str(tmp_path / "s"), "--workers", "0"])
    assert e.value.code == 2 and "workers" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="holds no prompt"):
        load_prompts(empty)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            profile(ProfileConfig(model="tiny:wan", prompts=["a"], store=str(tmp_path / "s2"), device="cuda"))
    with pytest.raises(ValueError, match="device must be"):
        profile(ProfileConfig(model="tiny:wan", prompts=["a"], store=str(tmp_path / "s3"), device="tpu"))


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_layer_every_records_layers_on_every_kth_step_only(tmp_path, family):
    run_id = profile(ProfileConfig(model=f"tiny:{family}", prompts=["a cat"], store=str(tmp_path / "s"), steps=3,
                                   layer_every=2, attention_every=3, attention_formats=("int8", "fp8"),
                                   progress=False))
    with Store.open(tmp_path / "s", read_only=True) as s:
        blocks = s.query("SELECT DISTINCT step FROM block_steps WHERE run_id = ? ORDER BY step", [run_id])
        layers = s.query("SELECT DISTINCT step FROM layer_steps WHERE run_id = ? ORDER BY step", [run_id])
        assert list(blocks["step"]) == [0, 1, 2]
        assert list(layers["step"]) == [0, 2]
        att = s.query("SELECT DISTINCT step, format FROM attn_steps WHERE run_id = ? ORDER BY ALL", [run_id])
        assert list(zip(att["step"], att["format"])) == [(0, "fp8"), (0, "int8")]
        assert json.loads(s.runs()["settings"][0])["layer_every"] == 2


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a dead child its new parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads processes from /proc")
def test_killing_the_parent_stops_the_workers(tmp_path):
    import psutil

    store = tmp_path / "s"
    n_prompts = 60
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([f"prompt {i} a cat" for i in range(n_prompts)]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sixbit_tune", "profile", "--model", "tiny:wan", "--prompts", str(prompts),
         "--steps", "3", "--store", str(store), "--workers", "2", "--no-progress", "--device", "cpu"],
        env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    workers: list[int] = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline:  # both workers started and wrote a prompt
            parts = [p.name for p in (store / "block_steps").glob("*.parquet")] if store.exists() else []
            if any("-w0-" in p for p in parts) and any("-w1-" in p for p in parts):
                break
            if proc.poll() is not None:
                pytest.fail(f"profile process ended early with {proc.returncode}")
            time.sleep(0.05)
        else:
            pytest.fail("the two workers did not both finish a prompt within 180 s")
        workers = [c.pid for c in psutil.Process(proc.pid).children()
                   if any("spawn_main" in a for a in c.cmdline())]
        assert len(workers) == 2
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.time() + 5
        while any(_alive(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in workers), "workers still running 5 s after their parent was killed"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    written = sorted(p.name for p in (store / "block_steps").glob("*.parquet"))
    time.sleep(2)
    assert sorted(p.name for p in (store / "block_steps").glob("*.parquet")) == written  # nobody writes any more
    n_blocks, n_layers = _expected("wan")
    with Store.open(store, read_only=True) as s:
        assert list(s.runs()["status"]) == ["running"]  # killed: never marked finished
        b = s.query("SELECT prompt_index, count(*) AS n FROM block_steps GROUP BY ALL ORDER BY ALL")
        assert 2 <= len(b) < n_prompts
        assert {i % 2 for i in b["prompt_index"]} == {0, 1}  # both workers' prompts are there
        assert (b["n"] == n_blocks * 2 * 3).all()
        lay = s.query("SELECT prompt_index, count(*) AS n FROM layer_steps GROUP BY ALL ORDER BY ALL")
        done = lay[lay["prompt_index"].isin(b["prompt_index"])]
        assert len(done) == len(b) and (done["n"] == n_layers * len(PROFILE_DEFAULT_ROUTES) * 3 * 2).all()


def _start_two_workers(tmp_path, n_prompts=60):
    """``profile --workers 2`` in a subprocess, returned once both workers have written a prompt."""
    import psutil

    store = tmp_path / "s"
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([f"prompt {i} a cat" for i in range(n_prompts)]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sixbit_tune", "profile", "--model", "tiny:wan", "--prompts", str(prompts),
         "--steps", "3", "--store", str(store), "--workers", "2", "--no-progress", "--device", "cpu"],
        env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 180
    while time.time() < deadline:
        parts = [p.name for p in (store / "block_steps").glob("*.parquet")] if store.exists() else []
        if any("-w0-" in p for p in parts) and any("-w1-" in p for p in parts):
            break
        if proc.poll() is not None:
            pytest.fail(f"profile process ended early with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the two workers did not both finish a prompt within 180 s")
    workers = [c.pid for c in psutil.Process(proc.pid).children() if any("spawn_main" in a for a in c.cmdline())]
    assert len(workers) == 2
    return proc, store, workers


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads processes from /proc")
def test_a_killed_profile_worker_is_reported_in_one_line(tmp_path):
    proc, store, workers = _start_two_workers(tmp_path)
    try:
        os.kill(workers[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"(pid {workers[1]}) was killed by SIGKILL" in lines[0], err[-3000:]
    assert not _alive(workers[0])  # the other worker is stopped too
    with Store.open(store, read_only=True) as s:
        run = s.runs().iloc[0]
        assert run["status"] == "failed" and "killed by SIGKILL" in run["error"]
        assert len(s.query("SELECT DISTINCT prompt_index FROM block_steps")) >= 2
