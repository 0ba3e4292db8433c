"""The policy schema: round trips, one test per malformed-input class, schema file freshness."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import jsonschema
import pytest
from policy_helpers import make_policy, make_v1_dict

from sixbit_tune import policy as P
from sixbit_tune.errors import PolicyError

ROOT = Path(__file__).resolve().parents[1]


def as_dict() -> dict:
    return make_policy().to_dict()


def test_round_trip_through_file(tmp_path):
    p = make_policy()
    path = P.save(p, tmp_path / "sub" / "p.json")
    assert P.load(path) == p
    assert P.load(str(path)) == p
    assert P.load(path.read_text()) == p
    assert P.load(p.to_dict()) == p
    assert not list(path.parent.glob(".*.tmp")), "atomic save leaves no temporary file"


@pytest.mark.parametrize("tau", [math.inf, -math.inf])
def test_infinite_threshold_round_trips_as_string(tau):
    p = make_policy().replace(dmpq=P.DMPQ(tau, make_policy().dmpq.layers))
    text = P.to_json(p)
    assert json.loads(text)["dmpq"]["threshold"] == ("inf" if tau > 0 else "-inf")
    assert P.loads(text).dmpq.threshold == tau


def test_defaults_fill_optional_sections():
    d = as_dict()
    del d["measured"], d["provenance"]
    p = P.load(d)
    assert p.measured == P.Measured()
    assert p.provenance.tool_version


def test_load_does_not_mutate_input():
    d = as_dict()
    before = copy.deepcopy(d)
    P.load(d)
    assert d == before


def mutate(path: str, value, *, delete: bool = False) -> dict:
    d = as_dict()
    keys = path.split("/")
    node = d
    for k in keys[:-1]:
        node = node[k]
    if delete:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return d


_DEL = object()
BAD = [
    # (id, JSON path to change, new value, expected key in the error, words in the message)
    ("unknown-top", "extra", 1, "extra", "unknown key"),
    ("unknown-nested", "tdc/windw", 3, "tdc.windw", "unknown key"),
    ("unknown-layer-key", "dmpq/layers/blocks.0.attn1.to_q/gamma", 1.0, "dmpq.layers.blocks.0.attn1.to_q.gamma", "unknown"),
    ("missing-model", "model", _DEL, "model", "missing"),
    ("missing-threshold", "dmpq/threshold", _DEL, "dmpq.threshold", "missing"),
    ("missing-in-features", "dmpq/layers/blocks.0.ffn.net.2/in_features", _DEL, "in_features", "missing"),
    ("wrong-type-str-for-float", "tdc/tolerance", "0.1", "tdc.tolerance", "expected a number"),
    ("wrong-type-bool-for-int", "tdc/warmup", True, "tdc.warmup", "expected an integer"),
    ("wrong-type-float-for-int", "model/blocks", 8.0, "model.blocks", "expected an integer"),
    ("wrong-type-list", "tdc/blocks", "0,1", "tdc.blocks", "expected a list"),
    ("wrong-type-layers", "dmpq/layers", [], "dmpq.layers", "expected an object"),
    ("negative-tolerance", "tdc/tolerance", -0.5, "tdc.tolerance", ">= 0"),
    ("negative-warmup", "tdc/warmup", -1, "tdc.warmup", ">= 0"),
    ("zero-blocks", "model/blocks", 0, "model.blocks", ">= 1"),
    ("share-above-one", "measured/nvfp4_share", 1.5, "measured.nvfp4_share", "<= 1"),
    ("bad-mode", "dmpq/layers/blocks.0.ffn.net.2/mode", "fp8", "dmpq.layers.blocks.0.ffn.net.2.mode", "one of"),
    ("bad-cache-dtype", "tdc/cache_dtype", "float64", "tdc.cache_dtype", "one of"),
    ("bad-cfg-rows", "tdc/cfg_rows", "rows", "tdc.cfg_rows", "one of"),
    ("extrapolate-two", "tdc/extrapolate", 2, "tdc.extrapolate", "<= 1"),
    ("extrapolate-bool", "tdc/extrapolate", True, "tdc.extrapolate", "expected an integer"),
    ("extrapolate-null", "tdc/extrapolate", None, "tdc.extrapolate", "null"),
    ("refresh-robust-negative", "tdc/refresh_robust", -1, "tdc.refresh_robust", ">= 0"),
    ("refresh-robust-string", "tdc/refresh_robust", "yes", "tdc.refresh_robust", "expected an integer"),
    ("bad-first-step", "dmpq/first_step", "int8", "dmpq.first_step", "one of"),
    ("v1-first-step-in-v2", "dmpq/first_step_format", "int8", "dmpq.first_step_format", "unknown key"),
    ("v1-nvfp4-path-in-v2", "target/nvfp4_path", "emulated", "target.nvfp4_path", "unknown key"),
    ("bad-menu-route", "target/menu", {"nvfp4/bf16": {"implementation": "x"}}, "target.menu.nvfp4/bf16",
     "unknown route"),
    ("menu-without-implementation", "target/menu", {"fp8/fp8": {"tflops": 1.0}},
     "target.menu.fp8/fp8.implementation", "missing"),
    ("menu-negative-speed", "target/menu", {"fp8/fp8": {"implementation": "x", "speedup": -1}},
     "target.menu.fp8/fp8.speedup", ">= 0"),
    ("bad-weight", "dmpq/layers/blocks.0.ffn.net.2/weight", "int4", "dmpq.layers.blocks.0.ffn.net.2.weight", "one of"),
    ("missing-weight", "dmpq/layers/blocks.0.ffn.net.2/weight", _DEL, "dmpq.layers.blocks.0.ffn.net.2.weight",
     "missing"),
    ("v1-alpha-in-v2", "dmpq/layers/blocks.0.ffn.net.2/alpha", 0.1, "dmpq.layers.blocks.0.ffn.net.2.alpha",
     "unknown key"),
    ("route-not-over-weight", "dmpq/layers/blocks.0.ffn.net.2/fast", "nvfp4", "dmpq.layers.blocks.0.ffn.net.2.fast",
     "do not run over"),
    ("fp8-weight-int8-route", "dmpq/layers/blocks.1.attn1.to_v/robust", "int8", "blocks.1.attn1.to_v.robust",
     "do not run over"),
    ("null-route", "dmpq/layers/blocks.0.ffn.net.2/fast", None, "dmpq.layers.blocks.0.ffn.net.2.fast", "null"),
    ("dynamic-unquantized", "dmpq/layers/blocks.1.ffn.net.0.proj/mode", "dynamic", "blocks.1.ffn.net.0.proj.mode",
     "cannot be 'dynamic'"),
    ("encoder-on-int8", "dmpq/layers/blocks.0.ffn.net.2/encoder", "scale-search", "blocks.0.ffn.net.2.encoder",
     "only NVFP4"),
    ("bad-encoder", "dmpq/layers/blocks.1.attn1.to_q/encoder", "best", "blocks.1.attn1.to_q.encoder", "one of"),
    ("line-too-short", "dmpq/layers/blocks.0.attn1.to_q/predictor/cond", [0.1, 0.2], "predictor.cond",
     "[alpha, beta, r2, n]"),
    ("line-not-list", "dmpq/layers/blocks.0.attn1.to_q/predictor/cond", {"alpha": 1}, "predictor.cond",
     "expected a predictor line"),
    ("line-null-alpha", "dmpq/layers/blocks.0.attn1.to_q/predictor/cond", [None, 0.2, None, None],
     "predictor.cond[0]", "null"),
    ("line-r2-above-one", "dmpq/layers/blocks.0.attn1.to_q/predictor/cond", [0.1, 0.2, 1.5, 3],
     "predictor.cond[2]", "<= 1"),
    ("line-negative-n", "dmpq/layers/blocks.0.attn1.to_q/predictor/cond", [0.1, 0.2, 0.5, -3],
     "predictor.cond[3]", ">= 0"),
    ("empty-predictor", "dmpq/layers/blocks.0.attn1.to_q/predictor", {}, "blocks.0.attn1.to_q.predictor",
     "at least one line"),
    ("too-many-lines", "dmpq/layers/blocks.0.attn1.to_q/predictor",
     {f"b{i}": [0.1, 0.2, None, None] for i in range(P.MAX_BRANCHES + 1)}, "blocks.0.attn1.to_q.predictor",
     "lines allowed"),
    ("predictor-not-object", "dmpq/layers/blocks.0.attn1.to_q/predictor", 5, "blocks.0.attn1.to_q.predictor",
     "expected an object of predictor lines"),
    ("bad-attention-mode", "attention/blocks/1/mode", "fp4", "attention.blocks.1.mode", "one of"),
    ("bad-attention-format", "attention/format", "nvfp4", "attention.format", "one of"),
    ("attention-block-out-of-range", "attention/blocks", {"8": {"mode": "8bit"}}, "attention.blocks.8",
     "out of range"),
    ("attention-block-not-index", "attention/blocks", {"01": {"mode": "8bit"}}, "attention.blocks.01",
     "block indices"),
    ("dynamic-attention-without-predictor", "attention/blocks/0/predictor", None, "attention.blocks.0.predictor",
     "needs a predictor"),
    ("nan-attention-threshold", "attention/threshold", math.nan, "attention.threshold", "NaN"),
    ("unknown-attention-key", "attention/window", 1, "attention.window", "unknown key"),
    ("bad-nvfp4-encoder", "dmpq/nvfp4_weight_encoder", "best", "dmpq.nvfp4_weight_encoder", "one of"),
    ("null-nvfp4-encoder", "dmpq/nvfp4_weight_encoder", None, "dmpq.nvfp4_weight_encoder", "null"),
    ("dynamic-without-predictor", "dmpq/layers/blocks.0.attn1.to_q/predictor", None, "predictor", "predictor"),
    ("nvfp4-k-not-16", "dmpq/layers/blocks.1.attn1.to_q/in_features", 100, "in_features", "multiple of 16"),
    ("block-out-of-range", "tdc/blocks", [0, 8], "tdc.blocks", "out of range"),
    ("inf-latency", "measured/latency_ms", "inf", "measured.latency_ms", "expected a number"),
    ("nan-number", "dmpq/threshold", math.nan, "dmpq.threshold", "NaN"),
    ("inf-alpha", "dmpq/layers/blocks.0.attn1.to_q/predictor/cond", [math.inf, 0, None, None], "cond[0]", "finite"),
    ("newer-version", "schema_version", P.SCHEMA_VERSION + 1, "schema_version", "upgrade sixbit-tune"),
    ("older-version-no-migration", "schema_version", 0, "schema_version", "no migration"),
    ("v2-body-as-v1", "schema_version", 1, "dmpq.layers.blocks.0.attn1.to_q.alpha", "predictor alpha"),
    ("version-not-int", "schema_version", "1", "schema_version", "integer"),
    # Values that are legal JSON of the right type but cannot be meant.
    ("warmup-2-to-64", "tdc/warmup", 2**64, "tdc.warmup", f"<= {P.MAX_STEPS}"),
    ("cooldown-beyond-steps", "tdc/cooldown", P.MAX_STEPS + 1, "tdc.cooldown", f"<= {P.MAX_STEPS}"),
    ("max-skips-2-to-64", "tdc/max_skips", 2**64, "tdc.max_skips", f"<= {P.MAX_STEPS}"),
    ("duplicate-tdc-blocks", "tdc/blocks", [0, 3, 3], "tdc.blocks", "repeated: [3]"),
    ("too-many-tdc-blocks", "tdc/blocks", [0] * (P.MAX_BLOCKS + 1), "tdc.blocks", "distinct values"),
    ("tdc-block-beyond-cap", "tdc/blocks", [P.MAX_BLOCKS], "tdc.blocks[0]", f"<= {P.MAX_BLOCKS - 1}"),
    ("empty-compute-capability", "target/compute_capability", "", "target.compute_capability", "empty"),
    ("bad-compute-capability", "target/compute_capability", "sm90", "target.compute_capability", "must match"),
    ("empty-gpu", "target/gpu", "", "target.gpu", "use null"),
    ("empty-family", "model/family", "", "model.family", "empty"),
    ("config-hash-not-sha256", "model/config_hash", "abc", "model.config_hash", "must match"),
    ("blocks-beyond-cap", "model/blocks", P.MAX_BLOCKS + 1, "model.blocks", f"<= {P.MAX_BLOCKS}"),
    ("in-features-2-to-64", "dmpq/layers/blocks.0.ffn.net.2/in_features", 2**64, "in_features", "<="),
    ("bytes-beyond-int64", "measured/weight_bytes", 2**63, "measured.weight_bytes", "<="),
    ("trial-beyond-int64", "provenance/trial", 2**64, "provenance.trial", "<="),
    ("empty-profile-run", "provenance/profile_runs", ["r1", ""], "provenance.profile_runs[1]", "empty"),
    ("empty-layer-name", "dmpq/layers", {"": {"weight": "none", "in_features": 16, "out_features": 16}},
     "dmpq.layers", "non-empty"),
    ("float-beyond-range", "dmpq/layers/blocks.0.attn1.to_q/predictor/uncond", [10**400, 0, None, None], "uncond[0]",
     "out of range"),
]


# Rules JSON Schema does not express (enforced by load()).
CROSS_FIELD = {
    "dmpq/layers/blocks.0.attn1.to_q/predictor", "dmpq/layers/blocks.1.attn1.to_q/in_features", "tdc/blocks",
    "target/menu", "dmpq/layers/blocks.0.ffn.net.2/fast", "dmpq/layers/blocks.1.attn1.to_v/robust",
    "dmpq/layers/blocks.1.ffn.net.0.proj/mode", "dmpq/layers/blocks.0.ffn.net.2/encoder", "attention/blocks",
    "attention/blocks/0/predictor",
}


@pytest.mark.parametrize("path,value,key,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_malformed_policy_names_the_key(path, value, key, words):
    d = mutate(path, None, delete=True) if value is _DEL else mutate(path, value)
    with pytest.raises(PolicyError) as e:
        P.load(d)
    assert e.value.key is not None and e.value.key.endswith(key), (e.value.key, str(e.value))
    assert words in str(e.value), str(e.value)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_json_nan_and_infinity_literals_rejected(literal):
    text = P.to_json(make_policy()).replace('"tolerance": 0.05', f'"tolerance": {literal}')
    with pytest.raises(PolicyError, match="not allowed"):
        P.loads(text)


@pytest.mark.parametrize("literal", ["1e400", "-1e400", "1" * 400])
def test_out_of_range_number_literals_name_their_key(literal):
    # 1e400 used to be read as an infinite threshold; an infinite threshold is written as the string "inf".
    text = P.to_json(make_policy()).replace('"threshold": 0.12', f'"threshold": {literal}')
    with pytest.raises(PolicyError, match="out of range") as e:
        P.loads(text)
    assert e.value.key == "dmpq.threshold" and '"inf"' in str(e.value)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_literal_names_its_key(literal):
    text = P.to_json(make_policy()).replace("0.93", literal)
    with pytest.raises(PolicyError, match=f"literal {literal} is not allowed") as e:
        P.loads(text)
    assert e.value.key == "dmpq.layers.blocks.0.attn1.to_q.predictor.cond[2]"


def test_duplicate_keys_and_bad_json_rejected(tmp_path):
    text = P.to_json(make_policy()).replace('"warmup": 3', '"warmup": 3, "warmup": 4')
    with pytest.raises(PolicyError, match="duplicate key"):
        P.loads(text)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PolicyError, match="bad.json: not valid JSON"):
        P.load(bad)
    with pytest.raises(PolicyError, match="policy file not found"):
        P.load(tmp_path / "missing.json")
    with pytest.raises(PolicyError, match="expected a JSON object"):
        P.load([1, 2])  # type: ignore[arg-type]


def test_python_construction_is_validated_too():
    with pytest.raises(PolicyError, match="tolerance"):
        P.TDC(tolerance=-1.0)
    with pytest.raises(PolicyError, match="weight"):
        P.LayerPolicy("int4", 16, 16)
    with pytest.raises(PolicyError, match="dynamic"):
        P.LayerPolicy("dynamic", 16, 16)
    with pytest.raises(PolicyError, match="do not run over") as e:
        P.LayerPolicy("int8", 16, 16, fast="nvfp4")
    assert e.value.key == "fast"
    with pytest.raises(PolicyError, match="nvfp4_path"):
        P.Target(None, None, "fast")
    with pytest.raises(PolicyError, match="unknown route") as e:
        P.Target(None, None, {"int8/nvfp4": P.MenuEntry("x")})
    assert e.value.key == "menu.int8/nvfp4"
    with pytest.raises(PolicyError, match="one of"):
        P.DMPQ(0.1, first_step="fp16")
    with pytest.raises(PolicyError, match="needs a predictor"):
        P.AttentionBlock("dynamic")


def test_migration_hook_is_applied(monkeypatch):
    # A version-0 file becomes loadable once a migration 0 -> 1 is registered; migrations chain (0 -> 1 -> 2).
    d = make_v1_dict()
    d["schema_version"] = 0
    d["tdc"]["window"] = d["tdc"].pop("warmup")

    def v0_to_v1(old: dict) -> dict:
        new = copy.deepcopy(old)
        new["tdc"]["warmup"] = new["tdc"].pop("window")
        new["schema_version"] = 1
        return new

    monkeypatch.setitem(P.MIGRATIONS, 0, v0_to_v1)
    v1 = make_v1_dict()
    assert P.load(d) == P.load(v1)
    assert P.load(d).schema_version == P.SCHEMA_VERSION == 2


def test_predict():
    lp = make_policy().dmpq.layers["blocks.0.attn1.to_q"]
    assert lp.predict(0.5, "cond") == pytest.approx(0.8 * 0.5 + 0.01)
    assert lp.predict(0.5, "uncond") == pytest.approx(0.5 * 0.5 + 0.02)
    # One decision for both branches: the upper envelope of the branch lines (largest alpha, largest beta).
    assert (lp.alpha, lp.beta) == (0.8, 0.02)
    for g in (0.0, 0.3, 2.0):
        assert lp.predict(g) >= max(lp.predict(g, "cond"), lp.predict(g, "uncond"))
    pooled = P.LayerPolicy("nvfp4", 16, 16, mode="dynamic", predictor={"pooled": (1.0, 0.0, None, None),
                                                                      "cond": (2.0, 0.5, None, None)})
    assert pooled.predict(1.0) == 1.0 and pooled.predict(1.0, "uncond") == 1.0 and pooled.predict(1.0, "cond") == 2.5
    with pytest.raises(ValueError):
        make_policy().dmpq.layers["blocks.0.ffn.net.2"].predict(0.1)


def test_committed_schema_is_current():
    committed = (ROOT / "policies" / "schema.json").read_text(encoding="utf-8")
    assert committed == P.schema_text(), "policies/schema.json is stale: python -m sixbit_tune.policy --schema > policies/schema.json"


def test_schema_accepts_valid_and_rejects_malformed():
    schema = P.json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    validator.validate(json.loads(P.to_json(make_policy())))
    for name, path, value, _, _ in BAD:
        if name in ("inf-alpha", "float-beyond-range"):
            continue  # numbers no JSON number can be (the float range): covered by the literal tests
        if path in CROSS_FIELD:
            continue  # cross-field rules: enforced by load(), documented as outside the schema
        if isinstance(value, float) and value.is_integer():
            continue  # JSON Schema counts 8.0 as an integer; load() is stricter and rejects it
        if path == "schema_version" and value in (0, 1):
            continue  # older versions are for load() to migrate
        d = mutate(path, None, delete=True) if value is _DEL else mutate(path, value)
        if isinstance(value, float) and math.isnan(value):
            continue  # JSON cannot carry NaN; covered by the literal test
        assert not validator.is_valid(d), f"schema accepted malformed policy ({path}={value!r})"


def test_check_cli(tmp_path, capsys):
    good = P.save(make_policy(), tmp_path / "good.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(mutate("tdc/tolerance", -1)))
    assert P.main(["--check", str(good)]) == 0
    assert P.main(["--check", str(good), str(bad)]) == 1
    assert "tdc.tolerance" in capsys.readouterr().err


COMMITTED = sorted(p for p in (ROOT / "policies").glob("*.json") if p.name != "schema.json") + sorted(
    (ROOT / "benchmarks" / "results").glob("*policy*.json")
)


def test_committed_policies_are_found():
    assert any(p.parent.name == "policies" for p in COMMITTED) and any(p.parent.name == "results" for p in COMMITTED)


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_policies_load_and_match_the_schema(path):
    policy = P.load(path)
    data = json.loads(path.read_text())
    if data["schema_version"] == P.SCHEMA_VERSION:  # older versions are for load() to migrate
        jsonschema.Draft202012Validator(P.json_schema()).validate(data)
    jsonschema.Draft202012Validator(P.json_schema()).validate(json.loads(P.to_json(policy)))
    assert policy.provenance.tool_version


def test_shipped_policies_are_current():
    for path in (ROOT / "policies").glob("*.json"):
        if path.name != "schema.json":
            assert json.loads(path.read_text())["schema_version"] == P.SCHEMA_VERSION, path.name


# ------------------------------------------------------------------------------------ NVFP4 weight encoder


def test_nvfp4_weight_encoder_defaults_to_standard_when_absent():
    d = as_dict()
    del d["dmpq"]["nvfp4_weight_encoder"]
    assert P.load(d).dmpq.nvfp4_weight_encoder == "standard"
    assert P.DMPQ(0.1).nvfp4_weight_encoder == "standard"
    for path in COMMITTED:  # policies written before the field existed
        assert P.load(path).dmpq.nvfp4_weight_encoder in P.NVFP4_WEIGHT_ENCODERS


@pytest.mark.parametrize("encoder", P.NVFP4_WEIGHT_ENCODERS)
def test_nvfp4_weight_encoder_round_trips(tmp_path, encoder):
    p = make_policy()
    p = p.replace(dmpq=P.DMPQ(0.12, p.dmpq.layers, nvfp4_weight_encoder=encoder))
    assert p.dmpq.encoder_of("blocks.1.attn1.to_q") == "scale-search"  # the layer's own encoder
    assert p.dmpq.encoder_of("blocks.0.attn1.to_q") == encoder
    assert json.loads(P.to_json(p))["dmpq"]["nvfp4_weight_encoder"] == encoder
    assert P.load(P.save(p, tmp_path / "p.json")).dmpq.nvfp4_weight_encoder == encoder
    jsonschema.Draft202012Validator(P.json_schema()).validate(p.to_dict())


def test_nvfp4_weight_encoder_checked_in_python_too():
    with pytest.raises(PolicyError, match="one of") as e:
        P.DMPQ(0.1, nvfp4_weight_encoder="round")
    assert e.value.key == "nvfp4_weight_encoder"


def test_nvfp4_weight_encoder_names_match_the_formats():
    from sixbit_tune.formats import nvfp4

    assert P.NVFP4_WEIGHT_ENCODERS == nvfp4.WEIGHT_ENCODERS


# ------------------------------------------------------------------------------------ TDC cache knobs


def test_tdc_cache_knobs_default_when_absent():
    d = as_dict()
    del d["tdc"]["extrapolate"], d["tdc"]["refresh_robust"]
    tdc = P.load(d).tdc
    assert (tdc.cache_dtype, tdc.extrapolate, tdc.refresh_robust) == ("bfloat16", 0, 0)
    assert P.load(d) == make_policy()
    for path in COMMITTED:  # policies written before the fields existed
        assert P.load(path).tdc.extrapolate in (0, 1)


@pytest.mark.parametrize("knobs", [
    {"cache_dtype": "float8_e4m3fn", "extrapolate": 1, "refresh_robust": 1},
    {"cache_dtype": "float8_e4m3fn", "extrapolate": 0, "refresh_robust": 0},
    {"cache_dtype": "bfloat16", "extrapolate": 1, "refresh_robust": 0},
])
def test_tdc_cache_knobs_round_trip_and_validate_against_the_schema(tmp_path, knobs):
    p = make_policy(**knobs)
    on_disk = json.loads(P.to_json(p))["tdc"]
    assert {k: on_disk[k] for k in knobs} == knobs
    assert P.load(P.save(p, tmp_path / "p.json")) == p
    jsonschema.Draft202012Validator(P.json_schema()).validate(p.to_dict())


def test_tdc_cfg_rows_defaults_to_joint_and_round_trips():
    d = as_dict()
    del d["tdc"]["cfg_rows"]
    assert P.load(d).tdc.cfg_rows == "joint"
    p = make_policy(cfg_rows="per_row")
    assert P.loads(P.to_json(p)).tdc.cfg_rows == "per_row"
    with pytest.raises(PolicyError, match="one of"):
        P.TDC(cfg_rows="each")


def test_tdc_cache_knobs_checked_in_python_too():
    with pytest.raises(PolicyError, match="<= 1") as e:
        P.TDC(extrapolate=2)
    assert e.value.key == "extrapolate"
    with pytest.raises(PolicyError, match="one of") as e:
        P.TDC(cache_dtype="float8_e5m2")
    assert e.value.key == "cache_dtype"
