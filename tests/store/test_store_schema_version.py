"""Schema versions: a newer or older store is refused with a message naming both versions and what to run; the
migration machinery (``migrate`` and ``python -m sixbit_tune.store migrate``) brings an older store up."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sixbit_tune.errors import StoreSchemaError
from sixbit_tune.store import MIGRATIONS, SCHEMA_VERSION, Migration, Store, migrate
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
    pq.write_table(t.rename_columns(["Gamma" if n == "gamma" else n for n in t.column_names]), part)
    _set_version(path, 0)
    return path


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


def test_missing_or_stale_seed_files_are_refused_read_only_and_repaired_writable(tmp_path):
    path = _make_store(tmp_path)
    seed = path / "trials" / "00000000000000000000-schema.parquet"
    pq.write_table(pa.table({"study": pa.array([], pa.string())}), seed)  # a seed that lost columns
    (path / "policies" / "00000000000000000000-schema.parquet").unlink()
    with pytest.raises(StoreSchemaError, match=r"tables \['trials', 'policies'\].*open it once writable"):
        Store.open(path, read_only=True)
    with Store.open(path) as s:
        assert s.trials().empty and s.policies().empty and "latency_ms" in s.trials().columns
    Store.open(path, read_only=True).close()
