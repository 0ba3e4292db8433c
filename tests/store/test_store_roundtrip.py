"""Store contract, single process: every table round-trips, empty stores give typed frames, values are bound,
entity rows are replaced by key, bad input is refused with a message naming the column.

The read side runs against three readers of the same folder (the contract suite): the Store that wrote, a fresh
read-only ``Store.open`` and a labelled ``Store.open_many``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from sixbit_tune.errors import NonFiniteError
from sixbit_tune.store import GPU_KEYS, TABLES, Store

READERS = ("writer", "open", "open_many")


def _reader(store: Store, kind: str) -> Store:
    if kind == "writer":
        return store
    if kind == "open":
        return Store.open(store.path, read_only=True)
    return Store.open_many({"only": store.path})


@pytest.fixture
def store(tmp_path):
    s = Store.create(tmp_path / "store")
    yield s
    s.close()


def _block_rows(n_steps=3, n_blocks=2):
    rows = []
    for branch in ("cond", "uncond"):
        for step in range(n_steps):
            for b in range(n_blocks):
                rows.append(
                    {
                        "prompt_index": 0,
                        "prompt": "a cat's \"video\"",
                        "branch": branch,
                        "step": step,
                        "timestep": 999.0 - step * 333.0,
                        "block_index": b,
                        "block": f"transformer_blocks.{b}",
                        "gamma": 0.1 * (step + 1) + b,
                        "delta_change": None if step == 0 else 0.5 / step,
                        "delta_cos": None if step == 0 else 0.9,
                        "delta_norm": 2.0 + step,
                    }
                )
    return rows


@pytest.mark.parametrize("reader", READERS)
def test_every_table_round_trips(store, reader):
    w = store.writer("gpu0")
    gpu = {"name": "NVIDIA H200", "driver": "570.1", "memory_bytes": 150_000_000_000, "compute_capability": "9.0",
           "uuid": "GPU-1"}
    settings = {"steps": 3, "height": 64, "width": 64, "frames": 5, "guidance": 5.0, "prompts": ["a", "b"]}
    versions = {"torch": "2.13.0", "diffusers": "0.42.1"}
    rid = w.begin_run("profile", "tiny:wan", model_class="WanTransformer3DModel", family="wan",
                      config_hash="ab" * 32, settings=settings, gpu=gpu, versions=versions, seed=7)
    brows = _block_rows()
    w.write_block_steps(pd.DataFrame(brows), run_id=rid)
    lrows = {
        "prompt_index": np.zeros(4, np.int64),
        "branch": ["cond"] * 4,
        "step": [0, 0, 1, 1],
        "block_index": torch.tensor([0, 0, 1, 1]),  # CPU tensors are accepted as columns
        "layer": ["transformer_blocks.0.attn1.to_q"] * 2 + ["transformer_blocks.1.ffn.net.0.proj"] * 2,
        "format": ["nvfp4", "int8", "nvfp4", "int8"],
        "act_err": torch.tensor([0.1, 0.01, 0.2, 0.02], dtype=torch.bfloat16),  # rounded: 0.1 -> 0.10009765625
        "out_err": torch.tensor([0.15, 0.015, 0.25, 0.025], dtype=torch.float32),
        "run_id": [rid] * 4,
    }
    w.write_layer_steps(lrows)
    w.finish_run(rid, timesteps=[999.0, 666.0, 333.0])
    fit = w.write_predictors(
        pa.table({"layer": ["l0", "l1"], "format": ["nvfp4", "nvfp4"], "alpha": [0.5, 1.5], "beta": [0.01, 0.02],
                  "r2": [0.9, 0.4], "n": [6, 6], "trusted": [True, False]}),
        run_ids=[rid], settings={"min_r2": 0.5},
    )
    policy = {"schema_version": 1, "dmpq": {"threshold": 0.1}}
    w.write_trial("study 1", 3, state="COMPLETE", params={"tau": 0.1, "delta": 0.05}, latency_ms=12.5,
                  speedup=1.7, peak_memory_bytes=2**33, weight_bytes=2**30, cache_bytes=2**20, psnr_db=math.inf,
                  ssim=0.99, quality={"lpips": 0.01}, skip_share=0.2, nvfp4_share=0.6, gpu="NVIDIA H200",
                  nvfp4_path="emulated", kernel_path="triton", policy=policy)
    w.write_trial("study 1", 4, state="FAIL", fail_reason="CUDA OOM")
    w.write_policy("h200-fast", policy, path="policies/h200-fast.json", study="study 1", trial=3)

    r = _reader(store, reader)
    label = "only" if reader == "open_many" else str(store.path)

    runs = r.runs()
    assert len(runs) == 1
    run = runs.iloc[0]
    assert (run.run_id, run.kind, run.status, run.model_spec, run.family, run.seed) == (
        rid, "profile", "finished", "tiny:wan", "wan", 7)
    assert [run[f"gpu_{k}"] for k in GPU_KEYS] == [gpu[k] for k in GPU_KEYS]
    assert json.loads(run.settings) == settings and json.loads(run.versions) == versions
    assert list(run.timesteps) == [999.0, 666.0, 333.0]
    assert run.store == label and run.worker_id == "gpu0" and run.created <= run.updated
    assert r.query("SELECT settings->>'frames' AS f, settings->'prompts'->>1 AS p FROM runs").iloc[0].tolist() == [
        "5", "b"]

    got = r.block_steps([rid]).drop(columns=["store", "run_id"])
    want = pd.DataFrame(brows).sort_values(["prompt_index", "branch", "step", "block_index"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got[want.columns], want, check_dtype=False)
    assert got["delta_change"].isna().sum() == 2 * 2  # first step, both branches, both blocks

    layers = r.layer_steps([rid])
    assert len(layers) == 4 and layers["out_err"].tolist() == pytest.approx([0.015, 0.15, 0.025, 0.25])
    assert layers["act_err"].tolist() == pytest.approx([0.01, 0.1, 0.02, 0.2], rel=4e-3)
    assert r.layer_steps(formats=["int8"])["format"].unique().tolist() == ["int8"]

    preds = r.predictors(fit)
    assert preds[["layer", "alpha", "beta", "r2", "n", "trusted"]].to_dict("list") == {
        "layer": ["l0", "l1"], "alpha": [0.5, 1.5], "beta": [0.01, 0.02], "r2": [0.9, 0.4], "n": [6, 6],
        "trusted": [True, False]}
    assert [list(x) for x in preds["run_ids"]] == [[rid], [rid]]
    assert r.latest_fit_id() == fit

    trials = r.trials("study 1")
    assert trials["number"].tolist() == [3, 4] and trials["state"].tolist() == ["COMPLETE", "FAIL"]
    t3 = trials.iloc[0]
    assert math.isinf(t3.psnr_db) and t3.latency_ms == 12.5 and t3.peak_memory_bytes == 2**33
    assert json.loads(t3.params) == {"delta": 0.05, "tau": 0.1} and json.loads(t3.policy) == policy
    assert trials.iloc[1].fail_reason == "CUDA OOM"

    pol = r.policies()
    assert pol[["name", "study", "trial", "path"]].iloc[0].tolist() == ["h200-fast", "study 1", 3,
                                                                        "policies/h200-fast.json"]
    assert json.loads(pol.iloc[0].policy) == policy
    arrow = r.to_arrow("SELECT gamma FROM block_steps WHERE branch = $b ORDER BY gamma", {"b": "uncond"})
    assert isinstance(arrow, pa.Table) and arrow.num_rows == 6
    if r is not store:
        r.close()


@pytest.mark.parametrize("reader", READERS)
def test_empty_store_gives_empty_typed_frames(store, reader):
    r = _reader(store, reader)
    frames = {"runs": r.runs(), "block_steps": r.block_steps(), "layer_steps": r.layer_steps(),
              "predictors": r.predictors(), "trials": r.trials(), "policies": r.policies()}
    for name, df in frames.items():
        assert len(df) == 0, name
        assert {c for c in TABLES[name].column_names if c not in ("written", "_part")} <= set(df.columns), name
        assert "_part" not in df.columns and "filename" not in df.columns, name
    assert frames["block_steps"]["gamma"].dtype == np.float64
    assert frames["block_steps"]["step"].dtype == np.int32
    assert str(frames["runs"]["created"].dtype).startswith("datetime64[us")
    assert frames["predictors"]["trusted"].dtype == bool
    assert r.latest_fit_id() is None
    assert r.query("SELECT avg(gamma) AS g FROM block_steps")["g"].isna().all()
    if r is not store:
        r.close()


def test_values_are_bound_never_spliced(store):
    w = store.writer()
    evil = "x' OR '1'='1"
    w.write_trial("it's a \"study\"", 0, state="RUNNING")
    w.write_trial("other", 0, state="RUNNING")
    assert store.trials("it's a \"study\"")["study"].tolist() == ["it's a \"study\""]
    assert store.trials(evil).empty
    assert store.query("SELECT count(*) AS n FROM trials WHERE study = ?", [evil])["n"].tolist() == [0]
    assert store.query("SELECT study FROM trials WHERE study = $s", {"s": "it's a \"study\""}).shape == (1, 1)
    rid = w.begin_run("search", "it's-a-spec", run_id="run 'quoted'")
    assert store.runs(run_ids=[rid])["model_spec"].tolist() == ["it's-a-spec"]
    assert store.runs(kind="search")["run_id"].tolist() == ["run 'quoted'"]


def test_latest_write_of_a_key_wins(store):
    w = store.writer("a")
    w.write_trial("s", 0, state="RUNNING", params={"tau": 1})
    w.write_trial("s", 1, state="RUNNING")
    first = store.trials("s")
    w.write_trial("s", 0, state="COMPLETE", params={"tau": 1}, latency_ms=5.0)
    w2 = store.writer("b")  # another worker updates trial 1
    w2.write_trial("s", 1, state="PRUNED")
    t = store.trials("s")
    assert t["state"].tolist() == ["COMPLETE", "PRUNED"]
    assert t["created"].tolist() == first["created"].tolist(), "created is the first write's time"
    assert (t["updated"] > t["created"]).all()
    assert len(list((store.path / "trials").glob("*.parquet"))) == 1 + 4  # seed + every write kept on disk
    fit = w.write_predictors({"layer": ["l"], "format": ["nvfp4"], "n": [3], "trusted": [False]}, run_ids=[])
    w.write_predictors({"layer": ["l"], "format": ["nvfp4"], "n": [9], "trusted": [True]}, run_ids=[], fit_id=fit)
    assert store.predictors(fit)[["n", "trusted"]].values.tolist() == [[9, True]]


def test_finish_run_from_another_writer_and_process(store):
    rid = store.writer("first").begin_run("profile", "tiny:ltx", settings={"steps": 2}, seed=3)
    code = (
        "import sys; from sixbit_tune.store import Store\n"
        f"Store.open(sys.argv[1]).writer('second').finish_run({rid!r}, 'failed', error='OOM at prompt 3')\n"
    )
    subprocess.run([sys.executable, "-c", code, str(store.path)], check=True)
    run = store.runs().iloc[0]
    assert (run.status, run.error, run.seed, json.loads(run.settings)) == ("failed", "OOM at prompt 3", 3,
                                                                          {"steps": 2})
    assert run.worker_id == "second"


def test_bad_input_is_refused_with_the_column_named(store):
    w = store.writer()
    rid = w.begin_run("profile", "tiny:wan")
    good = {"prompt_index": [0], "branch": ["cond"], "step": [0], "block_index": [0], "gamma": [0.1]}
    with pytest.raises(ValueError, match=r"unknown columns \['gama'\]"):
        w.write_block_steps({**good, "gama": [1.0]}, run_id=rid)
    with pytest.raises(ValueError, match="required column 'gamma' is missing"):
        w.write_block_steps({k: v for k, v in good.items() if k != "gamma"}, run_id=rid)
    with pytest.raises(ValueError, match=r"block_steps.branch: values \['both'\] not allowed"):
        w.write_block_steps({**good, "branch": ["both"]}, run_id=rid)
    with pytest.raises(NonFiniteError, match="block_steps.gamma: 1 NaN"):
        w.write_block_steps({**good, "gamma": [float("nan")]}, run_id=rid)
    with pytest.raises(NonFiniteError, match="block_steps.delta_norm: 1 infinite"):
        w.write_block_steps({**good, "delta_norm": [float("inf")]}, run_id=rid)
    with pytest.raises(ValueError, match="block_steps.step: cannot store string"):
        w.write_block_steps({**good, "step": ["first"]}, run_id=rid)
    with pytest.raises(ValueError, match="unknown run_id 'nope'"):
        w.write_block_steps(good, run_id="nope")
    with pytest.raises(ValueError, match="rows disagree"):
        w.write_block_steps({**good, "run_id": ["other"]}, run_id=rid)
    with pytest.raises(ValueError, match="different lengths"):
        w.write_block_steps({**good, "step": [0, 1]}, run_id=rid)
    with pytest.raises(ValueError, match=r"layer_steps.format: values \['fp4'\]"):
        w.write_layer_steps({"prompt_index": [0], "branch": ["cond"], "step": [0], "block_index": [0],
                             "layer": ["x"], "format": ["fp4"], "out_err": [0.1]}, run_id=rid)
    with pytest.raises(ValueError, match=r"runs.kind: values \['profle'\] not allowed"):
        w.begin_run("profle", "tiny:wan")
    with pytest.raises(ValueError, match=r"gpu: unknown keys \['power'\]"):
        w.begin_run("profile", "tiny:wan", gpu={"name": "x", "power": 1})
    with pytest.raises(ValueError, match="runs.settings: cannot be stored as JSON"):
        w.begin_run("profile", "tiny:wan", settings={"guidance": float("nan")})
    with pytest.raises(ValueError, match="a FAIL trial needs fail_reason"):
        w.write_trial("s", 0, state="FAIL")
    with pytest.raises(ValueError, match=r"trials.state: values \['DONE'\]"):
        w.write_trial("s", 0, state="DONE")
    with pytest.raises(NonFiniteError, match="trials.latency_ms"):
        w.write_trial("s", 0, state="COMPLETE", latency_ms=float("inf"))
    with pytest.raises(ValueError, match="failed run needs error"):
        w.finish_run(rid, "failed")
    with pytest.raises(ValueError, match="status must be"):
        w.finish_run(rid, "done")
    # Nothing above reached the store.
    assert store.block_steps().empty and store.layer_steps().empty and store.trials().empty
    assert store.runs()["run_id"].tolist() == [rid]
    with pytest.raises(ValueError, match="kind 'x' unknown"):
        store.runs(kind="x")


def test_opening_and_creating_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no sixbit-tune store at .*does not exist.*Store.create"):
        Store.open(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="meta.json is missing"):
        Store.open(tmp_path / "plain")
    with pytest.raises(FileExistsError, match="not empty"):
        Store.create(tmp_path / "plain")
    Store.create(tmp_path / "s").close()
    with pytest.raises(FileExistsError, match="already exists"):
        Store.create(tmp_path / "s")
    Store.create(tmp_path / "s", exist_ok=True).close()
    with pytest.raises(PermissionError, match="read-only"):
        Store.open(tmp_path / "s", read_only=True).writer()
    with pytest.raises(ValueError, match="glob characters"):
        Store.create(tmp_path / "a*b")


def test_import_is_light():
    code = "import sys, sixbit_tune.store\nassert 'torch' not in sys.modules, 'store import pulled in torch'\n"
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_one_store_serves_threads_while_writing(store):
    """Streamlit runs sessions as threads over one cached Store: each call uses its own DuckDB cursor."""
    import threading

    w = store.writer()
    errors: list[BaseException] = []
    counts: list[int] = []

    def read():
        try:
            for _ in range(15):
                counts.append(len(store.trials("s")))
                store.query("SELECT count(*) FROM runs WHERE kind = ?", ["profile"])
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for n in range(15):
        w.write_trial("s", n, state="COMPLETE", latency_ms=1.0)
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(counts) == 60 and max(counts) <= 15
    assert len(store.trials("s")) == 15
