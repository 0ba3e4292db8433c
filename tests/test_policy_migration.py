"""Version-1 policies load through the migration to version 2; saving writes version 2."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
from policy_helpers import make_v1_dict

from sixbit_tune import policy as P
from sixbit_tune import routes
from sixbit_tune.errors import PolicyError

ROOT = Path(__file__).resolve().parents[1]
V1_FILES = [ROOT / "tests" / "policy_v1_demo_reference_cpu.json"] + sorted(
    (ROOT / "benchmarks" / "results").glob("*policy*.json"))


def test_v1_layer_modes_become_weights_and_routes():
    p = P.load(make_v1_dict())
    assert p.schema_version == 2
    layers = p.dmpq.layers
    dyn = layers["blocks.0.attn1.to_q"]
    assert (dyn.weight, dyn.fast, dyn.robust, dyn.mode) == ("nvfp4", "nvfp4", "int8", "dynamic")
    assert dyn.predictor == {"pooled": P.Line(0.8, 0.01, 0.93, 96)}
    assert (dyn.alpha, dyn.beta, dyn.r2, dyn.n) == (0.8, 0.01, 0.93, 96)
    i8 = layers["blocks.0.ffn.net.2"]
    assert (i8.weight, i8.fast, i8.robust, i8.mode, i8.predictor) == ("int8", "int8", "int8", "fast", None)
    fp4 = layers["blocks.1.attn1.to_q"]
    assert (fp4.weight, fp4.fast, fp4.mode) == ("nvfp4", "nvfp4", "fast")
    none = layers["blocks.1.ffn.net.0.proj"]
    assert (none.weight, none.fast, none.robust) == ("none", "none", "none")
    assert {n: lp.v1_mode for n, lp in layers.items()} == {n: v["mode"] for n, v in
                                                          make_v1_dict()["dmpq"]["layers"].items()}
    assert p.dmpq.first_step == "fast" and p.dmpq.first_step_format == routes.FAST_FORMAT
    assert p.dmpq.nvfp4_weight_encoder == "scale-search"
    assert p.target.menu == {"nvfp4/nvfp4": P.MenuEntry("triton-nvfp4-emulated")}
    assert p.target.nvfp4_path == "emulated"
    assert p.attention is None


def test_v1_saves_as_v2_and_round_trips(tmp_path):
    p = P.load(make_v1_dict())
    path = P.save(p, tmp_path / "p.json")
    data = json.loads(path.read_text())
    assert data["schema_version"] == 2 and "first_step_format" not in data["dmpq"]
    assert "nvfp4_path" not in data["target"]
    jsonschema.Draft202012Validator(P.json_schema()).validate(data)
    assert P.load(path) == p


def test_v1_python_spellings_build_the_same_layers():
    assert P.LayerPolicy("dynamic", 32, 16, alpha=1.0, beta=0.5) == P.LayerPolicy(
        "nvfp4", 32, 16, "nvfp4", "int8", "dynamic", {"pooled": (1.0, 0.5, None, None)})
    assert P.LayerPolicy("dynamic", 32, 16, 1.0, 0.5, 0.9, 7) == P.LayerPolicy(
        "dynamic", 32, 16, alpha=1.0, beta=0.5, r2=0.9, n=7)
    assert P.DMPQ(0.1, {}, "nvfp4").first_step == "fast"
    assert P.DMPQ(0.1, first_step_format="int8").first_step == "robust"
    assert P.Target("g", "9.0", "native").nvfp4_path == "native"


@pytest.mark.parametrize("path", V1_FILES, ids=lambda p: p.name)
def test_committed_v1_files_load(path):
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1
    p = P.load(path)
    v1_layers = data["dmpq"]["layers"]
    assert set(p.dmpq.layers) == set(v1_layers)
    for name, lp in p.dmpq.layers.items():
        assert lp.v1_mode == v1_layers[name]["mode"]
        assert (lp.in_features, lp.out_features) == (v1_layers[name]["in_features"], v1_layers[name]["out_features"])
    assert p.target.nvfp4_path == data["target"]["nvfp4_path"]


V1_BAD = [
    # (id, mutation of the v1 dict, key, words)
    ("bad-mode", ("dmpq", "layers", "blocks.0.ffn.net.2", "mode"), "fp8", "dmpq.layers.blocks.0.ffn.net.2.mode",
     "one of"),
    ("v2-mode-in-v1", ("dmpq", "layers", "blocks.0.ffn.net.2", "mode"), "fast", "dmpq.layers.blocks.0.ffn.net.2.mode",
     "one of"),
    ("missing-mode", ("dmpq", "layers", "blocks.0.ffn.net.2", "mode"), None, "dmpq.layers.blocks.0.ffn.net.2.mode",
     "missing"),
    ("dynamic-without-alpha", ("dmpq", "layers", "blocks.0.attn1.to_q", "alpha"), None,
     "dmpq.layers.blocks.0.attn1.to_q.alpha", "predictor alpha"),
    ("alpha-string", ("dmpq", "layers", "blocks.0.attn1.to_q", "alpha"), "x", "dmpq.layers.blocks.0.attn1.to_q.alpha",
     "expected a number"),
    ("r2-above-one", ("dmpq", "layers", "blocks.0.attn1.to_q", "r2"), 2.0, "dmpq.layers.blocks.0.attn1.to_q.r2",
     "<= 1"),
    ("bad-first-step", ("dmpq", "first_step_format"), "fp16", "dmpq.first_step_format", "one of"),
    ("bad-nvfp4-path", ("target", "nvfp4_path"), "fast", "target.nvfp4_path", "one of"),
    ("unknown-layer-key", ("dmpq", "layers", "blocks.0.ffn.net.2", "gamma"), 1.0, "dmpq.layers.blocks.0.ffn.net.2.gamma",
     "unknown key"),
    ("nvfp4-k-not-16", ("dmpq", "layers", "blocks.1.attn1.to_q", "in_features"), 100,
     "dmpq.layers.blocks.1.attn1.to_q.in_features", "multiple of 16"),
    ("layer-not-object", ("dmpq", "layers", "blocks.1.attn1.to_q"), [1], "dmpq.layers.blocks.1.attn1.to_q",
     "expected an object"),
]


@pytest.mark.parametrize("where,value,key,words", [b[1:] for b in V1_BAD], ids=[b[0] for b in V1_BAD])
def test_malformed_v1_policy_names_its_v1_key(where, value, key, words):
    d = copy.deepcopy(make_v1_dict())
    node = d
    for k in where[:-1]:
        node = node[k]
    if value is None and where[-1] == "mode":
        del node[where[-1]]
    else:
        node[where[-1]] = value
    with pytest.raises(PolicyError) as e:
        P.load(d)
    assert e.value.key == key, (e.value.key, str(e.value))
    assert words in str(e.value)
