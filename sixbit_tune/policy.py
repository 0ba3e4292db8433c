"""The precision/cache policy: typed dataclasses, versioned JSON, strict validation, JSON Schema.

A policy is what the search exports and the runtime loads (schema version 2)::

    {"schema_version": 2,
     "model":  {"class": "WanTransformer3DModel", "family": "wan", "config_hash": "…", "blocks": 8},
     "target": {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
                "menu": {"fp8/fp8": {"implementation": "scaled-mm-fp8", "tflops": 1166.0}}},
     "dmpq":   {"threshold": 0.12, "first_step": "robust", "nvfp4_weight_encoder": "standard",
                "layers": {"blocks.0.attn1.to_q": {"weight": "nvfp4", "fast": "nvfp4", "robust": "int8",
                                                   "mode": "dynamic", "in_features": 256, "out_features": 256,
                                                   "predictor": {"cond": [0.8, 0.01, 0.93, 96],
                                                                 "uncond": [0.5, 0.02, 0.9, 96]},
                                                   "encoder": null}}},
     "attention": {"threshold": 0.05, "format": "int8",
                   "blocks": {"0": {"mode": "dynamic", "predictor": {"pooled": [0.3, 0.01, 0.8, 96]}}}},
     "tdc":    {"tolerance": 0.05, "warmup": 3, "cooldown": 2, "max_skips": 2, "cache_dtype": "bfloat16",
                "extrapolate": 0, "refresh_robust": 0, "blocks": null},
     "measured": {...}, "provenance": {...}}

A layer stores its weight once (``weight``: one of ``sixbit_tune.routes.WEIGHT_FORMATS``) and has a fast and a
robust activation route over it (``fast``, ``robust``: routes ``sixbit_tune.routes.ROUTES`` lists); ``mode``
``"dynamic"`` lets its predictor choose per step, ``"fast"``/``"robust"`` always take that route. A predictor is a
map from guidance branch (``"cond"``, ``"uncond"``) or ``"pooled"`` to a line ``[alpha, beta, r2, n]``
(``r2`` and ``n`` may be null). ``attention`` is optional: absent or null means the model's own (bf16) attention in
every block. Version-1 policies load through :data:`MIGRATIONS` (``"dynamic"`` -> NVFP4 weight, fast NVFP4,
robust INT8; ``"nvfp4"`` -> NVFP4 weight on its fast route; ``"int8"`` -> INT8 weight; ``"none"`` -> unquantized);
:func:`save` writes version 2.

Every class below validates itself on construction, so a ``Policy`` built in Python is as checked as one loaded
from a file. Every failure is a :class:`~sixbit_tune.errors.PolicyError` whose ``key`` is the JSON path of the
offending value (``"tdc.tolerance"``, ``"dmpq.layers.blocks.0.attn1.to_q.mode"``) and whose ``str()`` is one line.
Nothing else escapes :func:`load`, :func:`loads` or :meth:`Policy.from_dict`, whatever the input: bad encodings,
bad JSON, deep nesting, huge numbers, non-string keys, missing or unreadable files.

Limits (each a module constant, each published in ``policies/schema.json`` where JSON Schema can say it):

* a policy file or text is at most ``MAX_POLICY_BYTES`` (4 MiB), checked before parsing;
* ``tdc.warmup``, ``tdc.cooldown`` and ``tdc.max_skips`` are at most ``MAX_STEPS`` (10,000 denoising steps);
* ``model.blocks`` is at most ``MAX_BLOCKS`` (10,000); ``in_features``/``out_features`` at most ``MAX_FEATURES``;
  counts of bytes, pairs and trials at most ``MAX_COUNT`` (2**63 - 1, a signed 64-bit integer); a predictor holds at
  most ``MAX_BRANCHES`` lines;
* strings are non-empty; ``target.compute_capability`` is ``"<major>.<minor>"``; ``model.config_hash`` is a sha256
  hex digest; ``tdc.blocks`` holds no index twice.

Numbers must be finite, with one exception: ``dmpq.threshold`` and ``attention.threshold`` may be ±infinity, written
in JSON as the strings ``"inf"`` and ``"-inf"`` because JSON has no infinity. The JSON literals ``NaN``,
``Infinity`` and numbers beyond the float range (``1e400``) are rejected, naming their key.

The field tables (``_FIELDS``) are the single source for parsing, serialisation and :func:`json_schema`; the
committed ``policies/schema.json`` is generated from them (``python -m sixbit_tune.policy --schema``) and a test
fails when it is stale. Each field kind is checked by one function (``_KIND_CHECKS``) and described in the schema
by one branch of :func:`_schema_of`.

This module imports the standard library only (and ``sixbit_tune.routes``, which does too): the runtime loads
policies in serving processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import re
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from sixbit_tune import __version__
from sixbit_tune import routes as _routes
from sixbit_tune.errors import PolicyError

SCHEMA_VERSION = 2
WEIGHT_FORMATS = _routes.WEIGHT_FORMATS
ACTIVATION_FORMATS = _routes.ACTIVATION_FORMATS
LAYER_MODES = _routes.LAYER_MODES
ROUTE_ROLES = _routes.ROUTE_ROLES
ATTENTION_FORMATS = _routes.ATTENTION_FORMATS
ATTENTION_MODES = _routes.ATTENTION_MODES
# The version-1 vocabulary, read by the migration (and by callers still speaking version 1).
V1_LAYER_MODES = _routes.V1_LAYER_MODES
FORMATS = _routes.V1_FORMATS
NVFP4_PATHS = ("emulated", "native", "reference")
# A version-1 target.nvfp4_path and the sixbit_tune.kernels path of the NVFP4 W4A4 route it names.
NVFP4_PATH_IMPLEMENTATIONS = {"emulated": "triton-nvfp4-emulated", "native": "native-nvfp4", "reference": "reference"}
# How NVFP4 weights are encoded when the policy is applied; the same names as
# sixbit_tune.formats.nvfp4.WEIGHT_ENCODERS (this module imports no torch; a test keeps the two equal).
NVFP4_WEIGHT_ENCODERS = ("standard", "scale-search", "gptq")
CACHE_DTYPES = ("bfloat16", "float16", "float32", "float8_e4m3fn")
CFG_ROWS = ("joint", "per_row")

# Limits. A real policy is tens of kilobytes (one entry of ~150 bytes per linear layer inside the blocks), so 4 MiB
# leaves room for models with ~25,000 such layers while the largest accepted input loads in about a second.
MAX_POLICY_BYTES = 4 * 1024 * 1024
MAX_STEPS = 10_000  # denoising steps a run can have, as far as the TDC step windows are concerned
MAX_BLOCKS = 10_000  # transformer blocks in a model
MAX_FEATURES = 1 << 20  # in_features / out_features of one linear layer
MAX_COUNT = 2**63 - 1  # bytes, fitted pairs, trial numbers: what a signed 64-bit store column holds
MAX_BRANCHES = 16  # predictor lines of one layer or block (guidance branches, plus "pooled")
_MAX_INT_DIGITS = 309  # an integer literal with more digits is beyond every limit above and the float range

# Migrations of older schema versions: MIGRATIONS[v] turns a version-v dict into a version-(v+1) dict. Filled below
# the classes (MIGRATIONS[1]: version 1 -> 2).
MIGRATIONS: dict[int, Callable[[dict], dict]] = {}


# --------------------------------------------------------------------------------------------------------------
# Field tables: one declarative description per class drives parsing, checking, serialising and the JSON Schema.


@dataclass(frozen=True)
class _Field:
    key: str  # JSON key
    kind: str  # "str" | "int" | "float" | "enum" | "list[str]" | "list[int]" | "obj" | "map" | "lines"
    attr: str | None = None  # Python attribute, when it differs from the key ("class" -> "cls")
    required: bool = True
    nullable: bool = False
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    allow_inf: bool = False
    pattern: str | None = None  # "str": a regular expression the whole string must match (also valid in JSON Schema)
    unique: bool = False  # lists: no item twice
    cls: str | None = None  # class name for "obj" and "map" values
    doc: str = ""

    @property
    def name(self) -> str:
        return self.attr or self.key


# --------------------------------------------------------------------------------------------------------------
# Error messages: one line, bounded length, whatever the offending value is.


def _one_line(text: str, limit: int = 300) -> str:
    """``text`` with control and other unprintable characters escaped, cut to ``limit`` characters."""
    if len(text) > limit:
        text = text[:limit] + "…"
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)


def _show(value: Any) -> str:
    """A short description of any value, safe for huge integers, long strings and deeply nested containers."""
    if isinstance(value, _BadNumber):
        return f"the literal {_one_line(value.text, 40)}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if value.bit_length() > 128:
            return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, str):
        shown = repr(value[:60]) + (f"… ({len(value)} characters)" if len(value) > 60 else "")
        return f"the string {shown}"
    if isinstance(value, Mapping):
        return f"an object of {len(value)} keys"
    if isinstance(value, list | tuple):
        return f"a list of {len(value)} items"
    return f"a {type(value).__name__}"


def _fail(key: str | None, message: str) -> PolicyError:
    return PolicyError(_one_line(message, 600), key=None if key is None else _one_line(key, 200))


def _with_context(err: PolicyError, context: str) -> PolicyError:
    """``err`` with ``context`` (a file name) in front of its message; the key is kept."""
    out = PolicyError(f"{_one_line(context, 200)}: {err}")
    out.key = err.key
    return out


class _BadNumber:
    """A JSON number no finite float can hold (``NaN``, ``Infinity``, ``1e400``, an integer of hundreds of digits).

    The JSON reader keeps it as text instead of failing at once, so that the check of the key it stands at can name
    the key; no field accepts it.
    """

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def message(self, f: _Field) -> str:
        if self.text in ("NaN", "Infinity", "-Infinity"):
            msg = f"JSON literal {self.text} is not allowed (numbers must be finite)"
        else:
            msg = f"the number {_one_line(self.text, 40)} is out of range (numbers must be finite, |x| < 1.8e308)"
        if f.allow_inf:
            msg += '; write the string "inf" or "-inf" for an infinite value'
        return msg


# --------------------------------------------------------------------------------------------------------------
# One check per field kind.


def _check_value(f: _Field, value: Any, key: str) -> Any:
    """Check (and normalise) one value against its field description; return the Python value."""
    if isinstance(value, _BadNumber):
        raise _fail(key, value.message(f))
    if value is None:
        if f.nullable:
            return None
        raise _fail(key, "must not be null")
    return _KIND_CHECKS[f.kind](f, value, key)


def _check_str(f: _Field, value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise _fail(key, f"expected a string, got {_show(value)}")
    if not value:
        raise _fail(key, "must not be an empty string" + (" (use null)" if f.nullable else ""))
    if f.pattern is not None and not re.fullmatch(f.pattern, value):
        raise _fail(key, f"must match {f.pattern}" + (f" ({f.doc})" if f.doc else "") + f", got {_show(value)}")
    return value


def _check_enum(f: _Field, value: Any, key: str) -> str:
    if not isinstance(value, str) or value not in f.choices:
        raise _fail(key, f"must be one of {list(f.choices)}, got {_show(value)}")
    return value


def _check_int(f: _Field, value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(key, f"expected an integer, got {_show(value)}")
    _check_range(f, value, key)
    return value


def _check_float(f: _Field, value: Any, key: str) -> float:
    if f.allow_inf and isinstance(value, str) and value in ("inf", "-inf"):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(key, f"expected a number, got {_show(value)}")
    try:
        value = float(value)
    except OverflowError:
        raise _fail(key, f"{_show(value)} is out of range (numbers must be finite, |x| < 1.8e308)") from None
    if math.isnan(value):
        raise _fail(key, "must not be NaN")
    if math.isinf(value) and not f.allow_inf:
        raise _fail(key, "must be finite")
    _check_range(f, value, key)
    return value


def _check_list(f: _Field, value: Any, key: str) -> list:
    if not isinstance(value, list | tuple):
        raise _fail(key, f"expected a list, got {_show(value)}")
    if f.unique and f.minimum is not None and f.maximum is not None and len(value) > f.maximum - f.minimum + 1:
        raise _fail(key, f"{_show(value)}, more than the {f.maximum - f.minimum + 1:g} distinct values allowed")
    item = dataclasses.replace(f, kind=f.kind[5:-1], nullable=False, unique=False)
    out = [_check_value(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if f.unique:
        seen: set = set()
        twice = sorted({v for v in out if v in seen or seen.add(v)})
        if twice:
            raise _fail(key, f"each entry may appear once; repeated: {twice[:10]}")
    return out


def _check_obj(f: _Field, value: Any, key: str) -> Any:
    cls = _CLASSES[f.cls]
    if isinstance(value, cls):
        return value
    return _parse(cls, value, key)


def _check_map(f: _Field, value: Any, key: str) -> dict:
    if not isinstance(value, Mapping):
        raise _fail(key, f"expected an object, got {_show(value)}")
    cls = _CLASSES[f.cls]
    out = {}
    for name, v in value.items():
        if not isinstance(name, str) or not name:
            raise _fail(key, f"keys must be non-empty strings, got {_show(name)}")
        out[name] = v if isinstance(v, cls) else _parse(cls, v, f"{key}.{name}")
    return out


class Line(NamedTuple):
    """One fitted predictor line: predicted error = ``alpha * gamma_prev + beta``; its R² and number of pairs."""

    alpha: float
    beta: float
    r2: float | None = None
    n: int | None = None

    def predict(self, gamma_prev: float) -> float:
        return self.alpha * gamma_prev + self.beta


def decision_line(predictor: Mapping[str, Line] | None) -> Line | None:
    """One line for a decision shared by every guidance branch: the pooled line if there is one, else the upper
    envelope of the branch lines (largest alpha, largest beta), which predicts at least what each branch line
    predicts for every Γ >= 0; so when it is under the threshold, every branch's line is too. None without lines."""
    if not predictor:
        return None
    if "pooled" in predictor:
        return predictor["pooled"]
    lines = list(predictor.values())
    if len(lines) == 1:
        return lines[0]
    return Line(max(ln.alpha for ln in lines), max(ln.beta for ln in lines), None,
                min((ln.n for ln in lines if ln.n is not None), default=None))


# The items of a line, in order: checked like fields of their own (a line is written as a 4-item JSON list).
_LINE_ITEMS = (
    _Field("alpha", "float", doc="slope"),
    _Field("beta", "float", doc="intercept"),
    _Field("r2", "float", nullable=True, maximum=1.0 + 1e-9, doc="fit R^2"),
    _Field("n", "int", nullable=True, minimum=0, maximum=MAX_COUNT, doc="number of fitted pairs"),
)


def _check_line(value: Any, key: str) -> Line:
    if isinstance(value, _BadNumber) or not isinstance(value, list | tuple):
        raise _fail(key, f"expected a predictor line [alpha, beta, r2, n], got {_show(value)}")
    if len(value) != len(_LINE_ITEMS):
        raise _fail(key, f"a predictor line is [alpha, beta, r2, n] (r2 and n may be null), got {_show(value)}")
    return Line(*(_check_value(f, v, f"{key}[{i}]") for i, (f, v) in enumerate(zip(_LINE_ITEMS, value))))


def _check_lines(f: _Field, value: Any, key: str) -> dict[str, Line]:
    if not isinstance(value, Mapping):
        raise _fail(key, f"expected an object of predictor lines (branch -> [alpha, beta, r2, n]), got {_show(value)}")
    if not value:
        raise _fail(key, 'needs at least one line ("pooled", or one per guidance branch); use null for none')
    if len(value) > MAX_BRANCHES:
        raise _fail(key, f"{_show(value)}, more than the {MAX_BRANCHES} predictor lines allowed")
    out = {}
    for name, v in value.items():
        if not isinstance(name, str) or not name:
            raise _fail(key, f"keys must be non-empty strings, got {_show(name)}")
        out[name] = _check_line(v, f"{key}.{name}")
    return out


_KIND_CHECKS: dict[str, Callable[[_Field, Any, str], Any]] = {
    "lines": _check_lines,
    "str": _check_str,
    "enum": _check_enum,
    "int": _check_int,
    "float": _check_float,
    "list[str]": _check_list,
    "list[int]": _check_list,
    "obj": _check_obj,
    "map": _check_map,
}


def _check_range(f: _Field, value: float, key: str) -> None:
    if f.minimum is not None and value < f.minimum:
        raise _fail(key, f"must be >= {f.minimum:g}, got {_show(value)}")
    if f.maximum is not None and value > f.maximum:
        raise _fail(key, f"must be <= {f.maximum:g}, got {_show(value)}")


def _parse(cls: type, data: Any, prefix: str) -> Any:
    """Build ``cls`` from a JSON-like mapping, rejecting unknown and missing keys."""
    where = prefix or "policy"
    if not isinstance(data, Mapping):
        raise _fail(where, f"expected an object, got {_show(data)}")
    fields = cls._FIELDS
    known = {f.key for f in fields}
    for k in data:
        if not isinstance(k, str):
            raise _fail(where, f"keys must be strings, got {_show(k)}")
        if k not in known:
            raise _fail(_join(prefix, k), f"unknown key (allowed here: {sorted(known)})")
    kwargs = {}
    for f in fields:
        key = _join(prefix, f.key)
        if f.key not in data:
            if f.required:
                raise _fail(key, "missing required key")
            continue
        kwargs[f.name] = _check_value(f, data[f.key], key)
    obj = cls.__new__(cls)
    _init(obj, cls, kwargs, prefix)
    return obj


def _init(obj: Any, cls: type, kwargs: dict, prefix: str) -> None:
    """Fill a frozen dataclass instance (defaults included) and run its checks with JSON-path prefixes."""
    for fld in dataclasses.fields(cls):
        if fld.name in kwargs:
            value = kwargs[fld.name]
        elif fld.default is not dataclasses.MISSING:
            value = fld.default
        elif fld.default_factory is not dataclasses.MISSING:
            value = fld.default_factory()
        else:  # pragma: no cover - the field tables mark these required
            raise _fail(_join(prefix, fld.name), "missing required key")
        object.__setattr__(obj, fld.name, value)
    obj._check(prefix)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


class _Checked:
    """Mixin: validate every field of a frozen dataclass on construction, by its ``_FIELDS`` table."""

    _FIELDS: ClassVar[tuple[_Field, ...]] = ()

    def __post_init__(self) -> None:
        self._check("")

    def _check(self, prefix: str) -> None:
        for f in self._FIELDS:
            value = _check_value(f, getattr(self, f.name), _join(prefix, f.key))
            object.__setattr__(self, f.name, value)
        self._check_more(prefix)

    def _check_more(self, prefix: str) -> None:
        """Cross-field rules; override in subclasses."""

    # Optional fields written only when set (absent and null mean the same for them).
    _OMIT_NONE: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict:
        out = {}
        for f in self._FIELDS:
            value = getattr(self, f.name)
            if value is None and f.key in self._OMIT_NONE:
                continue
            out[f.key] = _dump(value)
        return out


def _dump(value: Any) -> Any:
    if isinstance(value, _Checked):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_dump(v) for v in value]
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


# --------------------------------------------------------------------------------------------------------------
# The policy classes.


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _set(obj: Any, **values: Any) -> None:
    for name, value in values.items():
        object.__setattr__(obj, name, value)


@dataclass(frozen=True, init=False)
class LayerPolicy(_Checked):
    """How one linear layer inside a transformer block stores its weight and runs.

    The weight is stored once, in ``weight`` (``"none"``: left in the model dtype). ``fast`` and ``robust`` are the
    activation formats of the layer's two routes over that weight (``sixbit_tune.routes.ROUTES``; absent: the
    weight's defaults, ``sixbit_tune.routes.DEFAULT_ROUTES``). ``mode`` ``"dynamic"`` takes the fast route when the
    predictor says the error stays under the threshold, else the robust one; ``"fast"`` and ``"robust"`` always take
    that route. ``predictor`` maps ``"pooled"`` or a guidance branch to a line ``[alpha, beta, r2, n]``.
    ``encoder`` overrides ``dmpq.nvfp4_weight_encoder`` for this layer (NVFP4 weights only). ``in_features`` and
    ``out_features`` let the runtime check the policy against the model it is applied to.

    In Python, the version-1 spellings still construct a layer: ``LayerPolicy("dynamic", K, N, alpha, beta, r2, n)``
    (an NVFP4 weight, fast NVFP4, robust INT8, dynamic; the line by position or as keywords),
    ``LayerPolicy("nvfp4" | "int8" | "none", K, N)``.
    """

    weight: str
    in_features: int
    out_features: int
    fast: str | None = None
    robust: str | None = None
    mode: str = "fast"
    predictor: dict[str, Line] | None = None
    encoder: str | None = None

    _FIELDS: ClassVar = (
        _Field("weight", "enum", choices=WEIGHT_FORMATS, doc="the stored weight format"),
        _Field("fast", "enum", required=False, choices=ACTIVATION_FORMATS,
               doc="activation format of the fast route (absent: the weight's default)"),
        _Field("robust", "enum", required=False, choices=ACTIVATION_FORMATS,
               doc="activation format of the robust route (absent: the weight's default)"),
        _Field("mode", "enum", required=False, choices=LAYER_MODES,
               doc="dynamic | fast | robust (absent: fast)"),
        _Field("in_features", "int", minimum=1, maximum=MAX_FEATURES),
        _Field("out_features", "int", minimum=1, maximum=MAX_FEATURES),
        _Field("predictor", "lines", required=False, nullable=True,
               doc='"pooled" or guidance branch -> [alpha, beta, r2, n] of the fast route\'s error predictor'),
        _Field("encoder", "enum", required=False, nullable=True, choices=NVFP4_WEIGHT_ENCODERS,
               doc="NVFP4 weight encoder of this layer (absent or null: dmpq.nvfp4_weight_encoder)"),
    )
    _OMIT_NONE: ClassVar = ("predictor", "encoder")

    def __init__(self, weight: str, in_features: int, out_features: int, fast: str | None = None,
                 robust: str | None = None, mode: str | None = None, predictor: Mapping | None = None,
                 encoder: str | None = None, *, alpha: float | None = None, beta: float | None = None,
                 r2: float | None = None, n: int | None = None):
        if weight in V1_LAYER_MODES and _is_number(fast):  # version 1: (mode, K, N, alpha, beta, r2, n) by position
            alpha, beta, r2, n = fast, robust, mode, predictor
            fast = robust = mode = predictor = None
        if weight == "dynamic":  # the version-1 spelling of a dynamic layer
            weight, mode = "nvfp4", "dynamic" if mode is None else mode
        if predictor is None and (alpha is not None or beta is not None):
            predictor = {"pooled": (alpha, beta, r2, n)}
        _set(self, weight=weight, in_features=in_features, out_features=out_features, fast=fast, robust=robust,
             mode="fast" if mode is None else mode, predictor=predictor, encoder=encoder)
        self._check("")

    def _check(self, prefix: str) -> None:
        if isinstance(self.weight, str) and self.weight in _routes.DEFAULT_ROUTES:
            fast, robust = _routes.DEFAULT_ROUTES[self.weight]
            _set(self, fast=fast if self.fast is None else self.fast,
                 robust=robust if self.robust is None else self.robust)
        super()._check(prefix)

    def _check_more(self, prefix: str) -> None:
        for role in ROUTE_ROLES:
            act = getattr(self, role)
            if not _routes.is_route(self.weight, act):
                raise _fail(_join(prefix, role), f"{act!r} activations do not run over a {self.weight!r} weight "
                            f"(a {self.weight} weight supports {list(_routes.ROUTES[self.weight])})")
        if self.mode == "dynamic":
            if self.weight == "none":
                raise _fail(_join(prefix, "mode"), "a layer with weight 'none' has one route and cannot be 'dynamic'")
            if self.predictor is None:
                raise _fail(_join(prefix, "predictor"), "a 'dynamic' layer needs a predictor line (finite alpha "
                            "and beta), pooled or per guidance branch")
        if self.encoder is not None and self.weight != "nvfp4":
            raise _fail(_join(prefix, "encoder"), f"only NVFP4 weights have an encoder; this weight is {self.weight!r}")
        if self.weight == "nvfp4" and self.in_features % 16:
            raise _fail(
                _join(prefix, "in_features"),
                f"NVFP4 needs K (in_features) to be a multiple of 16, got {self.in_features}",
            )

    # Routes --------------------------------------------------------------------------------------------------
    def route(self, role: str) -> _routes.Route:
        """The ``"fast"`` or ``"robust"`` route."""
        if role not in ROUTE_ROLES:
            raise ValueError(f"role must be one of {ROUTE_ROLES}, got {role!r}")
        return _routes.Route(self.weight, getattr(self, role))

    @property
    def routes(self) -> tuple[_routes.Route, ...]:
        """The routes this layer can run: both for a dynamic layer, else the one its mode names."""
        if self.mode == "dynamic":
            return (self.route("fast"), self.route("robust"))
        return (self.route(self.mode),)

    @property
    def v1_mode(self) -> str | None:
        """The version-1 mode with the same behaviour (``"dynamic"``, ``"nvfp4"``, ``"int8"``, ``"none"``), or None
        where version 1 had none (FP8, other routes)."""
        if self.weight == "none":
            return "none"
        pair = (self.weight, self.fast, self.robust)
        if self.mode == "dynamic":
            return "dynamic" if pair == ("nvfp4", "nvfp4", "int8") else None
        route = self.route(self.mode)
        if route == ("nvfp4", "nvfp4"):
            return "nvfp4"
        return "int8" if route == ("int8", "int8") else None

    # Predictor -----------------------------------------------------------------------------------------------
    def line(self, branch: str | None = None) -> Line | None:
        """The predictor line of ``branch`` (its own line, else the pooled one); with ``branch`` None,
        :attr:`decision_line`."""
        if self.predictor is None:
            return None
        if branch is None:
            return self.decision_line
        return self.predictor.get(branch, self.predictor.get("pooled"))

    @property
    def decision_line(self) -> Line | None:
        """One line for a decision shared by every guidance branch: the pooled line if there is one, else the upper
        envelope of the branch lines (largest alpha, largest beta), which predicts at least what each branch line
        predicts for every Γ >= 0; so when it is under the threshold, every branch's line is too."""
        return decision_line(self.predictor)

    @property
    def alpha(self) -> float | None:
        line = self.decision_line
        return None if line is None else line.alpha

    @property
    def beta(self) -> float | None:
        line = self.decision_line
        return None if line is None else line.beta

    @property
    def r2(self) -> float | None:
        line = self.decision_line
        return None if line is None else line.r2

    @property
    def n(self) -> int | None:
        line = self.decision_line
        return None if line is None else line.n

    def predict(self, gamma_prev: float, branch: str | None = None) -> float:
        """Predicted fast-route output error at a step whose block had ``gamma_prev`` at the previous step."""
        line = self.line(branch)
        if line is None:
            raise ValueError(f"this {self.weight} layer (mode {self.mode!r}) has no predictor")
        return line.predict(gamma_prev)


@dataclass(frozen=True)
class ModelInfo(_Checked):
    """Which model the policy was made for: the runtime refuses a policy applied to another one."""

    cls: str
    family: str
    config_hash: str
    blocks: int
    spec: str | None = None

    _FIELDS: ClassVar = (
        _Field("class", "str", attr="cls", doc="transformer class name, e.g. WanTransformer3DModel"),
        _Field("family", "str"),
        _Field("config_hash", "str", pattern="^[0-9a-f]{64}$", doc="sha256 hex of the class name and the model config"),
        _Field("blocks", "int", minimum=1, maximum=MAX_BLOCKS),
        _Field("spec", "str", required=False, nullable=True, doc="model spec the policy was searched on"),
    )


@dataclass(frozen=True)
class MenuEntry(_Checked):
    """One route of the target GPU's menu: how it runs there and how fast it was measured (null: not measured)."""

    implementation: str
    tflops: float | None = None
    speedup: float | None = None

    _FIELDS: ClassVar = (
        _Field("implementation", "str", doc="the execution path (sixbit_tune.kernels.kernel_path names)"),
        _Field("tflops", "float", required=False, nullable=True, minimum=0.0,
               doc="measured throughput of the route's GEMM, TFLOP/s"),
        _Field("speedup", "float", required=False, nullable=True, minimum=0.0,
               doc="measured speed of the route's GEMM against bf16 at the same shape"),
    )
    _OMIT_NONE: ClassVar = ("tflops", "speedup")


@dataclass(frozen=True, init=False)
class Target(_Checked):
    """The GPU the policy was tuned on, and its menu: route (``"<weight>/<activation>"``) -> how it runs there.

    In Python, ``Target(gpu, capability, "emulated")`` (a version-1 ``nvfp4_path`` as the third argument) still
    constructs a target: its menu then holds the NVFP4 W4A4 route's implementation.
    """

    gpu: str | None = None
    compute_capability: str | None = None
    menu: dict[str, MenuEntry] = field(default_factory=dict)

    _FIELDS: ClassVar = (
        _Field("gpu", "str", nullable=True, doc="NVML/torch device name; null = CPU"),
        _Field("compute_capability", "str", nullable=True, pattern=r"^[0-9]+\.[0-9]+$", doc='"<major>.<minor>", e.g. "9.0"'),
        _Field("menu", "map", required=False, cls="MenuEntry",
               doc='route "<weight>/<activation>" -> its implementation and measured speed on this GPU'),
    )

    def __init__(self, gpu: str | None = None, compute_capability: str | None = None,
                 menu: Mapping | str | None = None, *, nvfp4_path: str | None = None):
        if isinstance(menu, str):  # the version-1 positional nvfp4_path
            menu, nvfp4_path = None, menu
        menu = dict(menu or {})
        if nvfp4_path is not None:
            if nvfp4_path not in NVFP4_PATH_IMPLEMENTATIONS:
                raise _fail("nvfp4_path", f"must be one of {list(NVFP4_PATHS)}, got {_show(nvfp4_path)}")
            menu.setdefault("nvfp4/nvfp4", MenuEntry(NVFP4_PATH_IMPLEMENTATIONS[nvfp4_path]))
        _set(self, gpu=gpu, compute_capability=compute_capability, menu=menu)
        self._check("")

    def _check_more(self, prefix: str) -> None:
        for key in self.menu:
            try:
                _routes.Route.parse(key)
            except ValueError as e:
                raise _fail(_join(prefix, f"menu.{key}"), str(e)) from None

    @property
    def nvfp4_path(self) -> str:
        """The version-1 name of the NVFP4 W4A4 route's implementation (``"reference"`` where the menu lacks it)."""
        entry = self.menu.get("nvfp4/nvfp4")
        names = {v: k for k, v in NVFP4_PATH_IMPLEMENTATIONS.items()}
        return names.get(entry.implementation, "reference") if entry is not None else "reference"


_FIRST_STEP_V1 = {_routes.FAST_FORMAT: "fast", _routes.ROBUST_FORMAT: "robust"}


@dataclass(frozen=True, init=False)
class DMPQ(_Checked):
    """Dynamic mixed-precision quantization: a threshold and one entry per linear layer inside the blocks.

    In Python, a version-1 ``first_step_format`` (``"nvfp4"``/``"int8"``) is accepted for ``first_step``.
    """

    threshold: float
    layers: dict[str, LayerPolicy] = field(default_factory=dict)
    first_step: str = "robust"
    nvfp4_weight_encoder: str = "standard"

    _FIELDS: ClassVar = (
        _Field("threshold", "float", allow_inf=True, doc='tau; "inf"/"-inf" allowed'),
        _Field("first_step", "enum", choices=ROUTE_ROLES, doc="route of dynamic layers at the first step"),
        _Field("nvfp4_weight_encoder", "enum", required=False, choices=NVFP4_WEIGHT_ENCODERS,
               doc="how NVFP4 weights are encoded when the policy is applied (absent: standard); the codes are "
               "valid NVFP4 for every encoder"),
        _Field("layers", "map", cls="LayerPolicy", doc="full module name -> layer policy"),
    )

    def __init__(self, threshold: float, layers: Mapping | None = None, first_step: str = "robust",
                 nvfp4_weight_encoder: str = "standard", *, first_step_format: str | None = None):
        if first_step_format is not None:
            first_step = first_step_format
        if isinstance(first_step, str) and first_step in _FIRST_STEP_V1:
            first_step = _FIRST_STEP_V1[first_step]
        _set(self, threshold=threshold, layers=dict(layers or {}), first_step=first_step,
             nvfp4_weight_encoder=nvfp4_weight_encoder)
        self._check("")

    @property
    def first_step_format(self) -> str:
        """The first-step route in the names of ``sixbit_tune.rules`` (``FAST_FORMAT`` for the fast route,
        ``ROBUST_FORMAT`` for the robust one), as the runtime's decisions name the two routes."""
        return _routes.FAST_FORMAT if self.first_step == "fast" else _routes.ROBUST_FORMAT

    def encoder_of(self, name: str) -> str:
        """The NVFP4 weight encoder of layer ``name`` (its own, else ``nvfp4_weight_encoder``)."""
        lp = self.layers[name]
        return lp.encoder or self.nvfp4_weight_encoder


_BLOCK_KEY = r"^(0|[1-9][0-9]{0,8})$"


@dataclass(frozen=True)
class AttentionBlock(_Checked):
    """How one block's attention runs: ``"8bit"``, ``"bf16"`` (the model's own), or ``"dynamic"`` (8-bit when its
    predictor's error stays under ``attention.threshold``)."""

    mode: str = "bf16"
    predictor: dict[str, Line] | None = None

    _FIELDS: ClassVar = (
        _Field("mode", "enum", choices=ATTENTION_MODES, doc="dynamic | 8bit | bf16"),
        _Field("predictor", "lines", required=False, nullable=True,
               doc='"pooled" or guidance branch -> [alpha, beta, r2, n] of the 8-bit attention error predictor'),
    )

    def _check_more(self, prefix: str) -> None:
        if self.mode == "dynamic" and self.predictor is None:
            raise _fail(_join(prefix, "predictor"), "a 'dynamic' attention block needs a predictor line")


@dataclass(frozen=True)
class Attention(_Checked):
    """Attention precision per block. A block absent from ``blocks`` runs the model's own (bf16) attention."""

    threshold: float = 0.0
    format: str = "int8"
    blocks: dict[str, AttentionBlock] = field(default_factory=dict)

    _FIELDS: ClassVar = (
        _Field("threshold", "float", allow_inf=True, doc='tau of the attention rule; "inf"/"-inf" allowed'),
        _Field("format", "enum", choices=ATTENTION_FORMATS, doc="format of the 8-bit attention's Q and K"),
        _Field("blocks", "map", cls="AttentionBlock", doc='block index ("0", "1", ...) -> its attention'),
    )

    def _check_more(self, prefix: str) -> None:
        for key in self.blocks:
            if not re.fullmatch(_BLOCK_KEY, key):
                raise _fail(_join(prefix, f"blocks.{key}"), "attention block keys are block indices: \"0\", \"1\", …")

    def mode_of(self, index: int) -> str:
        """The attention mode of block ``index`` (``"bf16"`` where the policy does not name it)."""
        block = self.blocks.get(str(index))
        return "bf16" if block is None else block.mode

    @property
    def quantized(self) -> bool:
        """Whether any block may run 8-bit attention."""
        return any(b.mode != "bf16" for b in self.blocks.values())


@dataclass(frozen=True)
class TDC(_Checked):
    """Temporal Delta Cache knobs: when a block may reuse its cached update instead of running.

    ``tolerance == 0`` never skips; ``blocks=None`` lets every block cache. The step windows and the skip run are
    counted in denoising steps, so they are at most ``MAX_STEPS``. ``cache_dtype`` is how each cached Δ is stored
    (``"float8_e4m3fn"``: FP8 E4M3 with one float32 scale per token). ``extrapolate`` 1: a skipped block returns
    X + the first-order extrapolation of its last two Δs instead of X + the last Δ. ``refresh_robust`` 1: a block's
    first full computation after a skip runs its dynamic layers on the robust route. Both are 0 when absent.
    ``cfg_rows`` ``"per_row"``: each batch row (guidance branch, prompt) decides its own skips; ``"joint"`` (when
    absent): a block is skipped only where every row may skip.
    """

    tolerance: float = 0.0
    warmup: int = 3
    cooldown: int = 2
    max_skips: int = 2
    cache_dtype: str = "bfloat16"
    extrapolate: int = 0
    refresh_robust: int = 0
    blocks: list[int] | None = None
    cfg_rows: str = "joint"

    _FIELDS: ClassVar = (
        _Field("tolerance", "float", minimum=0.0, doc="delta: max accumulated relative change of a block's update"),
        _Field("warmup", "int", minimum=0, maximum=MAX_STEPS, doc="no skips in the first steps"),
        _Field("cooldown", "int", minimum=0, maximum=MAX_STEPS, doc="no skips in the last steps"),
        _Field("max_skips", "int", minimum=0, maximum=MAX_STEPS, doc="max consecutive skips of one block"),
        _Field("cache_dtype", "enum", choices=CACHE_DTYPES,
               doc="storage of each cached delta; float8_e4m3fn keeps one float32 scale per token"),
        _Field("extrapolate", "int", required=False, minimum=0, maximum=1,
               doc="1: a skipped block returns X + last + (last - prev) * k / gap (first-order extrapolation of its "
               "last two deltas, k = steps since the last computation, gap = steps between the two); absent: 0"),
        _Field("refresh_robust", "int", required=False, minimum=0, maximum=1,
               doc="1: the first full computation of a block after a skip runs its dynamic layers on the robust "
               "route; absent: 0"),
        _Field("blocks", "list[int]", nullable=True, minimum=0, maximum=MAX_BLOCKS - 1, unique=True,
               doc="block indices allowed to cache, each once; null = all"),
        _Field("cfg_rows", "enum", required=False, choices=CFG_ROWS,
               doc="how a call of several batch rows (guidance branches, prompts) decides a block: joint = skipped "
               "only if every row may skip; per_row = each row decides (absent: joint)"),
    )


_SHARE = {"minimum": 0.0, "maximum": 1.0}


@dataclass(frozen=True)
class Measured(_Checked):
    """Figures measured for this policy when it was chosen (null where not measured)."""

    latency_ms: float | None = None
    speedup: float | None = None
    peak_memory_bytes: int | None = None
    weight_bytes: int | None = None
    cache_bytes: int | None = None
    psnr_db: float | None = None
    ssim: float | None = None
    nvfp4_share: float | None = None
    skip_share: float | None = None

    _FIELDS: ClassVar = (
        _Field("latency_ms", "float", required=False, nullable=True, minimum=0.0),
        _Field("speedup", "float", required=False, nullable=True, minimum=0.0),
        _Field("peak_memory_bytes", "int", required=False, nullable=True, minimum=0, maximum=MAX_COUNT),
        _Field("weight_bytes", "int", required=False, nullable=True, minimum=0, maximum=MAX_COUNT),
        _Field("cache_bytes", "int", required=False, nullable=True, minimum=0, maximum=MAX_COUNT),
        _Field("psnr_db", "float", required=False, nullable=True),
        _Field("ssim", "float", required=False, nullable=True, minimum=-1.0, maximum=1.0),
        _Field("nvfp4_share", "float", required=False, nullable=True, **_SHARE),
        _Field("skip_share", "float", required=False, nullable=True, **_SHARE),
    )


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Provenance(_Checked):
    """Where the policy came from."""

    study: str | None = None
    trial: int | None = None
    profile_runs: list[str] = field(default_factory=list)
    created: str = field(default_factory=_now)
    tool_version: str = __version__

    _FIELDS: ClassVar = (
        _Field("study", "str", required=False, nullable=True),
        _Field("trial", "int", required=False, nullable=True, minimum=0, maximum=MAX_COUNT),
        _Field("profile_runs", "list[str]", required=False),
        _Field("created", "str", required=False, doc="ISO 8601 time of export"),
        _Field("tool_version", "str", required=False),
    )


@dataclass(frozen=True)
class Policy(_Checked):
    """A complete, deployable policy. See the module docstring for the JSON layout.

    ``attention`` None (absent in the JSON) means the model's own attention in every block.
    """

    model: ModelInfo
    target: Target
    dmpq: DMPQ
    tdc: TDC = field(default_factory=TDC)
    measured: Measured = field(default_factory=Measured)
    provenance: Provenance = field(default_factory=Provenance)
    schema_version: int = SCHEMA_VERSION
    attention: Attention | None = None

    _FIELDS: ClassVar = (
        _Field("schema_version", "int", minimum=1),
        _Field("model", "obj", cls="ModelInfo"),
        _Field("target", "obj", cls="Target"),
        _Field("dmpq", "obj", cls="DMPQ"),
        _Field("attention", "obj", cls="Attention", required=False, nullable=True,
               doc="attention precision per block; absent or null: the model's own attention everywhere"),
        _Field("tdc", "obj", cls="TDC"),
        _Field("measured", "obj", cls="Measured", required=False),
        _Field("provenance", "obj", cls="Provenance", required=False),
    )
    _OMIT_NONE: ClassVar = ("attention",)

    def _check_more(self, prefix: str) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise _fail(
                _join(prefix, "schema_version"),
                f"a Policy object must be of schema version {SCHEMA_VERSION} (load older files with load())",
            )
        if self.tdc.blocks is not None:
            bad = [b for b in self.tdc.blocks if b >= self.model.blocks]
            if bad:
                raise _fail(
                    _join(prefix, "tdc.blocks"),
                    f"block indices {bad} out of range for a model of {self.model.blocks} blocks",
                )
        if self.attention is not None:
            bad_keys = sorted((k for k in self.attention.blocks if int(k) >= self.model.blocks), key=int)
            if bad_keys:
                raise _fail(
                    _join(prefix, f"attention.blocks.{bad_keys[0]}"),
                    f"block index {bad_keys[0]} out of range for a model of {self.model.blocks} blocks",
                )

    @classmethod
    def from_dict(cls, data: Mapping) -> Policy:
        """Validate and build a policy from a JSON-like dict, migrating older schema versions."""
        return _parse(Policy, _migrate(data), "")

    def replace(self, **changes: Any) -> Policy:
        """A copy with some top-level fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


_CLASSES: dict[str, type] = {
    c.__name__: c
    for c in (LayerPolicy, ModelInfo, MenuEntry, Target, DMPQ, AttentionBlock, Attention, TDC, Measured, Provenance,
              Policy)
}


# --------------------------------------------------------------------------------------------------------------
# Version 1 -> 2. Only what version 1 spelled differently is rewritten; everything else is passed on unchanged for
# the version-2 checks to name. The values the rewrite reads are checked here, under their version-1 keys.

_V1_LINE = tuple(dataclasses.replace(f, nullable=True) for f in _LINE_ITEMS)
_V1_LAYERS = {  # v1 mode -> weight, fast, robust, mode
    "dynamic": ("nvfp4", "nvfp4", "int8", "dynamic"),
    "nvfp4": ("nvfp4", "nvfp4", "int8", "fast"),
    "int8": ("int8", "int8", "int8", "fast"),
    "none": ("none", "none", "none", "fast"),
}
_V1_MODE = _Field("mode", "enum", choices=V1_LAYER_MODES)
_V1_FIRST_STEP = _Field("first_step_format", "enum", choices=FORMATS)
_V1_NVFP4_PATH = _Field("nvfp4_path", "enum", choices=NVFP4_PATHS)


def _v1_layer(data: Any, key: str) -> Any:
    if not isinstance(data, Mapping):
        return data
    out = {k: v for k, v in data.items() if k not in ("mode", "alpha", "beta", "r2", "n")}
    if "mode" not in data:
        raise _fail(_join(key, "mode"), "missing required key")
    mode = _check_value(_V1_MODE, data["mode"], _join(key, "mode"))
    line = [_check_value(f, data.get(f.key), _join(key, f.key)) for f in _V1_LINE]
    out["weight"], out["fast"], out["robust"], out["mode"] = _V1_LAYERS[mode]
    if line[0] is not None and line[1] is not None:
        out["predictor"] = {"pooled": line}
    elif mode == "dynamic":
        missing = "alpha" if line[0] is None else "beta"
        raise _fail(_join(key, missing), "a 'dynamic' layer needs a finite predictor alpha and beta")
    return out


def _v1_to_v2(data: dict) -> dict:
    """A version-1 policy dict as version 2 (see the module docstring for the mapping of layer modes)."""
    out = dict(data)
    out["schema_version"] = 2
    target = data.get("target")
    if isinstance(target, Mapping) and "nvfp4_path" in target:
        t = {k: v for k, v in target.items() if k != "nvfp4_path"}
        path = _check_value(_V1_NVFP4_PATH, target["nvfp4_path"], "target.nvfp4_path")
        t["menu"] = {"nvfp4/nvfp4": {"implementation": NVFP4_PATH_IMPLEMENTATIONS[path]}}
        out["target"] = t
    dmpq = data.get("dmpq")
    if isinstance(dmpq, Mapping):
        d = {k: v for k, v in dmpq.items() if k != "first_step_format"}
        if "first_step_format" in dmpq:
            first = _check_value(_V1_FIRST_STEP, dmpq["first_step_format"], "dmpq.first_step_format")
            d["first_step"] = _FIRST_STEP_V1[first]
        layers = dmpq.get("layers")
        if isinstance(layers, Mapping):
            d["layers"] = {
                name: _v1_layer(v, f"dmpq.layers.{name}") if isinstance(name, str) and name else v
                for name, v in layers.items()
            }
        out["dmpq"] = d
    return out


MIGRATIONS[1] = _v1_to_v2


# --------------------------------------------------------------------------------------------------------------
# Versions, files.


_VERSION = _Field("schema_version", "int")  # any integer here; older ones are migrated, newer ones refused


def _migrate(data: Any) -> dict:
    if not isinstance(data, Mapping):
        raise _fail("policy", f"expected a JSON object, got {_show(data)}")
    if "schema_version" not in data:
        raise _fail("schema_version", "missing required key")
    version = _check_value(_VERSION, data["schema_version"], "schema_version")
    if version > SCHEMA_VERSION:
        raise _fail(
            "schema_version",
            f"this policy has schema version {version}, newer than this sixbit-tune ({__version__}) reads "
            f"(<= {SCHEMA_VERSION}); upgrade sixbit-tune to load it",
        )
    data = dict(data)
    while data["schema_version"] < SCHEMA_VERSION:
        v = data["schema_version"]
        if v not in MIGRATIONS:
            raise _fail("schema_version", f"no migration from schema version {v} to {SCHEMA_VERSION}")
        data = MIGRATIONS[v](data)
    return data


# Reading JSON. The hooks keep numbers no float can hold as _BadNumber, so that the check of their key rejects them
# by name; an integer of more than _MAX_INT_DIGITS digits is never converted (Python refuses, or takes quadratic
# time, on very long ones).


def _read_int(text: str) -> int | _BadNumber:
    return _BadNumber(text) if len(text) > _MAX_INT_DIGITS + 1 else int(text)


def _read_float(text: str) -> float | _BadNumber:
    value = float(text)
    return value if math.isfinite(value) else _BadNumber(text)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _fail(k, "duplicate key in policy JSON")
        out[k] = v
    return out


def _check_size(size: int, unit: str, what: str) -> None:
    if size > MAX_POLICY_BYTES:
        raise _fail(
            None,
            f"{what} is {size:,} {unit}, more than the limit on a policy ({MAX_POLICY_BYTES:,} bytes, "
            f"MAX_POLICY_BYTES); a real policy is tens of kilobytes",
        )


def _decode(raw: bytes) -> str:
    """UTF-8 text of a policy file (a leading byte-order mark is dropped); anything else is a PolicyError."""
    encoding = json.detect_encoding(raw)
    if encoding not in ("utf-8", "utf-8-sig"):
        raise _fail(None, f"the policy is {encoding.upper()} text; a policy file must be UTF-8 (re-save it as UTF-8)")
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise _fail(
            None, f"not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} is invalid (re-save it as UTF-8)"
        ) from None


def _parse_json(text: str) -> Any:
    try:
        return json.loads(
            text,
            parse_int=_read_int,
            parse_float=_read_float,
            parse_constant=_BadNumber,
            object_pairs_hook=_no_duplicates,
        )
    except json.JSONDecodeError as e:
        raise _fail(None, f"not valid JSON: {e}") from None
    except RecursionError:
        raise _fail(None, "not a policy: JSON nested too deeply (a policy is 4 objects deep)") from None


def loads(text: str | bytes) -> Policy:
    """Parse a policy from JSON text or UTF-8 bytes (rejecting NaN/Infinity literals, out-of-range numbers and
    duplicate keys); at most ``MAX_POLICY_BYTES``, checked before parsing.

    Raises:
        PolicyError: anything wrong with the text; nothing else.
    """
    if isinstance(text, bytes | bytearray):
        _check_size(len(text), "bytes", "the policy")
        text = _decode(bytes(text))
    elif not isinstance(text, str):
        raise _fail("policy", f"expected JSON text, got {_show(text)}")
    _check_size(len(text), "characters", "the policy text")
    return Policy.from_dict(_parse_json(text.removeprefix("\ufeff")))


def _read_file(path: Path, text: str | None) -> Policy:
    """Load a policy file; ``text`` is the string the path came from, if any (it may be JSON that is not an object)."""
    shown = _one_line(str(path), 200)
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        if text is not None:
            try:
                data = _parse_json(text.lstrip("\ufeff"))
            except PolicyError:
                pass
            else:  # JSON, but not an object: "null", "5", '"x"', ...
                raise _fail("policy", f"expected a JSON object or the path of a policy file, got {_show(data)}")
        raise _fail(None, f"policy file not found: {shown}") from None
    except (OSError, ValueError) as e:  # name too long, embedded NUL byte, permission denied on a parent, ...
        raise _fail(None, f"cannot read policy file {shown}: {getattr(e, 'strerror', None) or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise _fail(None, f"{shown} is a directory, not a policy file")
    if stat.S_ISREG(st.st_mode):
        _check_size(st.st_size, "bytes", shown)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_POLICY_BYTES + 1)  # bounded even where the size is unknown (pipes, devices)
    except OSError as e:
        raise _fail(None, f"cannot read policy file {shown}: {e.strerror or e}") from None
    if len(raw) > MAX_POLICY_BYTES:
        _check_size(len(raw), "bytes or more", shown)
    try:
        return loads(raw)
    except PolicyError as e:
        raise _with_context(e, shown) from None


def load(source: str | bytes | os.PathLike | Mapping | Policy) -> Policy:
    """Load a policy from a path, JSON text (a string starting with ``{``), UTF-8 bytes, a dict or a Policy
    (returned as is).

    Raises:
        PolicyError: for every failure and nothing else: a missing, unreadable, oversized (``MAX_POLICY_BYTES``)
            or non-UTF-8 file, bad JSON, a newer schema, invalid values. ``str()`` is one line naming the file and
            the JSON key where there is one; ``.key`` is the key.
    """
    if isinstance(source, Policy):
        return source
    if isinstance(source, Mapping):
        return Policy.from_dict(source)
    if isinstance(source, bytes | bytearray):
        return loads(source)
    if isinstance(source, str):
        _check_size(len(source), "characters", "the policy string")
        stripped = source.lstrip(" \t\r\n\ufeff")
        if stripped.startswith(("{", "[")):
            return loads(source)
        if not stripped:
            raise _fail(None, "empty policy: expected the path of a policy file or JSON text")
        return _read_file(Path(source), source)
    if isinstance(source, os.PathLike):
        try:
            path = Path(source)
        except TypeError as e:  # a bytes path
            raise _fail("policy", f"expected a str path, got {_show(source)}: {e}") from None
        return _read_file(path, None)
    raise _fail("policy", f"expected a JSON object, a path or a Policy, got {_show(source)}")


def to_json(policy: Policy) -> str:
    """Serialise to strict JSON (indented, stable key order)."""
    return json.dumps(policy.to_dict(), indent=2, allow_nan=False) + "\n"


def save(policy: Policy, path: str | Path) -> Path:
    """Write a policy atomically (temporary file, then rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(to_json(policy), encoding="utf-8")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------------------------
# JSON Schema, generated from the field tables.


def _schema_of(f: _Field) -> dict:
    """The JSON Schema of one field: one branch per field kind, mirroring ``_KIND_CHECKS``."""
    kind = f.kind
    if kind == "str":
        s: dict = {"type": "string", "minLength": 1}
        if f.pattern is not None:
            s["pattern"] = f.pattern
    elif kind == "enum":
        s = {"enum": list(f.choices)}
    elif kind in ("int", "float"):
        s = {"type": "integer" if kind == "int" else "number"}
        if f.minimum is not None:
            s["minimum"] = f.minimum
        if f.maximum is not None:
            s["maximum"] = f.maximum
    elif kind in ("list[str]", "list[int]"):
        item = dataclasses.replace(f, kind=kind[5:-1], nullable=False, unique=False, doc="")
        s = {"type": "array", "items": _schema_of(item)}
        if f.unique:
            s["uniqueItems"] = True
    elif kind == "obj":
        s = {"$ref": f"#/$defs/{f.cls}"}
    elif kind == "map":
        s = {"type": "object", "propertyNames": {"minLength": 1}, "additionalProperties": {"$ref": f"#/$defs/{f.cls}"}}
    elif kind == "lines":
        line = {
            "type": "array",
            "description": "[alpha, beta, r2, n]",
            "prefixItems": [_schema_of(item) for item in _LINE_ITEMS],
            "minItems": len(_LINE_ITEMS),
            "maxItems": len(_LINE_ITEMS),
        }
        s = {"type": "object", "propertyNames": {"minLength": 1}, "minProperties": 1, "maxProperties": MAX_BRANCHES,
             "additionalProperties": line}
    else:  # pragma: no cover
        raise AssertionError(kind)
    if f.allow_inf:
        s = {"anyOf": [s, {"enum": ["inf", "-inf"]}]}
    if f.nullable:
        s = {"anyOf": [s, {"type": "null"}]}
    if f.doc:
        s["description"] = f.doc
    return s


def _object_schema(cls: type) -> dict:
    return {
        "type": "object",
        "description": (cls.__doc__ or "").strip().splitlines()[0],
        "properties": {f.key: _schema_of(f) for f in cls._FIELDS},
        "required": [f.key for f in cls._FIELDS if f.required],
        "additionalProperties": False,
    }


def json_schema() -> dict:
    """The JSON Schema (draft 2020-12) of a policy file, generated from the dataclasses' field tables.

    The schema checks structure, types, enums and ranges; cross-field rules (a dynamic layer needs a predictor,
    NVFP4 needs in_features % 16 == 0, each route runs over its layer's weight, tdc.blocks and attention.blocks within
    the model, menu keys are routes) are enforced by :func:`load`.
    """
    schema = _object_schema(Policy)
    schema["properties"]["schema_version"] = {"const": SCHEMA_VERSION}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://sixbit-tune/policies/schema.json",
        "title": "sixbit-tune policy",
        "$comment": (
            f"A policy file is UTF-8 JSON of at most {MAX_POLICY_BYTES} bytes (MAX_POLICY_BYTES), without NaN or "
            "Infinity literals or duplicate keys; sixbit_tune.policy.load also enforces the cross-field rules."
        ),
        **schema,
        "$defs": {name: _object_schema(c) for name, c in _CLASSES.items() if c is not Policy},
    }


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sixbit_tune.policy", description=__doc__.splitlines()[0])
    parser.add_argument("--schema", action="store_true", help="print the policy JSON Schema")
    parser.add_argument("--check", metavar="FILE", nargs="*", default=[], help="validate policy files")
    args = parser.parse_args(argv)
    if args.schema:
        sys.stdout.write(schema_text())
    status = 0
    for path in args.check:
        try:
            load(path)
            print(f"{path}: ok")
        except PolicyError as e:
            print(e, file=sys.stderr)
            status = 1
    if not args.schema and not args.check:
        parser.print_help()
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
