"""Export from the dashboard: names that could leave policies/ are refused; an exported trial is a valid policy
(schema, sixbit_tune.policy, the runtime's load_policy, applied to the real tiny pipeline) recorded in the store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dashboard_helpers import MODEL
from sixbit_tune.dashboard.export import check_export_name, export_path, export_policy

from sixbit_tune.store import Store

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name, file", [("h200-fast", "h200-fast.json"), ("p.v1.json", "p.v1.json"),
                                        ("A_b-9", "A_b-9.json")])
def test_accepted_names(name, file):
    assert check_export_name(name) == file


@pytest.mark.parametrize(
    "name, why",
    [
        ("../evil", "separator"),
        ("..", "'..'"),
        ("a..b", "'..'"),
        ("sub/dir", "separator"),
        ("sub\\dir", "separator"),
        ("/etc/passwd", "separator"),
        ("C:evil", "drive letter"),
        ("", "give the policy a name"),
        ("   ", "give the policy a name"),
        (" x", "spaces"),
        (".hidden", "start with a letter or digit"),
        ("x" * 200, "128"),
        ("semi;colon", "may only hold"),
        ("nul\x00byte", "may only hold"),
    ],
)
def test_refused_names(name, why, tmp_path):
    with pytest.raises(ValueError, match=None) as e:
        check_export_name(name)
    assert why in str(e.value)
    with pytest.raises(ValueError):
        export_path(name, tmp_path)


def test_a_symlink_in_policies_cannot_redirect_the_write(tmp_path):
    policies = tmp_path / "policies"
    policies.mkdir()
    outside = tmp_path / "outside.json"
    (policies / "planted.json").symlink_to(outside)
    with pytest.raises(ValueError, match="outside"):
        export_path("planted", policies)
    assert export_path("fine", policies) == (policies / "fine.json").resolve()


def _trial(store_path: Path, reference: str) -> tuple[str, int]:
    with Store.open(store_path, read_only=True) as s:
        t = s.trials()
    row = t[t["quality"].map(lambda q: json.loads(q).get("reference") == reference)].iloc[0]
    return str(row["study"]), int(row["number"])


def test_export_writes_a_valid_policy_that_the_runtime_loads_and_applies(store_copy, tmp_path):
    import jsonschema

    from sixbit_tune import policy as P
    from sixbit_tune.models.specs import load_pipeline
    from sixbit_tune.runtime import apply_policy, load_policy

    study, number = _trial(store_copy, "dmpq_no_cache")
    policies = tmp_path / "policies"
    path, payload, ok = export_policy(store_copy, study, number, "wan-dmpq", policies)
    assert path == (policies / "wan-dmpq.json").resolve() and path.read_bytes() == payload
    assert list(policies.iterdir()) == [path]
    doc = json.loads(payload)
    jsonschema.validate(doc, json.loads((REPO / "policies" / "schema.json").read_text()))
    pol = load_policy(path)
    assert pol == P.load(doc)
    assert pol.provenance.study == study and pol.provenance.trial == number
    with Store.open(store_copy, read_only=True) as s:
        t = s.trials()
        exported = s.policies()
    row = t[t["number"] == number].iloc[0]
    assert pol.measured.latency_ms == pytest.approx(row["latency_ms"])
    assert pol.measured.psnr_db == pytest.approx(row["psnr_db"])
    assert ok == json.loads(row["quality"])["feasible"]
    assert exported["name"].tolist() == ["wan-dmpq"] and exported["trial"].tolist() == [number]
    pipe = load_pipeline(MODEL)
    handle = apply_policy(pipe, pol)
    try:
        assert handle is not None
    finally:
        handle.remove()


def test_export_refuses_escaping_names_and_writes_nothing(store_copy, tmp_path):
    study, number = _trial(store_copy, "static_int8")
    policies = tmp_path / "policies"
    for bad in ("../escaped", str(tmp_path / "abs"), "a/b"):
        with pytest.raises(ValueError):
            export_policy(store_copy, study, number, bad, policies)
    assert not (tmp_path / "escaped.json").exists() and not (tmp_path / "abs.json").exists()
    assert not policies.exists() or not any(policies.iterdir())
    with Store.open(store_copy, read_only=True) as s:
        assert s.policies().empty


def test_export_of_an_unknown_trial_is_a_clear_error(store_copy, tmp_path):
    study, _ = _trial(store_copy, "static_int8")
    with pytest.raises(ValueError, match="has no trial 99"):
        export_policy(store_copy, study, 99, "x", tmp_path)
    with pytest.raises(ValueError, match="no study"):
        export_policy(store_copy, "no-such-study", 0, "x", tmp_path)
