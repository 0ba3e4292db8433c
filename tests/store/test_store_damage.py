"""Damaged parts and unwritable stores: a damaged part (truncated, garbage, 64 bytes overwritten, a flipped bit)
is named, set aside in ``quarantine/`` and left out of every query while the rest of the store stays readable; a
store that cannot be written is refused when opened for writing, before any work."""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from unprivileged import make_read_only, make_writable, run_unprivileged

from sixbit_tune.store import (
    DamagedPart,
    Store,
    StoreDamageWarning,
    StoreError,
    StoreReadOnlyError,
    check_part,
)
from sixbit_tune.store.__main__ import main as store_cli

ROWS = 400
PROMPTS = 4
REPO = Path(__file__).resolve().parents[2]


def _block_rows(prompt: int) -> dict:
    i = np.arange(ROWS)
    return {
        "prompt_index": np.full(ROWS, prompt, dtype=np.int32),
        "prompt": [f"prompt {prompt}"] * ROWS,
        "branch": ["cond"] * ROWS,
        "step": i // 4,
        "block_index": i % 4,
        "gamma": np.sin(i * 0.37 + prompt) + 2.0,
        "delta_norm": np.cos(i * 0.11) + prompt,
    }


def _make_store(root: Path) -> Path:
    """A store with PROMPTS block_steps parts of one run, three trials and one policy."""
    with Store.create(root) as s:
        w = s.writer("gpu0")
        rid = w.begin_run("profile", "tiny:wan", run_id="r0")
        for k in range(PROMPTS):
            w.write_block_steps(_block_rows(k), run_id=rid)
        w.finish_run(rid)
        for n in range(3):
            w.write_trial("st", n, state="COMPLETE", latency_ms=10.0 + n, params={"tau": 0.1 * n})
        w.write_policy("p", {"schema_version": 2})
    return root


def _part_of_prompt(root: Path, prompt: int) -> Path:
    parts = sorted(p for p in (root / "block_steps").glob("*.parquet") if not p.name.startswith("0000"))
    return parts[prompt]


def _expected_block_steps(root: Path, without: int | None) -> list[tuple]:
    keep = [k for k in range(PROMPTS) if k != without]
    return [
        (k, int(s), int(b), float(g))
        for k in keep
        for s, b, g in zip(_block_rows(k)["step"], _block_rows(k)["block_index"], _block_rows(k)["gamma"])
    ]


def _read_all(s: Store) -> dict:
    bs = s.block_steps()
    return {
        "block_steps": sorted(zip(bs["prompt_index"], bs["step"], bs["block_index"], bs["gamma"])),
        "runs": s.runs()[["run_id", "status"]].values.tolist(),
        "trials": s.trials("st")["latency_ms"].tolist(),
        "policies": s.policies()["name"].tolist(),
    }


def _assert_rest_intact(s: Store, root: Path, without: int | None) -> None:
    got = _read_all(s)
    assert got["block_steps"] == _expected_block_steps(root, without)
    assert got["runs"] == [["r0", "finished"]]
    assert got["trials"] == [10.0, 11.0, 12.0]
    assert got["policies"] == ["p"]


def _truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: len(data) // 2]


def _garbage(data: bytes, rng: random.Random) -> bytes:
    return rng.randbytes(len(data))


def _garbage_64_mid_file(data: bytes, rng: random.Random) -> bytes:
    mid = len(data) // 2
    return data[:mid] + rng.randbytes(64) + data[mid + 64 :]


def _empty(data: bytes, rng: random.Random) -> bytes:
    return b""


DAMAGE = {"truncated": _truncate, "garbage": _garbage, "garbage-64-mid-file": _garbage_64_mid_file, "empty": _empty}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_part_is_named_set_aside_and_the_rest_stays_readable(tmp_path, damage):
    root = _make_store(tmp_path / "store")
    part = _part_of_prompt(root, 2)
    damaged = DAMAGE[damage](part.read_bytes(), random.Random(damage))
    part.write_bytes(damaged)

    with pytest.warns(StoreDamageWarning) as record:
        s = Store.open(root, read_only=True)
    (warning,) = [w for w in record if issubclass(w.category, StoreDamageWarning)]
    message = str(warning.message)
    assert str(part) in message and "block_steps" in message and "quarantine" in message
    with s:
        _assert_rest_intact(s, root, without=2)
        (found,) = s.damaged_parts()
    moved = root / "quarantine" / "block_steps" / part.name
    assert found == DamagedPart("block_steps", part, found.reason, moved)
    assert not part.exists() and moved.read_bytes() == damaged, "set aside, byte for byte, never deleted"
    why = moved.with_name(moved.name + ".why.txt").read_text()
    assert str(part) in why and found.reason in why

    # Every later reader, writer and command works, without a word about the part already set aside.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for reader in (lambda: Store.open(root, read_only=True), lambda: Store.open(root),
                       lambda: Store.open_many({"a": root})):
            with reader() as s:
                _assert_rest_intact(s, root, without=2)
        assert store_cli(["info", str(root)]) == 0
        assert store_cli(["verify", str(root)]) == 0
        with Store.open(root) as s:  # the lost prompt can be written again
            s.writer("again").write_block_steps(_block_rows(2), run_id="r0")
            _assert_rest_intact(s, root, without=None)
            assert s.compact() == {"runs": 2, "trials": 3}


def test_a_reader_that_is_already_open_sets_aside_a_part_damaged_later(tmp_path):
    root = _make_store(tmp_path / "store")
    with Store.open(root, read_only=True) as s:
        _assert_rest_intact(s, root, without=None)  # every part checked and read once
        trial_part = sorted(p for p in (root / "trials").glob("*.parquet") if not p.name.startswith("0000"))[1]
        data = bytearray(trial_part.read_bytes())
        data[len(data) // 3] ^= 0x10
        trial_part.write_bytes(bytes(data))  # same size: only the content changed
        with pytest.warns(StoreDamageWarning, match=re.escape(str(trial_part))):
            trials = s.trials("st")
        assert trials["latency_ms"].tolist() == [10.0, 12.0]
        assert s.block_steps().shape[0] == PROMPTS * ROWS


def test_every_single_bit_flip_in_a_part_is_detected(tmp_path):
    """200 seeded single-bit flips spread over a whole part: each one is set aside, none is read back as changed
    values (before checksums, 41 of 300 flips were read back silently)."""
    root = _make_store(tmp_path / "store")
    part = _part_of_prompt(root, 1)
    original = part.read_bytes()
    moved = root / "quarantine" / "block_steps" / part.name
    rng = random.Random(16)
    bits = sorted(rng.sample(range(len(original) * 8), 200))
    assert bits[0] < len(original) * 8 // 10 and bits[-1] > len(original) * 8 * 9 // 10  # head, body and footer
    reader = Store.open(root, read_only=True)  # one long-lived reader (a dashboard), and a fresh one each time
    for i, bit in enumerate(bits):
        flipped = bytearray(original)
        flipped[bit // 8] ^= 1 << (bit % 8)
        part.write_bytes(bytes(flipped))
        assert check_part(part) is not None, f"bit {bit} not detected"
        with pytest.warns(StoreDamageWarning, match=re.escape(part.name)):
            if i % 10 == 0:
                with Store.open(root, read_only=True) as s:
                    bs = s.block_steps()
            else:
                bs = reader.block_steps()
        assert sorted(set(bs["prompt_index"])) == [0, 2, 3], f"bit {bit}: prompt 1 was read"
        assert moved.read_bytes() == bytes(flipped)
        moved.unlink()
        moved.with_name(moved.name + ".why.txt").unlink()
    part.write_bytes(original)
    _assert_rest_intact(reader, root, without=None)
    reader.close()


def test_views_take_the_column_types_of_the_parquet_parts(tmp_path):
    """With no part to read (an empty store) the views still have every column, typed as DuckDB reads the
    table's own Parquet schema (the seed file; JSON columns are exposed as JSON)."""
    import duckdb

    from sixbit_tune.store import TABLES

    root = tmp_path / "store"
    Store.create(root).close()
    with Store.open(root, read_only=True) as s:
        for name, table in TABLES.items():
            seed = str(root / name / "00000000000000000000-schema.parquet")
            from_parquet = {r[0]: r[1] for r in duckdb.sql(f"DESCRIBE SELECT * FROM read_parquet('{seed}')").fetchall()}
            in_view = dict(zip(*s.to_arrow(f"DESCRIBE {name}").select(["column_name", "column_type"]).to_pydict()
                               .values()))
            shown = [c for c in table.columns if c.name != "written" and not c.name.startswith("_")]
            for col in shown:
                assert in_view[col.name] == ("JSON" if col.json else from_parquet[col.name]), (name, col.name)


def test_parts_being_written_are_never_flagged_while_read(tmp_path):
    """Two writer processes and readers at once: no part is ever seen half-written, so none is set aside."""
    root = tmp_path / "store"
    Store.create(root).close()
    worker = Path(__file__).with_name("_store_worker.py")
    procs = [subprocess.Popen([sys.executable, str(worker), str(root), f"w-{i}", "block", "15", "20000", "0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    reads = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", StoreDamageWarning)
        with Store.open(root, read_only=True) as s:
            while any(p.poll() is None for p in procs):
                n = s.query("SELECT count(*) AS n FROM block_steps")["n"][0]
                assert n % 20000 == 0
                reads += 1
            for p in procs:
                assert p.wait(timeout=60) == 0, p.stderr.read()
            assert s.query("SELECT count(*) AS n FROM block_steps")["n"][0] == 2 * 15 * 20000
            assert s.damaged_parts() == []
    assert reads > 1 and not (root / "quarantine").exists()


# ------------------------------------------------------------------------------------------ read-only stores

def _synthetic_profile(root: Path) -> None:
    """A profile run whose layer errors follow gamma: `fit` has real work to do on it."""
    rng = np.random.default_rng(0)
    with Store.create(root) as s:
        w = s.writer()
        rid = w.begin_run("profile", "synthetic", config_hash="h0", settings={"steps": 6})
        bs, ls = [], []
        for p in range(3):
            for t in range(6):
                g = float(rng.uniform(0.05, 1.0))
                bs.append(dict(prompt_index=p, branch="cond", step=t, block_index=0, gamma=g))
                for fmt in ("nvfp4", "int8"):
                    ls.append(dict(prompt_index=p, branch="cond", step=t, block_index=0, layer="l0", format=fmt,
                                   out_err=0.3 * g + 0.01))
        w.write_block_steps(bs, run_id=rid)
        w.write_layer_steps(ls, run_id=rid)
        w.finish_run(rid)


def test_read_only_store_is_refused_for_writing_before_any_work_and_still_read(tmp_path):
    root = tmp_path / "store"
    _synthetic_profile(root)
    # A damaged part in the unwritable store: readers skip it in place and say so.
    trial_root = _make_store(tmp_path / "trials-store")
    bad = _part_of_prompt(trial_root, 3)
    bad.write_bytes(bad.read_bytes()[:-10])
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    make_read_only(tmp_path)
    try:
        probe = run_unprivileged(
            """
            import sys, warnings
            from sixbit_tune.store import Store, StoreReadOnlyError, StoreDamageWarning
            root, other = sys.argv[1], sys.argv[2]
            try:
                open(root + "/probe", "w")
            except PermissionError:
                pass
            else:
                sys.exit("the folder is still writable")
            for opener in (lambda: Store.open(root), lambda: Store.create(root, exist_ok=True)):
                try:
                    opener()
                except StoreReadOnlyError as e:
                    assert isinstance(e, PermissionError)
                    print("REFUSED", e)
                else:
                    sys.exit("opened for writing")
            with Store.open(root, read_only=True) as s:
                print("RUNS", len(s.runs()), "LAYER_STEPS", len(s.layer_steps()))
            from sixbit_tune.store.__main__ import main as store_cli
            print("CLI", store_cli(["info", root]), store_cli(["migrate", root]), store_cli(["verify", root]))
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                with Store.open(other, read_only=True) as s:
                    print("PROMPTS", sorted(set(s.block_steps()["prompt_index"])), "TRIALS", len(s.trials()))
                    print("DAMAGED", [(str(d.path), d.moved_to) for d in s.damaged_parts()])
            print("WARNED", [str(x.message) for x in w if issubclass(x.category, StoreDamageWarning)])
            """,
            str(root), str(trial_root),
        )
        assert probe.returncode == 0, probe.stderr + probe.stdout
        out = probe.stdout
        assert out.count("REFUSED") == 2
        assert f"the store at {root} is not writable" in out and "cp -r" in out and "read_only=True" in out
        assert "RUNS 1 LAYER_STEPS 36" in out
        assert "CLI 0 2 0" in out and re.search(r"layer_steps\s+36 rows", out) and "every part is whole" in out
        assert probe.stderr.count("is not writable") == 1  # migrate refused
        assert "PROMPTS [0, 1, 2] TRIALS 3" in out
        assert f"DAMAGED [('{bad}', None)]" in out
        assert str(bad) in out.split("WARNED", 1)[1] and "left in place" in out

        fit = run_unprivileged(
            "import sys; from sixbit_tune.cli import main; sys.exit(main(['fit', '--store', sys.argv[1]]))", str(root)
        )
        assert fit.returncode == 2, fit.stderr
        assert fit.stderr.startswith(f"sixbit-tune fit: error: the store at {root} is not writable")
        assert "Traceback" not in fit.stderr and fit.stdout == ""
    finally:
        make_writable(tmp_path)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "nothing written or moved"
    # Writable again: the same command runs, and the damaged part is set aside by the next reader.
    from sixbit_tune.cli import main as cli

    assert cli(["fit", "--store", str(root), "--min-n", "4"]) == 0
    with pytest.warns(StoreDamageWarning, match=re.escape(str(bad))):
        with Store.open(trial_root, read_only=True) as s:
            assert sorted(set(s.block_steps()["prompt_index"])) == [0, 1, 2]
    assert (trial_root / "quarantine" / "block_steps" / bad.name).is_file()


def test_store_in_an_unwritable_folder_cannot_be_created(tmp_path):
    parent = tmp_path / "locked"
    (parent / "empty").mkdir(parents=True)
    make_read_only(parent)
    try:
        r = run_unprivileged(
            """
            import sys
            from sixbit_tune.store import Store, StoreError
            for path in sys.argv[1:]:
                try:
                    Store.create(path, exist_ok=True)
                except StoreError as e:
                    print("REFUSED", e)
            """,
            str(parent / "store"), str(parent / "empty"),
        )
    finally:
        make_writable(parent)
    assert r.returncode == 0, r.stderr
    new, empty = r.stdout.splitlines()
    assert new.startswith(f"REFUSED cannot create the store folder {parent / 'store'}")
    assert empty.startswith(f"REFUSED the store at {parent / 'empty'} is not writable")
    assert issubclass(StoreReadOnlyError, StoreError) and not (parent / "store").exists()
    assert list((parent / "empty").iterdir()) == []


def test_verify_command_names_damaged_parts(tmp_path, capsys):
    root = _make_store(tmp_path / "store")
    part = _part_of_prompt(root, 0)
    part.write_bytes(part.read_bytes()[:100])
    assert store_cli(["verify", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"damaged {part}" in out and "1 damaged parts" in out
    assert store_cli(["verify", str(root)]) == 0
    out = capsys.readouterr().out
    assert "every part is whole" in out and f"1 parts in total are set aside in {root / 'quarantine'}" in out
    shutil.rmtree(root / "quarantine")
    assert store_cli(["verify", str(root)]) == 0
    assert "set aside" not in capsys.readouterr().out
