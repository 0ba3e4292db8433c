"""The store's concurrency contract with real processes: reading while writing, two writers at once, a writer
killed with SIGKILL, and several stores (machines) combined into one view."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from sixbit_tune.store import Store

WORKER = Path(__file__).with_name("_store_worker.py")

# Parts appear whole (written under .tmp/, checksummed, renamed): no reader may ever flag one as damaged here.
pytestmark = pytest.mark.filterwarnings("error::sixbit_tune.store.StoreDamageWarning")


def _spawn(store: Path, worker_id: str, mode: str, parts: int, rows: int, sleep_s: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(store), worker_id, mode, str(parts), str(rows), str(sleep_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(p: subprocess.Popen, timeout: float = 60) -> str:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"worker failed (rc {p.returncode}):\n{err}"
    return out


def test_reader_sees_finished_parts_while_a_writer_process_writes(tmp_path):
    path = tmp_path / "store"
    Store.create(path).close()
    parts, rows = 25, 400
    reader = Store.open(path, read_only=True)
    writer = _spawn(path, "w-0", "block", parts, rows, 0.04)
    seen, statuses = [], set()
    deadline = time.monotonic() + 60
    while writer.poll() is None and time.monotonic() < deadline:
        (n, prompts), = reader.query(
            "SELECT count(*) AS n, count(DISTINCT prompt_index) AS p FROM block_steps"
        ).itertuples(index=False)
        seen.append((n, prompts))
        statuses.update(reader.runs()["status"])
        time.sleep(0.01)
    _finish(writer)
    # Every observation is a whole number of parts: no half-written part is ever visible.
    assert all(n == p * rows for n, p in seen), [s for s in seen if s[0] != s[1] * rows][:5]
    counts = [n for n, _ in seen]
    assert counts == sorted(counts), "a reader must never see rows disappear"
    assert any(0 < n < parts * rows for n in counts), f"never observed the store mid-run: {sorted(set(counts))}"
    assert "running" in statuses
    final = reader.block_steps()
    assert len(final) == parts * rows
    assert reader.runs()["status"].tolist() == ["finished"]
    reader.close()


def test_two_writer_processes_record_at_once_without_losing_rows(tmp_path):
    path = tmp_path / "store"
    Store.create(path).close()
    parts, rows = 10, 300
    procs = [
        _spawn(path, "w-0", "block", parts, rows, 0.0),
        _spawn(path, "w-1", "block", parts, rows, 0.0),
        _spawn(path, "t-0", "trials", parts, 0, 0.0),
        _spawn(path, "t-1", "trials", parts, 0, 0.0),
    ]
    for p in procs:
        _finish(p)
    with Store.open(path, read_only=True) as s:
        per_run = s.query("SELECT run_id, count(*) AS n FROM block_steps GROUP BY run_id ORDER BY run_id")
        assert per_run.to_dict("list") == {"run_id": ["run-w-0", "run-w-1"], "n": [parts * rows] * 2}
        runs = s.runs()
        assert sorted(runs["run_id"]) == ["run-w-0", "run-w-1"]
        assert set(runs["status"]) == {"finished"}
        trials = s.trials("shared")
        assert trials["number"].tolist() == list(range(2 * parts)), "each trial once, none lost"
        assert set(trials["state"]) == {"COMPLETE"}
        assert trials["latency_ms"].tolist() == [float(n) for n in range(2 * parts)]
        assert set(trials["worker_id"]) == {"t-0", "t-1"}


def test_writer_killed_midway_leaves_finished_parts_readable(tmp_path):
    path = tmp_path / "store"
    Store.create(path).close()
    rows = 150_000  # big parts, so that the kill has a fair chance of landing inside a write
    p = _spawn(path, "victim", "forever", 0, rows, 0.0)
    try:
        done = 0
        while done < 3:
            line = p.stdout.readline()
            assert line, f"worker died early: {p.stderr.read()}"
            if line.startswith("wrote"):
                done += 1
        time.sleep(0.03)
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    visible = sorted((path / "block_steps").glob("*.parquet"))
    data_parts = [f for f in visible if not f.name.startswith("0000000000")]
    assert len(data_parts) >= 3
    for f in visible:  # every visible file is a whole, readable Parquet file
        pq.read_metadata(f)
        assert pq.read_table(f).num_rows in (0, rows)
    with Store.open(path, read_only=True) as s:
        (n, prompts), = s.query(
            "SELECT count(*), count(DISTINCT prompt_index) FROM block_steps"
        ).itertuples(index=False)
        assert n == len(data_parts) * rows and prompts == len(data_parts)
        assert sorted(s.block_steps()["prompt_index"].unique()) == list(range(len(data_parts)))
        runs = s.runs()
        assert runs["status"].tolist() == ["running"], "a killed run is never marked finished"
        assert runs["pid"].tolist() == [p.pid]
    # A part in flight may be left under .tmp/; it is never read, and the store stays writable.
    with Store.open(path) as s:
        w = s.writer("after")
        w.finish_run("run-victim", "failed", error="killed")
        assert s.runs()["status"].tolist() == ["failed"]


@pytest.mark.parametrize("labelled", [True, False], ids=["labels", "paths"])
def test_two_machines_combine_into_one_view(tmp_path, labelled):
    gpus = {"machine-a": "NVIDIA H200", "machine-b": "NVIDIA B200"}
    paths = {}
    for i, (machine, gpu) in enumerate(gpus.items()):
        path = tmp_path / machine
        with Store.create(path) as s:
            w = s.writer(f"{machine}-gpu0")
            rid = w.begin_run("profile", "tiny:wan", gpu={"name": gpu, "memory_bytes": 10**11}, run_id=f"r{i}")
            w.write_block_steps(
                {"prompt_index": [0, 0], "branch": ["cond", "uncond"], "step": [0, 0], "block_index": [0, 0],
                 "gamma": [0.1 * (i + 1), 0.2 * (i + 1)]},
                run_id=rid,
            )
            w.finish_run(rid)
            w.write_trial("shared", i, state="COMPLETE", latency_ms=10.0 + i, gpu=gpu)
        paths[machine] = path
    store = Store.open_many(paths if labelled else list(paths.values()))
    assert store.read_only
    with pytest.raises(PermissionError):
        store.writer()
    df = store.query(
        "SELECT r.store, r.gpu_name, count(*) AS n, sum(b.gamma) AS g FROM block_steps b "
        "JOIN runs r USING (run_id) GROUP BY ALL ORDER BY r.gpu_name"
    )
    labels = list(paths) if labelled else [str(p) for p in paths.values()]
    assert df["gpu_name"].tolist() == ["NVIDIA B200", "NVIDIA H200"]
    assert df["store"].tolist() == [labels[1], labels[0]]
    assert df["n"].tolist() == [2, 2]
    assert df["g"].tolist() == pytest.approx([0.6, 0.3])
    trials = store.trials("shared")
    assert trials["number"].tolist() == [0, 1] and trials["store"].tolist() == labels
    store.close()
    with pytest.raises(ValueError, match="share the label"):
        Store.open_many([paths["machine-a"], paths["machine-a"]])
    with pytest.raises(ValueError, match="given twice"):
        Store.open_many({"a": paths["machine-a"], "b": paths["machine-a"]})
    with pytest.raises(ValueError, match="at least one"):
        Store.open_many([])


def test_compaction_keeps_every_answer_and_runs_beside_a_writer(tmp_path):
    path = tmp_path / "store"
    store = Store.create(path)
    w = store.writer("w")
    for n in range(20):
        w.write_trial("s", n, state="RUNNING")
        w.write_trial("s", n, state="COMPLETE" if n % 3 else "PRUNED", latency_ms=float(n))
    rid = w.begin_run("search", "tiny:wan")
    w.finish_run(rid)
    stale = path / ".tmp" / "dead-writer.parquet.0.tmp"
    stale.write_bytes(b"PAR1 partial")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    before_trials, before_runs = store.trials(), store.runs()

    assert store.compact() == {"runs": 2, "trials": 40}
    assert not stale.exists()
    assert len(list((path / "trials").glob("*.parquet"))) == 2  # seed + one merged part
    for after, before in ((store.trials(), before_trials), (store.runs(), before_runs)):
        pd.testing.assert_frame_equal(after, before)  # created/updated included
    w.write_trial("s", 0, state="COMPLETE", latency_ms=99.0)  # a write after compaction still wins
    assert store.trials("s").iloc[0][["state", "latency_ms"]].tolist() == ["COMPLETE", 99.0]

    # Compact repeatedly while another process writes trials and this one reads: no error, nothing lost.
    p = _spawn(path, "t-0", "trials", 30, 0, 0.005)
    rounds = 0
    while p.poll() is None:
        store.compact()
        t = store.trials("shared")
        assert t["number"].is_unique
        rounds += 1
    _finish(p)
    store.compact()
    t = store.trials("shared")
    assert t["number"].tolist() == list(range(0, 60, 2)) and set(t["state"]) == {"COMPLETE"}
    assert rounds >= 2
    store.close()


def test_processes_creating_the_same_store_at_once_all_succeed(tmp_path):
    """One worker per GPU started together, each doing Store.create(path, exist_ok=True)."""
    path = tmp_path / "new" / "store"
    code = (
        "import sys, time; from sixbit_tune.store import Store\n"
        "time.sleep(max(0.0, float(sys.argv[3]) - time.time()))\n"
        "Store.create(sys.argv[1], exist_ok=True).writer().write_trial('s', int(sys.argv[2]), state='RUNNING')\n"
    )
    start = time.time() + 2.0  # past every child's import time: they race on the create itself
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(path), str(i), str(start)], stderr=subprocess.PIPE, text=True)
        for i in range(4)
    ]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    with Store.open(path, read_only=True) as s:
        assert s.trials("s")["number"].tolist() == [0, 1, 2, 3]


def test_create_ignores_what_a_concurrent_create_leaves_in_the_folder(tmp_path):
    """A write probe or a meta.json temp file of another process creating the same store is no foreign file."""
    path = tmp_path / "store"
    path.mkdir()
    (path / ".write-probe-0123abcd").touch()
    (path / "meta.json.0123abcd.tmp").write_text("{}")
    Store.create(path).close()
    with Store.open(path, read_only=True) as s:
        assert s.trials("s").empty
