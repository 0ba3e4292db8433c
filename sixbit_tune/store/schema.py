"""The store's tables: one declaration per column, from which the Parquet schemas, the seed files, the reader
views and the row validation are all derived. Bump ``SCHEMA_VERSION`` (and add a migration in
``sixbit_tune/store/migrations.py``) whenever a table or column here changes meaning, type or name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from sixbit_tune.errors import NonFiniteError
from sixbit_tune.routes import PROFILE_ROUTES

SCHEMA_VERSION = 4
"""Version of the on-disk layout and of every table below (kept in ``<store>/meta.json``). Version 2: every part's
name carries the SHA-256 of its bytes (version 1 parts carry none; the tables are the same). Version 3: the tables
``attn_steps`` (attention errors) and ``attn_predictors`` (their fitted predictors); the others are unchanged.
Version 4: ``layer_steps.format`` and ``predictors.format`` also hold ``"fp8"`` and the derived routes
``"nvfp4/int8"``, ``"nvfp4/fp8"`` (:data:`LAYER_FORMATS`); ``"nvfp4"`` and ``"int8"`` keep their meaning (the
routes nvfp4/nvfp4 and int8/int8), so no stored row changes."""

RUN_KINDS = ("profile", "search", "bench", "fit")
RUN_STATUSES = ("running", "finished", "failed")
BRANCHES = ("cond", "uncond")
LAYER_FORMATS = PROFILE_ROUTES
"""Layer routes of ``layer_steps`` and ``predictors`` (:data:`sixbit_tune.routes.PROFILE_ROUTES`: a format name f is
the route f/f, ``"<weight>/<activation>"`` a route with a derived weight operand)."""
ATTENTION_FORMATS = ("fp8", "int8")
"""Attention formats: the Q·Kᵀ operand format of the 8-bit attention (``sixbit_tune.formats.attention``)."""
TRIAL_STATES = ("COMPLETE", "FAIL", "PRUNED", "RUNNING")
NVFP4_PATHS = ("emulated", "native", "reference")

TS = pa.timestamp("us", tz="UTC")
JSON = "json"  # marker: a string column holding JSON text (exposed as DuckDB JSON by the views)


@dataclass(frozen=True)
class Column:
    """One column of a table.

    Attributes:
        name: column name (the statistics keep their defined names: gamma, delta_change, out_err, ...).
        type: Arrow type of the stored column; JSON columns are ``pa.string()`` with ``json=True``.
        required: a NULL (or missing column) is rejected on write.
        allowed: the only values accepted (enumerations), or None.
        finite: NaN and ±Inf are rejected (NaN is always rejected in float columns: use NULL for "missing").
        json: the column holds JSON text.
        doc: one line for the documentation.
    """

    name: str
    type: pa.DataType
    required: bool = False
    allowed: tuple[str, ...] | None = None
    finite: bool = True
    json: bool = False
    doc: str = ""


def _c(name, typ, doc="", **kw) -> Column:
    if typ is JSON:
        return Column(name, pa.string(), json=True, doc=doc, **kw)
    return Column(name, typ, doc=doc, **kw)


@dataclass(frozen=True)
class Table:
    """A table of the store.

    Attributes:
        name: table (and folder) name.
        columns: stored columns, in order.
        key: for "entity" tables, the columns identifying a row: a later write of the same key replaces the
            earlier one in the views (latest part file wins). Empty for append-only "fact" tables.
        doc: what one row is.
    """

    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...] = ()
    doc: str = ""

    @property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema(
            [pa.field(c.name, c.type, nullable=not c.required) for c in self.columns],
            metadata={b"sixbit_tune.table": self.name.encode(), b"sixbit_tune.schema_version": str(SCHEMA_VERSION).encode()},
        )

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


_GPU = (
    _c("gpu_name", pa.string(), "NVML device name, e.g. 'NVIDIA H200'; NULL without a GPU"),
    _c("gpu_driver", pa.string(), "NVIDIA driver version; NULL without a GPU"),
    _c("gpu_memory_bytes", pa.int64(), "total device memory; NULL without a GPU"),
    _c("gpu_compute_capability", pa.string(), "e.g. '9.0'; NULL without a GPU"),
    _c("gpu_uuid", pa.string(), "NVML UUID; NULL without a GPU"),
)
_WHO = (
    _c("host", pa.string(), "hostname of the writer", required=True),
    _c("worker_id", pa.string(), "the writer's worker id", required=True),
    _c("written", TS, "when this version of the row was written (UTC)", required=True),
    _c("_part", pa.string(), "internal: the part file a row was first written in, kept by compaction (the order "
       "of writes); NULL in ordinary parts; not shown by the views"),
)

RUNS = Table(
    "runs",
    (
        _c("run_id", pa.string(), "unique run id", required=True),
        _c("kind", pa.string(), "what produced the run", required=True, allowed=RUN_KINDS),
        _c("status", pa.string(), "running until finish_run", required=True, allowed=RUN_STATUSES),
        _c("model_spec", pa.string(), "the model spec as given (repo id, folder, tiny:<family>, ...)", required=True),
        _c("model_class", pa.string(), "transformer class name"),
        _c("family", pa.string(), "adapter family (cogvideox, wan, ...)"),
        _c("config_hash", pa.string(), "ModelAdapter.config_hash()"),
        *_GPU,
        _c("versions", JSON, "package versions (env.versions())"),
        _c("settings", JSON, "run settings: steps, height, width, frames, guidance, prompts, ..."),
        _c("seed", pa.int64(), "the run's seed"),
        _c("timesteps", pa.list_(pa.float64()), "scheduler timesteps, in step order"),
        _c("error", pa.string(), "why a failed run failed"),
        _c("pid", pa.int64(), "writer process id"),
        *_WHO,
    ),
    key=("run_id",),
    doc="one profile/search/bench run; status moves running -> finished|failed",
)

BLOCK_STEPS = Table(
    "block_steps",
    (
        _c("run_id", pa.string(), required=True),
        _c("prompt_index", pa.int32(), required=True),
        _c("prompt", pa.string()),
        _c("branch", pa.string(), "CFG branch", required=True, allowed=BRANCHES),
        _c("step", pa.int32(), "denoising step index, 0-based", required=True),
        _c("timestep", pa.float64(), "scheduler timestep at this step"),
        _c("block_index", pa.int32(), required=True),
        _c("block", pa.string(), "block module name, e.g. transformer_blocks.3"),
        _c("gamma", pa.float64(), "||Y-X||_1/||X||_1, X the block's input hidden states, Y its output", required=True),
        _c("delta_change", pa.float64(), "||D_t-D_{t-1}||_2/||D_{t-1}||_2; NULL at the first step"),
        _c("delta_cos", pa.float64(), "cos(D_t, D_{t-1}); NULL at the first step"),
        _c("delta_norm", pa.float64(), "||D_t||_2"),
    ),
    doc="one (run, prompt, branch, step, block): block statistics",
)

LAYER_STEPS = Table(
    "layer_steps",
    (
        _c("run_id", pa.string(), required=True),
        _c("prompt_index", pa.int32(), required=True),
        _c("branch", pa.string(), required=True, allowed=BRANCHES),
        _c("step", pa.int32(), required=True),
        _c("block_index", pa.int32(), required=True),
        _c("layer", pa.string(), "full module name of the linear", required=True),
        _c("format", pa.string(), "the route: a format f (the route f/f) or '<weight>/<activation>'", required=True,
           allowed=LAYER_FORMATS),
        _c("act_err", pa.float64(), "||Q(x)-x||_2/||x||_2, x quantized in the route's activation format"),
        _c("out_err", pa.float64(), "relative output error, weights and activations quantized", required=True),
    ),
    doc="one (run, prompt, branch, step, layer, route): quantization errors",
)

ATTN_STEPS = Table(
    "attn_steps",
    (
        _c("run_id", pa.string(), required=True),
        _c("prompt_index", pa.int32(), required=True),
        _c("branch", pa.string(), "CFG branch", required=True, allowed=BRANCHES),
        _c("step", pa.int32(), "denoising step index, 0-based", required=True),
        _c("block_index", pa.int32(), required=True),
        _c("format", pa.string(), "attention format (Q·Kᵀ operands)", required=True, allowed=ATTENTION_FORMATS),
        _c("attn_err", pa.float64(), "||O_a-O||_2/||O||_2 of the block's self-attention, O the unquantized output",
           required=True),
    ),
    doc="one (run, prompt, branch, step, block, attention format): the 8-bit attention error",
)

PREDICTORS = Table(
    "predictors",
    (
        _c("fit_id", pa.string(), required=True),
        _c("layer", pa.string(), required=True),
        _c("format", pa.string(), "the route whose out_err is predicted (as layer_steps.format)", required=True,
           allowed=LAYER_FORMATS),
        _c("alpha", pa.float64()),
        _c("beta", pa.float64()),
        _c("r2", pa.float64()),
        _c("n", pa.int64(), "number of (prompt, step) pairs fitted", required=True),
        _c("trusted", pa.bool_(), "the fit is good enough to drive the DMPQ rule", required=True),
        _c("run_ids", pa.list_(pa.string()), "profile runs the fit used", required=True),
        _c("settings", JSON, "fit settings"),
        *_WHO,
    ),
    key=("fit_id", "layer", "format"),
    doc="one per-layer predictor out_err ~ alpha*gamma_prev + beta of one fit",
)

ATTN_PREDICTORS = Table(
    "attn_predictors",
    (
        _c("fit_id", pa.string(), required=True),
        _c("block_index", pa.int32(), required=True),
        _c("branch", pa.string(), "CFG branch the line is used for", required=True, allowed=BRANCHES),
        _c("format", pa.string(), required=True, allowed=ATTENTION_FORMATS),
        _c("alpha", pa.float64()),
        _c("beta", pa.float64()),
        _c("r2", pa.float64()),
        _c("n", pa.int64(), "number of (prompt, step) pairs fitted", required=True),
        _c("rmse", pa.float64(), "root mean squared residual"),
        _c("mean_err", pa.float64(), "mean attn_err of the fitted pairs"),
        _c("ss_tot", pa.float64(), "sum of squared deviations of attn_err from its mean"),
        _c("pooled", pa.bool_(), "the line is the fit pooled over every branch (the fit chose pooling)",
           required=True),
        _c("trusted", pa.bool_(), "the fit is good enough to drive the attention rule", required=True),
        _c("run_ids", pa.list_(pa.string()), "profile runs the fit used", required=True),
        _c("settings", JSON, "fit settings"),
        *_WHO,
    ),
    key=("fit_id", "block_index", "branch", "format"),
    doc="one attention predictor attn_err ~ alpha*gamma_prev + beta of one fit, per block and CFG branch",
)

TRIALS = Table(
    "trials",
    (
        _c("study", pa.string(), required=True),
        _c("number", pa.int64(), "Optuna trial number", required=True),
        _c("state", pa.string(), required=True, allowed=TRIAL_STATES),
        _c("params", JSON, "the trial's parameters"),
        _c("latency_ms", pa.float64()),
        _c("speedup", pa.float64(), "baseline latency / latency"),
        _c("peak_memory_bytes", pa.int64()),
        _c("weight_bytes", pa.int64()),
        _c("cache_bytes", pa.int64()),
        _c("psnr_db", pa.float64(), "may be +inf for identical outputs", finite=False),
        _c("ssim", pa.float64()),
        _c("quality", JSON, "further quality figures"),
        _c("skip_share", pa.float64()),
        _c("nvfp4_share", pa.float64()),
        _c("fail_reason", pa.string(), "required when state is FAIL"),
        _c("gpu", pa.string(), "GPU name the trial was measured on"),
        _c("nvfp4_path", pa.string(), allowed=NVFP4_PATHS),
        _c("kernel_path", pa.string(), "which kernels ran (free text, e.g. 'triton')"),
        _c("policy", JSON, "the policy JSON the trial measured"),
        *_WHO,
    ),
    key=("study", "number"),
    doc="one Optuna trial; re-writing (study, number) replaces it (RUNNING -> COMPLETE)",
)

POLICIES = Table(
    "policies",
    (
        _c("name", pa.string(), required=True),
        _c("study", pa.string()),
        _c("trial", pa.int64()),
        _c("path", pa.string(), "where the JSON was exported"),
        _c("policy", JSON, required=True),
        *_WHO,
    ),
    key=("name",),
    doc="an exported policy",
)

TABLES: dict[str, Table] = {
    t.name: t for t in (RUNS, BLOCK_STEPS, LAYER_STEPS, ATTN_STEPS, PREDICTORS, ATTN_PREDICTORS, TRIALS, POLICIES)
}

RowsLike = Any  # pyarrow.Table | pandas.DataFrame | Mapping[str, Sequence] | Sequence[Mapping[str, Any]]


def to_json_text(value: Any, what: str) -> str | None:
    """Serialize a JSON column value: dict/list/scalars are dumped (sorted keys, no NaN); a str must be JSON."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what}: not valid JSON text ({e})") from None
        return value
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False, default=_json_default)
    except ValueError as e:
        raise ValueError(f"{what}: cannot be stored as JSON ({e}; use null instead of NaN/inf)") from None


def _json_default(o: Any) -> Any:
    if hasattr(o, "item") and callable(o.item):  # numpy / torch scalars
        return o.item()
    if hasattr(o, "tolist") and callable(o.tolist):
        return o.tolist()
    if isinstance(o, set | frozenset | tuple):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def as_arrow(rows: RowsLike, what: str) -> pa.Table:
    """Accept a pyarrow Table, pandas DataFrame, dict of columns or list of row dicts."""
    if isinstance(rows, pa.Table):
        return rows
    if isinstance(rows, pa.RecordBatch):
        return pa.Table.from_batches([rows])
    mod = type(rows).__module__
    if mod.startswith("pandas"):
        return pa.Table.from_pandas(rows, preserve_index=False)
    if isinstance(rows, Mapping):
        cols = {}
        for k, v in rows.items():
            if hasattr(v, "detach") and hasattr(v, "cpu"):  # a torch tensor: move to host numpy
                v = v.detach().cpu()
                if str(v.dtype) == "torch.bfloat16":  # numpy has no bfloat16
                    v = v.float()
                v = v.numpy()
            cols[k] = v
        lengths = {k: len(v) for k, v in cols.items() if not isinstance(v, str | bytes) and hasattr(v, "__len__")}
        scalars = [k for k in cols if k not in lengths]
        if scalars:
            raise ValueError(f"{what}: columns {scalars} are scalars; give one value per row (a list or array)")
        if len(set(lengths.values())) > 1:
            raise ValueError(f"{what}: columns have different lengths {lengths}")
        return pa.table(cols)
    if isinstance(rows, Sequence) and not isinstance(rows, str | bytes):
        return pa.Table.from_pylist(list(rows))
    raise TypeError(f"{what}: expected a pyarrow Table, pandas DataFrame, dict of columns or list of rows, got {type(rows).__name__}")


def conform(table: Table, rows: RowsLike, *, fill: Mapping[str, Any] | None = None) -> pa.Table:
    """Validate ``rows`` against ``table`` and return them cast to its exact Arrow schema.

    Args:
        table: the target table.
        rows: the rows (see :func:`as_arrow`).
        fill: constant values for columns absent from ``rows`` (a present column must agree with the constant).

    Raises:
        ValueError: unknown or missing columns, NULL in a required column, a value outside an enumeration, a type
            that does not convert, invalid JSON text; the message names the column.
        NonFiniteError: NaN in a float column, or ±Inf in a column declared finite.
    """
    what = f"{table.name}"
    data = as_arrow(rows, what)
    names = list(data.column_names)
    public = [n for n in table.column_names if not n.startswith("_")]
    unknown = [n for n in names if n not in public]
    if unknown:
        raise ValueError(f"{what}: unknown columns {unknown}; the table has {public}")
    if len(set(names)) != len(names):
        raise ValueError(f"{what}: duplicate column names in {names}")
    n = data.num_rows
    out = []
    for col in table.columns:
        if col.name in names:
            arr = data.column(col.name)
            if fill and col.name in fill:
                if not (pa.types.is_string(col.type) or pa.types.is_integer(col.type)):
                    raise ValueError(f"{what}: give {col.name!r} as an argument or as a column, not both")
                if fill[col.name] is not None and arr.null_count < len(arr):
                    bad = pc.any(pc.not_equal(arr.cast(col.type), pa.scalar(fill[col.name], col.type))).as_py()
                    if bad or arr.null_count:
                        raise ValueError(
                            f"{what}.{col.name}: rows disagree with the given {col.name}={fill[col.name]!r}"
                        )
        elif fill and col.name in fill:
            arr = pa.array([fill[col.name]] * n, type=col.type if not col.json else pa.string())
        else:
            if col.required:
                raise ValueError(f"{what}: required column {col.name!r} is missing")
            arr = pa.nulls(n, type=col.type)
        if col.json and not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) or pa.types.is_null(arr.type)):
            arr = pa.array([to_json_text(v, f"{what}.{col.name}") for v in arr.to_pylist()], pa.string())
        try:
            arr = arr.cast(col.type, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            raise ValueError(f"{what}.{col.name}: cannot store {arr.type} as {col.type} ({e})") from None
        _check(table, col, arr)
        out.append(arr)
    return pa.Table.from_arrays(out, schema=table.arrow_schema)


def _check(table: Table, col: Column, arr: pa.ChunkedArray | pa.Array) -> None:
    what = f"{table.name}.{col.name}"
    nulls = arr.null_count
    if col.required and nulls:
        raise ValueError(f"{what}: {nulls} NULL value(s) in a required column")
    if col.allowed is not None and len(arr) - nulls:
        bad = pc.unique(pc.filter(arr, pc.invert(pc.is_in(arr, value_set=pa.array(col.allowed)))).drop_null()).to_pylist()
        if bad:
            raise ValueError(f"{what}: values {bad} not allowed; allowed: {list(col.allowed)}")
    if pa.types.is_floating(col.type) and len(arr) - nulls:
        nan = pc.sum(pc.is_nan(arr)).as_py() or 0
        if nan:
            raise NonFiniteError(f"{what}: {nan} NaN value(s); use NULL (None) for a missing value")
        if col.finite:
            inf = pc.sum(pc.is_inf(arr)).as_py() or 0
            if inf:
                raise NonFiniteError(f"{what}: {inf} infinite value(s)")
    if col.json and len(arr) - nulls:
        for v in arr.to_pylist():
            if v is not None:
                to_json_text(v, what)
