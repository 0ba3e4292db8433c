"""Schema versions: a newer or older store is refused with a message naming both versions and what to run; the
migration machinery (``migrate`` and ``python -m sixbit_tune.store migrate``) brings an older store up."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sixbit_tune.errors import StoreSchemaError
from sixbit_tune.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    TABLES,
    Migration,
    Store,
    StoreChecksumWarning,
    StoreDamageWarning,
    migrate,
)
from sixbit_tune.store.__main__ import main as store_cli


def _set_version(path: Path, version: int) -> None:
    meta = json.loads((path / "meta.json").read_text())
    meta["schema_version"] = version
    (path / "meta.json").write_text(json.dumps(meta))


def _make_store(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    with Store.create(path) as s:
        w = s.writer()
        rid = w.begin_run("profile", "tiny:wan", run_id="r0")
        w.write_block_steps({"prompt_index": [0], "branch": ["cond"], "step": [0], "block_index": [0],
                             "gamma": [0.25]}, run_id=rid)
    return path


def test_newer_store_asks_to_upgrade(tmp_path):
    path = _make_store(tmp_path)
    _set_version(path, SCHEMA_VERSION + 1)
    for opener in (lambda: Store.open(path), lambda: Store.open(path, read_only=True),
                   lambda: Store.open_many([path]), lambda: Store.create(path, exist_ok=True)):
        with pytest.raises(StoreSchemaError) as e:
            opener()
        msg = str(e.value)
        assert f"schema version {SCHEMA_VERSION + 1}" in msg and f"version {SCHEMA_VERSION} that" in msg
        assert "pip install -U sixbit-tune" in msg and str(path) in msg
    with pytest.raises(StoreSchemaError, match="newer than this sixbit-tune"):
        migrate(path)


def test_older_store_without_migration_says_recreate(tmp_path):
    path = _make_store(tmp_path)
    _set_version(path, 0)
    with pytest.raises(StoreSchemaError) as e:
        Store.open(path)
    msg = str(e.value)
    assert "schema version 0" in msg and f"reads version {SCHEMA_VERSION}" in msg
    assert "no migration from version 0" in msg and "Re-create it" in msg
    assert store_cli(["migrate", str(path)]) == 2  # the CLI reports the same, with an exit code


def test_corrupt_meta_is_a_schema_error(tmp_path):
    path = _make_store(tmp_path)
    (path / "meta.json").write_text("{not json")
    with pytest.raises(StoreSchemaError, match="meta.json is unreadable"):
        Store.open(path)


def _v0_rename_gamma(root: Path) -> None:
    """The documented migration path, for real: version-0 stores called the column ``Gamma``; rewrite each part
    file with DuckDB under a temporary name and replace it, one file at a time (re-runnable after a crash)."""
    for part in sorted((root / "block_steps").glob("*.parquet")):
        if "Gamma" not in pq.read_schema(part).names:
            continue
        tmp = part.with_suffix(".migrating")
        con = duckdb.connect()
        src, dst = str(part).replace("'", "''"), str(tmp).replace("'", "''")
        con.execute(f"COPY (SELECT * RENAME (Gamma AS gamma) FROM read_parquet('{src}')) TO '{dst}' (FORMAT parquet)")
        con.close()
        os.replace(tmp, part)


def _make_v0_store(tmp_path: Path) -> Path:
    """A store as a (hypothetical) version 0 wrote it: no seed files, column ``Gamma``."""
    path = _make_store(tmp_path)
    for seed in path.glob("*/00000000000000000000-schema.parquet"):
        seed.unlink()
    (part,) = [p for p in (path / "block_steps").glob("*.parquet")]
    t = pq.read_table(part)
    part.unlink()
    _strip_checksums(path)
    pq.write_table(t.rename_columns(["Gamma" if n == "gamma" else n for n in t.column_names]),
                   part.with_name(_CHECKSUM.sub(".parquet", part.name)))
    _set_version(path, 0)
    return path


_CHECKSUM = re.compile(r"\.sha256-[0-9a-f]{64}\.parquet$")


def _strip_checksums(path: Path) -> list[Path]:
    """Rename every part as schema version 1 named it: without the SHA-256."""
    out = []
    for part in sorted(path.glob("*/*.parquet")):
        if _CHECKSUM.search(part.name):
            new = part.with_name(_CHECKSUM.sub(".parquet", part.name))
            os.rename(part, new)
            out.append(new)
    return out


def test_older_store_with_a_migration_names_the_command_and_migrates(tmp_path, monkeypatch):
    path = _make_v0_store(tmp_path)
    monkeypatch.setitem(MIGRATIONS, 0, Migration(0, "rename block_steps.Gamma to gamma", _v0_rename_gamma))
    with pytest.raises(StoreSchemaError) as e:
        Store.open(path, read_only=True)
    msg = str(e.value)
    assert f"schema version 0; sixbit-tune 0.1.0 reads version {SCHEMA_VERSION}" in msg
    assert re.search(rf"run `python -m sixbit_tune.store migrate {re.escape(str(path))}`", msg), msg

    assert store_cli(["migrate", str(path)]) == 0
    assert json.loads((path / "meta.json").read_text())["schema_version"] == SCHEMA_VERSION
    with Store.open(path, read_only=True) as s:
        assert s.block_steps()["gamma"].tolist() == [0.25]
        assert s.trials().empty  # seed files restored: empty tables are queryable again
    assert migrate(path) == []  # already current: nothing to do
    # The real command line answers too (no migration needed now).
    out = subprocess.run([sys.executable, "-m", "sixbit_tune.store", "info", str(path)], check=True,
                         capture_output=True, text=True).stdout
    assert f"schema version {SCHEMA_VERSION}" in out and re.search(r"block_steps\s+1 rows", out)


def test_parts_carry_the_schema_version(tmp_path):
    path = _make_store(tmp_path)
    for part in path.glob("*/*.parquet"):
        md = pq.read_schema(part).metadata
        assert md[b"sixbit_tune.schema_version"] == str(SCHEMA_VERSION).encode()
        assert md[b"sixbit_tune.table"] == part.parent.name.encode()
    assert isinstance(pq.read_schema(path / "runs" / "00000000000000000000-schema.parquet"), pa.Schema)


def test_missing_stale_or_damaged_seed_files_do_not_block_reading_and_are_repaired_writable(tmp_path):
    path = _make_store(tmp_path)
    seed = path / "trials" / "00000000000000000000-schema.parquet"
    pq.write_table(pa.table({"study": pa.array([], pa.string())}), seed)  # a seed that lost columns
    (path / "policies" / "00000000000000000000-schema.parquet").unlink()
    (path / "runs" / "00000000000000000000-schema.parquet").write_bytes(b"garbage, not Parquet")
    with Store.open(path, read_only=True) as s:  # the views take the columns' types from the code
        assert s.trials().empty and s.policies().empty and "latency_ms" in s.trials().columns
        assert s.runs()["run_id"].tolist() == ["r0"] and s.block_steps()["gamma"].tolist() == [0.25]
    with Store.open(path) as s:
        assert s.trials().empty and s.policies().empty and "latency_ms" in s.trials().columns
    for name in ("trials", "policies", "runs"):  # the writable open rewrote them
        seed = path / name / "00000000000000000000-schema.parquet"
        assert pq.read_schema(seed).remove_metadata().equals(TABLES[name].arrow_schema.remove_metadata())


def _make_v1_store(tmp_path: Path) -> Path:
    """A store as schema version 1 wrote it: the same tables, parts named without a checksum."""
    path = _make_store(tmp_path)
    with Store.open(path) as s:
        w = s.writer("v1")
        w.write_trial("st", 0, state="COMPLETE", latency_ms=5.0)
        w.write_trial("st", 1, state="COMPLETE", latency_ms=6.0)
    assert len(_strip_checksums(path)) == 4
    _set_version(path, 1)
    return path


def test_version_1_store_reads_without_migrating_and_migrates_to_checksums(tmp_path):
    path = _make_v1_store(tmp_path)
    with pytest.warns(StoreChecksumWarning, match=rf"schema version 1.*no checksums.*migrate {re.escape(str(path))}"):
        s = Store.open(path, read_only=True)
    with s:
        assert s.block_steps()["gamma"].tolist() == [0.25]
        assert s.trials("st")["latency_ms"].tolist() == [5.0, 6.0]
    for opener in (lambda: Store.open(path), lambda: Store.create(path, exist_ok=True)):
        with pytest.raises(StoreSchemaError) as e:  # writing needs the migration: the message names the command
            opener()
        assert f"schema version 1; sixbit-tune 0.1.0 reads version {SCHEMA_VERSION}" in str(e.value)
        assert f"`python -m sixbit_tune.store migrate {path}`" in str(e.value)

    # A truncated version-1 part is found by decoding it; the migration sets it aside and checksums the rest.
    (bad,) = sorted(p for p in (path / "trials").glob("*.parquet") if not p.name.startswith("0000"))[1:]  # trial 1
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.warns(StoreDamageWarning, match=re.escape(str(bad))):
        steps = migrate(path)
    assert steps[0].startswith("1 -> 2: name every part with the SHA-256")
    assert (path / "quarantine" / "trials" / bad.name).read_bytes() == data[: len(data) // 2]
    parts = [p for p in path.glob("*/*.parquet") if not p.name.startswith("0000")]
    assert len(parts) == 3 and all(_CHECKSUM.search(p.name) for p in parts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # current, every part whole: nothing to warn about
        with Store.open(path) as s:
            assert s.block_steps()["gamma"].tolist() == [0.25]
            assert s.trials("st")["latency_ms"].tolist() == [5.0]
            s.writer().write_trial("st", 1, state="COMPLETE", latency_ms=7.0)
            assert s.trials("st")["latency_ms"].tolist() == [5.0, 7.0]
    assert migrate(path) == []


def test_unchecksummed_part_copied_into_a_current_store_is_read_and_migrate_checksums_it(tmp_path):
    path = _make_store(tmp_path)
    (part,) = [p for p in (path / "block_steps").glob("*.parquet") if _CHECKSUM.search(p.name)]
    os.rename(part, part.with_name(_CHECKSUM.sub(".parquet", part.name)))
    with pytest.warns(StoreChecksumWarning, match="carries no checksum"):
        with Store.open(path, read_only=True) as s:
            assert s.block_steps()["gamma"].tolist() == [0.25]
    assert migrate(path) == ["checksummed 1 parts that had none"]
    (part,) = [p for p in (path / "block_steps").glob("*.parquet") if not p.name.startswith("0000")]
    assert _CHECKSUM.search(part.name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Store.open(path, read_only=True) as s:
            assert s.block_steps()["gamma"].tolist() == [0.25]
