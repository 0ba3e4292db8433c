"""Hostile policy input: whatever is handed to ``load``/``loads``/``Policy.from_dict``, only ``PolicyError`` escapes.

Three parts, all seeded and bounded in time (about half a minute on 2 cores in all):

* one explicit case per class of failure that used to escape as another exception (bad encodings, deep nesting,
  huge integers, non-string keys, strings that are neither JSON nor a file, oversized input);
* a seeded mutation fuzz of valid policy files (byte flips, hostile tokens, truncation, re-encoding, structural
  changes of the decoded object);
* hypothesis: arbitrary bytes, text and JSON-like values put anywhere in a policy, and valid policies generated from
  the field tables, which must round-trip through JSON and through a file.

Every error must also be one printable line of bounded length (the CLI prints it as is).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policy_helpers import make_policy

from sixbit_tune import policy as P
from sixbit_tune import routes
from sixbit_tune.errors import PolicyError

ROOT = Path(__file__).resolve().parents[1]
SEED = 20240516

FUZZ_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


VALID = make_policy()
VALID_TEXT = P.to_json(VALID)
VALID_DICT = json.loads(VALID_TEXT)
SEEDS = [VALID_TEXT] + [
    p.read_text(encoding="utf-8")
    for p in sorted((ROOT / "policies").glob("*.json")) + sorted((ROOT / "benchmarks" / "results").glob("*policy*.json"))
    + [ROOT / "tests" / "policy_v1_demo_reference_cpu.json"]  # version 1, through the migration
    if p.name != "schema.json"
]


def outcome(source) -> P.Policy | PolicyError:
    """Load ``source``; a loaded policy must round-trip, an error must be a one-line PolicyError."""
    try:
        policy = P.load(source)
    except PolicyError as e:
        message = str(e)
        assert message.isprintable(), repr(message)  # one line: no newline or other control character
        assert len(message) < 2000, message[:200]
        assert e.key is None or (e.key.isprintable() and e.key in message), (e.key, message)
        return e
    assert isinstance(policy, P.Policy)
    assert P.loads(P.to_json(policy)) == policy
    return policy


def error(source) -> PolicyError:
    result = outcome(source)
    assert isinstance(result, PolicyError), f"accepted: {source!r:.200}"
    return result


# --------------------------------------------------------------------------------------------------------------
# One explicit case per class of failure.


@pytest.mark.parametrize(
    "encoding,words",
    [
        ("utf-16", "UTF-16"),  # with a byte-order mark
        ("utf-16-le", "UTF-16"),
        ("utf-16-be", "UTF-16"),
        ("utf-32", "UTF-32"),
        ("cp1252", "not UTF-8"),  # the "é" below is one byte 0xe9
    ],
)
def test_non_utf8_file(tmp_path, encoding, words):
    text = VALID_TEXT.replace('"s1"', '"étude"')
    path = tmp_path / "p.json"
    path.write_bytes(text.encode(encoding))
    e = error(path)
    assert words in str(e) and "p.json" in str(e)
    assert words in str(error(text.encode(encoding)))


def test_utf8_file_with_byte_order_mark_loads(tmp_path):
    path = tmp_path / "p.json"
    path.write_bytes(b"\xef\xbb\xbf" + VALID_TEXT.encode())
    assert P.load(path) == VALID
    assert P.load("\ufeff" + VALID_TEXT) == VALID  # a BOM-prefixed string is JSON text, not a path


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"a":' * 100_000 + "1" + "}" * 100_000,
        VALID_TEXT.replace('"latency_ms": 812.5', '"latency_ms": ' + "[" * 50_000 + "]" * 50_000),
        VALID_TEXT.replace('"warmup": 3', '"warmup": ' + '{"x":' * 50_000 + "1" + "}" * 50_000),
    ],
    ids=["lists", "objects", "deep-in-measured", "deep-in-tdc"],
)
def test_deep_nesting(text):
    e = error(text)
    assert "nested too deeply" in str(e)


def test_deep_nesting_in_a_dict():
    deep: list = []
    for _ in range(sys.getrecursionlimit() * 3):
        deep = [deep]
    d = copy.deepcopy(VALID_DICT)
    d["measured"]["latency_ms"] = deep
    e = error(d)
    assert e.key == "measured.latency_ms" and "expected a number" in str(e)


@pytest.mark.parametrize(
    "key,literal",
    [
        ("tdc.warmup", "9" * 5000),  # more digits than Python converts to int by default
        ("tdc.warmup", str(2**64)),
        ("measured.latency_ms", "1" * 400),  # an integer no float holds
        ("measured.latency_ms", "1e400"),
        ("dmpq.threshold", "-1e400"),
        ("measured.psnr_db", "NaN"),
        ("measured.psnr_db", "-Infinity"),
    ],
)
def test_huge_numbers_name_their_key(key, literal):
    section, name = key.split(".")
    d = copy.deepcopy(VALID_DICT)
    d[section][name] = "@@"
    e = error(json.dumps(d).replace('"@@"', literal))
    assert e.key == key, str(e)


@pytest.mark.parametrize(
    "key,value",
    [
        ("tdc.warmup", 10**5000),  # repr() of this raises ValueError
        ("measured.latency_ms", 10**400),  # float() of this raises OverflowError
        ("dmpq.threshold", -(10**400)),
    ],
    ids=["5000-digit-int", "10^400-float", "-10^400-threshold"],
)
def test_huge_numbers_in_a_dict(key, value):
    section, name = key.split(".")
    d = copy.deepcopy(VALID_DICT)
    d[section][name] = value
    assert error(d).key == key


@pytest.mark.parametrize(
    "where,key",
    [((), 1), (("tdc",), 2.5), (("dmpq", "layers"), 7), (("dmpq", "layers", "blocks.0.ffn.net.2"), (1, 2))],
    ids=["top", "tdc", "layers", "layer"],
)
def test_mixed_type_keys(where, key):
    d = copy.deepcopy(VALID_DICT)
    node = d
    for k in where:
        node = node[k]
    node[key] = {"weight": "none", "in_features": 16, "out_features": 16} if where == ("dmpq", "layers") else 1
    e = error(d)
    assert "keys must be" in str(e) and e.key == (".".join(where) or "policy")


@pytest.mark.parametrize(
    "source,words",
    [
        ("", "empty policy"),
        ("  \n\t", "empty policy"),
        ("\ufeff", "empty policy"),
        ("null", "expected a JSON object"),
        ("\ufeffnull", "expected a JSON object"),
        ("5", "expected a JSON object"),
        ('"p.json"', "expected a JSON object"),
        ("[1, 2]", "expected a JSON object"),
        ("NaN", "expected a JSON object"),
        ("no/such/policy.json", "not found"),
        ("a" * 5000, "policy"),  # a file name too long for the OS
        ("x\0y.json", "cannot read"),  # a NUL byte cannot be in a path
        ("{", "not valid JSON"),
        ("{}", "missing required key"),
    ],
)
def test_strings_neither_json_nor_a_file(tmp_path, monkeypatch, source, words):
    monkeypatch.chdir(tmp_path)  # relative names are looked up in an empty folder
    assert words in str(error(source))


def test_directories_and_odd_paths(tmp_path):
    assert "is a directory" in str(error(tmp_path))
    assert "is a directory" in str(error(str(tmp_path)))
    good = P.save(VALID, tmp_path / "p.json")
    assert "not found" in str(error(good / "child.json"))  # a path below a file
    assert "not found" in str(error(tmp_path / "line\nbreak.json"))  # one printable line all the same

    class BytesPath(os.PathLike):
        def __fspath__(self):
            return os.fsencode(good)

    error(BytesPath())
    for other in (42, 4.2, None, [1, 2], object()):
        assert error(other).key == "policy"


def test_size_cap_is_checked_before_parsing(tmp_path):
    # At the cap (padded with whitespace) a policy still loads; one byte more is refused, as is a 50 MB file,
    # in well under the time parsing 50 MB took.
    at_cap = VALID_TEXT + " " * (P.MAX_POLICY_BYTES - len(VALID_TEXT.encode()))
    path = tmp_path / "at-cap.json"
    path.write_text(at_cap, encoding="utf-8")
    assert P.load(path) == VALID
    path.write_text(at_cap + " ", encoding="utf-8")
    assert "MAX_POLICY_BYTES" in str(error(path))
    big = tmp_path / "big.json"
    with open(big, "wb") as fh:
        fh.write(b'{"schema_version": 1, "x": "')
        fh.truncate(50 * 1024 * 1024)  # 50 MB (a sparse file)
    start = time.perf_counter()
    for source in (big, str(big), "{" + " " * (50 * 1024 * 1024)):
        assert "MAX_POLICY_BYTES" in str(error(source))
    assert time.perf_counter() - start < 1.0
    assert "MAX_POLICY_BYTES" in str(error(at_cap.encode() + b" "))


def test_control_characters_in_names_stay_on_one_line():
    d = copy.deepcopy(VALID_DICT)
    d["dmpq"]["layers"]["bad\nname\x00"] = {"weight": "int8", "in_features": 16, "out_features": 16, "mode": "x"}
    e = error(d)
    assert e.key.startswith("dmpq.layers.bad\\nname")
    d = copy.deepcopy(VALID_DICT)
    d["tdc"]["\u2028sep\r"] = 1
    error(d)
    error(VALID_TEXT.replace('"s1"', '"\\ud800"').replace('"trial": 17', '"trial": "\\u0000\\n"'))


# --------------------------------------------------------------------------------------------------------------
# Seeded mutation fuzz of valid policy files.

TOKENS = [
    "NaN", "Infinity", "-Infinity", "1e400", "-1e999", "9" * 400, "9" * 5000, "-0", "1.5", "0", "-1", "2e5",
    "null", "true", "false", '""', '"x"', '"\\ud800"', '"inf"', "[]", "{}", "[" * 3000, "{" * 50, "]", "}",
    ",", ":", '"', "\\", "\ufeff", "\x00", "\u2028", "é", '{"a": 1, "a": 2}', '"schema_version": 99',
]


def mutate_text(rng: random.Random, text: str) -> str | bytes:
    kind = rng.randrange(8)
    i = rng.randrange(len(text) + 1)
    if kind == 0:  # insert a hostile token
        return text[:i] + rng.choice(TOKENS) + text[i:]
    if kind == 1:  # replace a span by a hostile token
        return text[:i] + rng.choice(TOKENS) + text[i + rng.randrange(1, 40):]
    if kind == 2:  # truncate
        return text[:i]
    if kind == 3:  # delete a span
        return text[:i] + text[i + rng.randrange(1, 200):]
    if kind == 4:  # duplicate a span
        j = min(len(text), i + rng.randrange(1, 400))
        return text[:j] + text[i:j] + text[j:]
    raw = bytearray(text.encode("utf-8"))
    if kind == 5:  # flip bits
        for _ in range(rng.randrange(1, 8)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        return bytes(raw)
    if kind == 6:  # another encoding
        return text.encode(rng.choice(["utf-16", "utf-16-be", "utf-32", "latin-1", "utf-8-sig"]), "replace")
    return bytes(raw[:i]) + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16))) + bytes(raw[i:])


HOSTILE_VALUES = [
    None, True, 0, -1, 2**64, 10**400, 1e308, -0.0, math.nan, math.inf, "", "x" * 10_000, "\ud800", "inf",
    [], [1, 1], [[[[]]]], {}, {1: 2}, {(1, 2): 3}, {"": 1}, {"mode": "none"}, b"bytes", object(),
]


def mutate_dict(rng: random.Random, data: dict) -> dict:
    data = copy.deepcopy(data)
    nodes = [data]
    node = data
    while isinstance(node, dict) and node and rng.random() < 0.7:
        node = node[rng.choice(list(node))]
        if isinstance(node, dict):
            nodes.append(node)
    target = rng.choice(nodes)
    kind = rng.randrange(3)
    if kind == 0 and target:
        target[rng.choice(list(target))] = rng.choice(HOSTILE_VALUES)
    elif kind == 1 and target:
        del target[rng.choice(list(target))]
    else:
        target[rng.choice(["extra", 1, 2.5, None, (1,), ""])] = rng.choice(HOSTILE_VALUES)
    return data


def test_mutation_fuzz(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a mutated string that is not JSON text is looked up as a relative path
    rng = random.Random(SEED)
    path = tmp_path / "p.json"
    counts = {"loaded": 0, "refused": 0}
    deadline = time.monotonic() + 30  # bounded on a slow, shared machine; 3,000 cases take ~4 s on one core
    for n in range(3000):
        if time.monotonic() > deadline:
            break
        seed_text = VALID_TEXT if rng.random() < 0.75 else rng.choice(SEEDS)
        mutated = seed_text
        for _ in range(rng.randrange(1, 4)):
            mutated = mutate_text(rng, mutated if isinstance(mutated, str) else mutated.decode("latin-1"))
        source: object
        how = n % 3
        if how == 0:
            source = mutated
        else:
            path.write_bytes(mutated.encode("utf-8", "surrogatepass") if isinstance(mutated, str) else mutated)
            source = path if how == 1 else str(path)
        result = outcome(source)
        counts["loaded" if isinstance(result, P.Policy) else "refused"] += 1
        result = outcome(mutate_dict(rng, VALID_DICT if rng.random() < 0.75 else json.loads(rng.choice(SEEDS))))
        counts["loaded" if isinstance(result, P.Policy) else "refused"] += 1
    assert counts["refused"] > 500 and counts["loaded"] > 10, counts  # the fuzz reaches both outcomes


# --------------------------------------------------------------------------------------------------------------
# Hypothesis.

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
python_keys = st.one_of(st.text(max_size=8), st.integers(), st.floats(allow_nan=False), st.none(), st.booleans())


def paths_of(data, prefix=()):
    yield prefix
    if isinstance(data, dict):
        for k, v in data.items():
            yield from paths_of(v, (*prefix, k))


ALL_PATHS = sorted(paths_of(VALID_DICT), key=repr)


@FUZZ_SETTINGS
@given(st.binary(max_size=2000) | st.text(max_size=2000))
def test_arbitrary_bytes_and_text(source):
    outcome(source)
    if isinstance(source, str):
        outcome(source.encode("utf-8", "surrogatepass"))


@FUZZ_SETTINGS
@given(st.sampled_from(ALL_PATHS), json_values | st.integers(min_value=2**60) | st.dictionaries(python_keys, json_values, max_size=3))
def test_any_value_anywhere(path, value):
    d = copy.deepcopy(VALID_DICT)
    if not path:
        outcome(value)
        return
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    outcome(d)
    try:
        text = json.dumps(d)
    except (TypeError, ValueError):
        return  # not JSON-serialisable (non-string keys): the dict case above covers it
    outcome(text)


def _strategy(f: P._Field, **bounds):
    """Valid values for one field, from its table entry (kinds, ranges, choices, patterns)."""
    kind = f.kind
    if kind == "enum":
        s = st.sampled_from(f.choices)
    elif kind == "str":
        s = st.from_regex(f.pattern, fullmatch=True) if f.pattern else st.text(min_size=1, max_size=12)
    elif kind == "int":
        lo = int(bounds.get("minimum", f.minimum if f.minimum is not None else -(2**62)))
        hi = int(bounds.get("maximum", f.maximum if f.maximum is not None else 2**62))
        s = st.integers(lo, hi)
    elif kind == "float":
        s = st.floats(f.minimum, f.maximum, allow_nan=False, allow_infinity=f.allow_inf)
    elif kind.startswith("list["):
        item = _strategy(P._Field(f.key, kind[5:-1], minimum=f.minimum, maximum=bounds.get("maximum", f.maximum)))
        s = st.lists(item, max_size=5, unique=f.unique)
    elif kind == "lines":
        line = st.tuples(*(_strategy(item) for item in P._LINE_ITEMS)).map(lambda t: P.Line(*t))
        s = st.dictionaries(st.sampled_from(["pooled", "cond", "uncond"]) | st.text(min_size=1, max_size=8), line,
                            min_size=1, max_size=3)
    else:  # pragma: no cover - objects are built in valid_policies
        raise AssertionError(kind)
    return (st.none() | s) if f.nullable else s


def _section(cls, **overrides):
    fields = {f.name: overrides[f.name] if f.name in overrides else _strategy(f) for f in cls._FIELDS}
    return st.fixed_dictionaries(fields).map(lambda kw: cls(**kw))


def _field(cls, key):
    return next(f for f in cls._FIELDS if f.key == key)


@st.composite
def _layer(draw):
    """A valid layer: a stored weight, two routes it supports, a mode, a predictor where the mode needs one."""
    weight = draw(st.sampled_from(routes.WEIGHT_FORMATS))
    fast, robust = (draw(st.sampled_from(routes.ROUTES[weight])) for _ in range(2))
    modes = ("fast", "robust") if weight == "none" else P.LAYER_MODES
    mode = draw(st.sampled_from(modes))
    lines = _strategy(dataclasses.replace(_field(P.LayerPolicy, "predictor"), nullable=False))
    return P.LayerPolicy(
        weight,
        draw(st.integers(1, P.MAX_FEATURES // 16).map(lambda k: 16 * k)),
        draw(st.integers(1, P.MAX_FEATURES)),
        fast, robust, mode,
        draw(lines) if mode == "dynamic" else draw(st.none() | lines),
        draw(st.none() | st.sampled_from(P.NVFP4_WEIGHT_ENCODERS)) if weight == "nvfp4" else None,
    )


@st.composite
def _attention(draw, blocks: int):
    lines = _strategy(dataclasses.replace(_field(P.AttentionBlock, "predictor"), nullable=False))

    @st.composite
    def block(draw):
        mode = draw(st.sampled_from(P.ATTENTION_MODES))
        return P.AttentionBlock(mode, draw(lines) if mode == "dynamic" else draw(st.none() | lines))

    keys = st.integers(0, blocks - 1).map(str)
    return draw(_section(P.Attention, blocks=st.dictionaries(keys, block(), max_size=4)))


@st.composite
def valid_policies(draw):
    blocks = draw(st.integers(1, 48))
    menu = st.dictionaries(st.sampled_from(routes.all_route_keys()), _section(P.MenuEntry), max_size=3)
    tdc_blocks = _field(P.TDC, "blocks")
    return P.Policy(
        model=draw(_section(P.ModelInfo, blocks=st.just(blocks))),
        target=draw(_section(P.Target, menu=menu)),
        dmpq=draw(_section(P.DMPQ, layers=st.dictionaries(st.text(min_size=1, max_size=30), _layer(), max_size=4))),
        tdc=draw(_section(P.TDC, blocks=_strategy(tdc_blocks, maximum=blocks - 1))),
        measured=draw(_section(P.Measured)),
        provenance=draw(_section(P.Provenance)),
        attention=draw(st.none() | _attention(blocks)),
    )


@settings(FUZZ_SETTINGS, max_examples=150)
@given(valid_policies())
def test_valid_policies_round_trip(tmp_path_factory, policy):
    assert P.loads(P.to_json(policy)) == policy
    assert P.load(policy.to_dict()) == policy
    path = P.save(policy, tmp_path_factory.mktemp("rt") / "p.json")
    assert P.load(path) == policy == P.load(str(path))
