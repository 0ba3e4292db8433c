"""Schema version 4: ``layer_steps.format`` and ``predictors.format`` hold every profiled route (the formats of
version 3 keep their meaning); a version-3 store, written before, opens read-only as it is and for writing only
after a migration that changes none of its parts, and an older sixbit-tune is kept away from a version-4 store."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sixbit_tune.errors import StoreSchemaError
from sixbit_tune.routes import PROFILE_ROUTES
from sixbit_tune.store import SCHEMA_VERSION, TABLES, Store, migrate
from sixbit_tune.store.__main__ import main as store_cli

V3_FORMATS = ("nvfp4", "int8")


def _layer_rows(formats) -> dict:
    n = len(formats)
    return {"prompt_index": [0] * n, "branch": ["cond"] * n, "step": [1] * n, "block_index": [0] * n,
            "layer": ["blocks.0.attn1.to_q"] * n, "format": list(formats),
            "act_err": [0.01 * (i + 1) for i in range(n)], "out_err": [0.02 * (i + 1) for i in range(n)]}


def _pred_rows(formats) -> list[dict]:
    return [{"layer": "blocks.0.attn1.to_q", "format": f, "alpha": 0.5 + i, "beta": 0.01, "r2": 0.9, "n": 12,
             "trusted": True} for i, f in enumerate(formats)]


def _make_v3_store(tmp_path: Path) -> Path:
    """A store as schema version 3 wrote it: layer and predictor rows of the formats nvfp4 and int8 only."""
    path = tmp_path / "store"
    with Store.create(path) as s:
        w = s.writer()
        w.begin_run("profile", "tiny:wan", run_id="r0")
        w.write_block_steps({"prompt_index": [0], "branch": ["cond"], "step": [0], "block_index": [0],
                             "gamma": [0.25]}, run_id="r0")
        w.write_layer_steps(_layer_rows(V3_FORMATS), run_id="r0")
        w.write_predictors(_pred_rows(V3_FORMATS), run_ids=["r0"], fit_id="f0")
    meta = json.loads((path / "meta.json").read_text())
    meta["schema_version"] = 3
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_every_profiled_route_is_a_stored_format():
    for table in ("layer_steps", "predictors"):
        assert TABLES[table].column("format").allowed == PROFILE_ROUTES
    assert set(V3_FORMATS) < set(PROFILE_ROUTES)


def test_new_routes_are_written_and_read_back_and_unknown_ones_refused(tmp_path):
    with Store.create(tmp_path / "s") as s:
        w = s.writer()
        w.begin_run("profile", "tiny:wan", run_id="r0")
        w.write_layer_steps(_layer_rows(PROFILE_ROUTES), run_id="r0")
        w.write_predictors(_pred_rows(PROFILE_ROUTES), run_ids=["r0"], fit_id="f1")
        lay = s.layer_steps(["r0"])
        assert sorted(lay["format"]) == sorted(PROFILE_ROUTES)
        assert sorted(s.predictors("f1")["format"]) == sorted(PROFILE_ROUTES)
        for bad in ("int8/int8", "fp4", "nvfp4/none"):
            with pytest.raises(ValueError, match=rf"layer_steps.format: values \['{bad}'\] not allowed"):
                w.write_layer_steps(_layer_rows([bad]), run_id="r0")
        assert len(s.layer_steps(["r0"])) == len(PROFILE_ROUTES)  # a refused write loses nothing written before


def test_version_3_store_migrates_unchanged_and_then_takes_the_new_routes(tmp_path):
    path = _make_v3_store(tmp_path)
    parts = {p: p.read_bytes() for p in path.glob("*/*.parquet") if not p.name.startswith("0000")}
    with pytest.raises(StoreSchemaError) as e:  # writing needs the migration; the message names the command
        Store.open(path)
    assert "schema version 3" in str(e.value) and f"`python -m sixbit_tune.store migrate {path}`" in str(e.value)
    with Store.open(path, read_only=True) as s:  # reading (the dashboard) does not
        assert sorted(s.layer_steps(["r0"])["format"]) == ["int8", "nvfp4"]
    assert store_cli(["migrate", str(path)]) == 0
    assert json.loads((path / "meta.json").read_text())["schema_version"] == SCHEMA_VERSION == 4
    after = {p: p.read_bytes() for p in path.glob("*/*.parquet") if not p.name.startswith("0000")}
    assert after == parts  # no part rewritten
    seed = path / "layer_steps" / "00000000000000000000-schema.parquet"
    assert pq.read_schema(seed).metadata[b"sixbit_tune.schema_version"] == b"4"
    with Store.open(path) as s:
        lay = s.layer_steps(["r0"])
        assert sorted(zip(lay["format"], lay["out_err"])) == [("int8", 0.04), ("nvfp4", 0.02)]
        assert sorted(s.predictors("f0")["format"]) == ["int8", "nvfp4"]
        s.writer().write_layer_steps(_layer_rows(("nvfp4/int8", "fp8")), run_id="r0")
        assert sorted(s.layer_steps(["r0"])["format"]) == sorted(("nvfp4", "int8", "nvfp4/int8", "fp8"))
    assert migrate(path) == []


def test_a_version_4_store_is_refused_by_an_older_sixbit_tune(tmp_path, monkeypatch):
    """What the version bump is for: a sixbit-tune that reads version 3 (whose fit would reject the new routes)
    refuses the store and says to upgrade."""
    path = tmp_path / "s"
    Store.create(path).close()
    import sixbit_tune.store.store as store_mod

    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", 3)
    with pytest.raises(StoreSchemaError, match="newer than version 3"):
        Store.open(path, read_only=True)
