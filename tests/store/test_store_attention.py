"""The attention tables (schema version 3): attn_steps and attn_predictors written, validated and read back, and a
version-2 store (written before they existed) read as it is and migrated."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

from sixbit_tune.errors import NonFiniteError, StoreSchemaError
from sixbit_tune.store import SCHEMA_VERSION, Store, migrate
from sixbit_tune.store.__main__ import main as store_cli

ATTN = {"prompt_index": [0, 0], "branch": ["cond", "uncond"], "step": [1, 1], "block_index": [3, 3],
        "format": ["fp8", "fp8"], "attn_err": [0.02, 0.03]}


def _store(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    with Store.create(path) as s:
        w = s.writer()
        w.begin_run("profile", "reference", run_id="r0")
        w.write_block_steps({"prompt_index": [0], "branch": ["cond"], "step": [0], "block_index": [3],
                             "gamma": [0.25]}, run_id="r0")
    return path


def test_attn_steps_round_trip_and_bad_rows_are_refused_by_column(tmp_path):
    path = _store(tmp_path)
    with Store.open(path) as s:
        w = s.writer()
        w.write_attn_steps(ATTN, run_id="r0")
        got = s.attn_steps(["r0"])
        assert list(got["branch"]) == ["cond", "uncond"] and list(got["attn_err"]) == [0.02, 0.03]
        assert s.attn_steps(formats=["int8"]).empty
        with pytest.raises(ValueError, match=r"attn_steps.format: values \['nvfp4'\] not allowed"):
            w.write_attn_steps({**ATTN, "format": ["nvfp4", "fp8"]}, run_id="r0")
        with pytest.raises(NonFiniteError, match="attn_steps.attn_err: 1 NaN"):
            w.write_attn_steps({**ATTN, "attn_err": [float("nan"), 0.1]}, run_id="r0")
        with pytest.raises(ValueError, match="unknown run_id 'r9'"):
            w.write_attn_steps(ATTN, run_id="r9")
        assert len(s.attn_steps()) == 2  # nothing of the refused writes landed


def test_attn_predictors_latest_write_of_a_key_wins(tmp_path):
    path = _store(tmp_path)
    row = {"block_index": 3, "branch": "cond", "format": "fp8", "alpha": 0.5, "beta": 0.01, "r2": 0.9, "n": 6,
           "rmse": 0.001, "mean_err": 0.02, "ss_tot": 0.004, "pooled": True, "trusted": True}
    with Store.open(path) as s:
        w = s.writer()
        w.write_attn_predictors([row, {**row, "branch": "uncond"}], run_ids=["r0"], fit_id="f1",
                                settings={"min_r2": 0.5})
        w.write_attn_predictors([{**row, "alpha": 0.7}], run_ids=["r0"], fit_id="f1")
        df = s.attn_predictors("f1")
    assert list(zip(df["branch"], df["alpha"])) == [("cond", 0.7), ("uncond", 0.5)]
    assert list(df["run_ids"].iloc[0]) == ["r0"]


def _make_v2_store(tmp_path: Path) -> Path:
    """A store as schema version 2 wrote it: no attention table folders."""
    path = _store(tmp_path)
    for name in ("attn_steps", "attn_predictors"):
        shutil.rmtree(path / name)
    meta = json.loads((path / "meta.json").read_text())
    meta["schema_version"] = 2
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_version_2_store_reads_as_it_is_and_migrates_to_the_attention_tables(tmp_path):
    path = _make_v2_store(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the attention tables are simply empty
        with Store.open(path, read_only=True) as s:
            assert s.block_steps()["gamma"].tolist() == [0.25]
            assert s.attn_steps().empty and s.attn_predictors().empty and "attn_err" in s.attn_steps().columns
    with pytest.raises(StoreSchemaError) as e:  # writing needs the migration: the message names the command
        Store.open(path)
    assert "schema version 2" in str(e.value) and f"`python -m sixbit_tune.store migrate {path}`" in str(e.value)
    assert not (path / "attn_steps").exists()  # a refused open changes nothing

    assert store_cli(["migrate", str(path)]) == 0
    assert json.loads((path / "meta.json").read_text())["schema_version"] == SCHEMA_VERSION
    assert (path / "attn_steps" / "00000000000000000000-schema.parquet").is_file()
    with Store.open(path) as s:
        assert s.block_steps()["gamma"].tolist() == [0.25]  # the old rows are untouched
        s.writer().write_attn_steps(ATTN, run_id="r0")
        assert s.attn_steps()["attn_err"].tolist() == [0.02, 0.03]
    assert migrate(path) == []


def test_version_2_migration_is_rerunnable_after_a_crash_midway(tmp_path):
    path = _make_v2_store(tmp_path)
    (path / "attn_steps").mkdir()  # the step ran partly, meta.json still says 2
    steps = migrate(path)
    assert steps[0] == "2 -> 3: add the attention tables attn_steps and attn_predictors (empty)"
    assert [s.split(":")[0] for s in steps] == [f"{v} -> {v + 1}" for v in range(2, SCHEMA_VERSION)]
    with Store.open(path) as s:
        assert s.attn_predictors().empty
