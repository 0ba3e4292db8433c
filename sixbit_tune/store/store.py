"""The store: a folder of Parquet part files, queried through DuckDB views. See the package docstring."""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import pyarrow.parquet as pq

from sixbit_tune.errors import StoreSchemaError
from sixbit_tune.store.schema import (
    BLOCK_STEPS,
    LAYER_STEPS,
    POLICIES,
    PREDICTORS,
    RUN_KINDS,
    RUNS,
    SCHEMA_VERSION,
    TABLES,
    TRIALS,
    RowsLike,
    Table,
    conform,
    to_json_text,
)

STORE_FORMAT = "sixbit-tune-store"
META = "meta.json"
TMP = ".tmp"
SEED = "00000000000000000000-schema.parquet"
_GLOB_CHARS = set("*?[]{}")
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
_RETRIES = 4

GPU_KEYS = ("name", "driver", "memory_bytes", "compute_capability", "uuid")
"""Keys of the ``gpu`` dict :meth:`StoreWriter.begin_run` accepts (what :func:`sixbit_tune.store.env.gpu_info`
returns); stored as the ``gpu_<key>`` columns of ``runs``."""


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _tool_version() -> str:
    from sixbit_tune import __version__

    return f"sixbit-tune {__version__}"


# ---------------------------------------------------------------------------------------------------- layout


def _read_meta(root: Path) -> dict[str, Any]:
    meta_path = root / META
    if not root.is_dir():
        raise FileNotFoundError(
            f"no sixbit-tune store at {root}: the folder does not exist. Create one with "
            f"Store.create({str(root)!r}) (the profile and search commands create it on first use)."
        )
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{root} is not a sixbit-tune store: {META} is missing. Point at the folder that holds {META}, "
            f"or create a new store with Store.create(path)."
        )
    try:
        meta = json.loads(meta_path.read_text())
        version = int(meta["schema_version"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise StoreSchemaError(
            f"{meta_path} is unreadable ({type(e).__name__}: {e}); it must be JSON with an integer "
            f"'schema_version'. Restore it from a copy of the store, or re-create the store."
        ) from None
    if meta.get("format") != STORE_FORMAT:
        raise StoreSchemaError(f"{meta_path}: 'format' is {meta.get('format')!r}, expected {STORE_FORMAT!r}")
    meta["schema_version"] = version
    return meta


def _write_meta(root: Path, meta: Mapping[str, Any]) -> None:
    tmp = root / f"{META}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps(dict(meta), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, root / META)


def _ensure_seeds(root: Path, *, rewrite: bool = False) -> None:
    """Write each table's zero-row seed file (it fixes the column types and makes empty tables queryable)."""
    (root / TMP).mkdir(exist_ok=True)
    for table in TABLES.values():
        d = root / table.name
        d.mkdir(exist_ok=True)
        if rewrite or not (d / SEED).is_file():
            _atomic_parquet(table.arrow_schema.empty_table(), root / TMP, d / SEED)


def _stale_seeds(root: Path) -> list[str]:
    """Tables whose seed file is missing or does not hold this code's exact columns and types."""
    stale = []
    for table in TABLES.values():
        seed = root / table.name / SEED
        try:
            ok = pq.read_schema(seed).remove_metadata().equals(table.arrow_schema.remove_metadata())
        except (FileNotFoundError, OSError, pa.ArrowInvalid):
            ok = False
        if not ok:
            stale.append(table.name)
    return stale


def _atomic_parquet(data: pa.Table, tmp_dir: Path, dest: Path) -> None:
    """Write ``data`` to ``dest`` so that ``dest`` either does not exist or is a whole file (kill-safe)."""
    tmp = tmp_dir / f"{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            pq.write_table(data, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_version(root: Path, meta: Mapping[str, Any]) -> None:
    from sixbit_tune.store.migrations import migration_path

    found = meta["schema_version"]
    if found == SCHEMA_VERSION:
        return
    by = meta.get("created_by", "an unknown sixbit-tune")
    if found > SCHEMA_VERSION:
        raise StoreSchemaError(
            f"the store at {root} has schema version {found}, newer than version {SCHEMA_VERSION} that "
            f"{_tool_version()} reads (it was created by {by}). Upgrade sixbit-tune "
            f"(`pip install -U sixbit-tune`) to read it, or use another --store folder."
        )
    if migration_path(found) is not None:
        raise StoreSchemaError(
            f"the store at {root} has schema version {found}; {_tool_version()} reads version {SCHEMA_VERSION}. "
            f"Stop every process writing to it, then run `python -m sixbit_tune.store migrate {root}` "
            f"(migrates in place; copy the folder first to keep a backup)."
        )
    raise StoreSchemaError(
        f"the store at {root} has schema version {found}; {_tool_version()} reads version {SCHEMA_VERSION} and "
        f"has no migration from version {found}. Re-create it (re-run the profile or search into a new --store "
        f"folder), or read it with the release that wrote it ({by})."
    )


def _lit(s: str) -> str:
    """A SQL string literal. Only for paths and labels the store itself puts into view definitions (views
    cannot take bound parameters); user values in queries are always bound."""
    return "'" + s.replace("'", "''") + "'"


def _ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


# ---------------------------------------------------------------------------------------------------- store


class Store:
    """A sixbit-tune store (a folder; see the package docstring), or a read-only union of several.

    Reading never takes a lock: every query sees the part files that were complete when it started. A ``Store``
    may be shared by threads (each call uses its own DuckDB cursor).
    """

    def __init__(self, roots: Mapping[str, Path], *, read_only: bool) -> None:
        """Use :meth:`create`, :meth:`open` or :meth:`open_many`."""
        self._roots = dict(roots)
        self.read_only = read_only
        self._con = duckdb.connect(":memory:")
        self._con.execute("SET TimeZone = 'UTC'")
        self._lock = threading.Lock()
        self._create_views()

    # -- opening ------------------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, *, exist_ok: bool = False) -> Store:
        """Create an empty store in folder ``path`` (made if missing; it must not hold anything else).

        Args:
            path: the store folder.
            exist_ok: when ``path`` already is a store, open it (with the version check) instead of failing.

        Raises:
            FileExistsError: ``path`` is a store and ``exist_ok`` is False, or a non-empty folder that is no store.
            StoreSchemaError: ``exist_ok`` and the existing store has another schema version.
        """
        root = Path(path).absolute()
        _check_path(root)

        def existing() -> Store:
            if exist_ok:
                return cls.open(root)
            raise FileExistsError(f"a store already exists at {root}; open it with Store.open({str(root)!r})")

        if (root / META).exists():
            return existing()
        root.mkdir(parents=True, exist_ok=True)
        layout = {*TABLES, TMP, META}
        foreign = sorted(p.name for p in root.iterdir() if p.name not in layout and not p.name.startswith(META))
        if foreign:
            raise FileExistsError(
                f"{root} is not empty ({foreign[:5]}) and is no store; choose an empty or new folder for the store"
            )
        # meta.json appears exactly once, atomically (link fails if it exists): of several processes creating
        # the same store at once, one creates it and the others open it.
        tmp = root / f"{META}.{uuid.uuid4().hex}.tmp"
        meta = {
            "format": STORE_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "created": _now().isoformat(),
            "created_by": _tool_version(),
        }
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        try:
            os.link(tmp, root / META)
        except FileExistsError:
            return existing()
        finally:
            tmp.unlink(missing_ok=True)
        _ensure_seeds(root)
        return cls({str(root): root}, read_only=False)

    @classmethod
    def open(cls, path: str | os.PathLike, *, read_only: bool = False) -> Store:
        """Open an existing store.

        Args:
            path: the store folder.
            read_only: forbid :meth:`writer` (a dashboard opens read-only). Reading never locks either way.

        Raises:
            FileNotFoundError: no store at ``path``.
            StoreSchemaError: the store has another schema version; the message says what to run.
        """
        root = Path(path).absolute()
        _check_path(root)
        meta = _read_meta(root)
        _check_version(root, meta)
        stale = _stale_seeds(root)
        if stale:
            if read_only:
                raise StoreSchemaError(
                    f"the store at {root} lacks current schema files for tables {stale}; open it once writable "
                    f"(Store.open(path)) or run `python -m sixbit_tune.store migrate {root}` to restore them"
                )
            _ensure_seeds(root, rewrite=True)
        return cls({str(root): root}, read_only=read_only)

    @classmethod
    def open_many(cls, paths: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike]) -> Store:
        """Open several stores (e.g. one per machine or GPU) as one read-only view.

        Every view gets a ``store`` column: the label given in a mapping, else the store's absolute path.
        Entity rows (runs, trials, predictors, policies) are merged by key, latest write wins, exactly as if the
        part files had been copied into one folder.

        Raises:
            FileNotFoundError, StoreSchemaError: as :meth:`open`, for the first store that fails.
            ValueError: no paths, or two stores with the same label.
        """
        items = list(paths.items()) if isinstance(paths, Mapping) else [(None, p) for p in paths]
        if not items:
            raise ValueError("open_many needs at least one store path")
        roots: dict[str, Path] = {}
        for label, p in items:
            root = Path(p).absolute()
            cls.open(root, read_only=True).close()  # version and layout checks
            label = str(root) if label is None else str(label)
            if label in roots:
                raise ValueError(f"two stores share the label {label!r}")
            if root in roots.values():
                raise ValueError(f"{root} is given twice (its rows would be counted twice)")
            roots[label] = root
        return cls(roots, read_only=True)

    @property
    def path(self) -> Path:
        """The store folder (ValueError for a union of several: see :attr:`paths`)."""
        if len(self._roots) != 1:
            raise ValueError("this Store combines several folders; see .paths")
        return next(iter(self._roots.values()))

    @property
    def paths(self) -> dict[str, Path]:
        """``label -> folder`` of every store read."""
        return dict(self._roots)

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({list(self._roots.values())}, read_only={self.read_only})"

    # -- writing ------------------------------------------------------------------------------------------

    def writer(self, worker_id: str | None = None) -> StoreWriter:
        """A writer for this process (or thread). Give each concurrent worker its own writer.

        Args:
            worker_id: a name for the worker (e.g. ``"gpu3"``), used in part file names and the ``worker_id``
                column; default ``"<host>-<pid>"``. Characters outside ``[A-Za-z0-9_.-]`` become ``_``.

        Raises:
            PermissionError: the store was opened read-only or combines several folders.
        """
        if self.read_only:
            raise PermissionError("this Store is read-only (open it with Store.open(path) to write)")
        return StoreWriter(self.path, worker_id)

    def compact(self, *, tmp_max_age_s: float = 3600.0) -> dict[str, int]:
        """Merge the part files of each entity table (runs, predictors, trials, policies) into one.

        Safe while readers and writers run: the merged part is in place before the merged-away parts are removed
        (a reader meanwhile sees some rows twice, which the views' latest-per-key rule absorbs; a query that
        loses a removed file is retried), and parts written after the listing are left alone. Every row is kept,
        so ``created`` stays right. Fact tables are not compacted: their parts (one per prompt) are large and a
        moment of duplicate rows would be visible there. Also removes temporary files older than
        ``tmp_max_age_s`` left by killed writers.

        Returns:
            ``table -> number of part files merged`` (tables with fewer than 2 parts are skipped).
        """
        if self.read_only:
            raise PermissionError("this Store is read-only (open it with Store.open(path) to compact)")
        root = self.path
        merged: dict[str, int] = {}
        for table in TABLES.values():
            if not table.key:
                continue
            parts = sorted(p for p in (root / table.name).glob("*.parquet") if p.name != SEED)
            if len(parts) < 2:
                continue
            pieces = []
            for p in parts:
                t = pq.read_table(p, schema=table.arrow_schema)
                part = t.column("_part")
                if part.null_count:
                    filled = pa.compute.coalesce(part, pa.scalar(p.name))
                    t = t.set_column(t.schema.get_field_index("_part"), table.arrow_schema.field("_part"), filled)
                pieces.append(t)
            data = pa.concat_tables(pieces)
            w = StoreWriter(root, "compact")
            w._write(table, data)
            for p in parts:
                p.unlink(missing_ok=True)
            merged[table.name] = len(parts)
        cutoff = time.time() - tmp_max_age_s
        for f in (root / TMP).glob("*.tmp"):
            try:
                if f.stat().st_mtime < cutoff:
                    f.unlink()
            except FileNotFoundError:
                pass
        return merged

    # -- reading ------------------------------------------------------------------------------------------

    def _create_views(self) -> None:
        for table in TABLES.values():
            self._con.execute(f"CREATE VIEW {_ident(table.name)} AS {self._view_sql(table)}")

    def _view_sql(self, table: Table) -> str:
        parts = []
        for label, root in self._roots.items():
            glob = str(root / table.name / "*.parquet")
            parts.append(
                f"SELECT *, {_lit(label)} AS store "
                f"FROM read_parquet({_lit(glob)}, union_by_name = true, filename = true)"
            )
        union = " UNION ALL BY NAME ".join(parts)

        def col(c) -> str:
            return f"CAST({_ident(c.name)} AS JSON) AS {_ident(c.name)}" if c.json else _ident(c.name)

        if not table.key:
            cols = ", ".join(col(c) for c in table.columns)
            return f"SELECT {cols}, store FROM ({union})"
        cols = ", ".join(col(c) for c in table.columns if c.name != "written" and not c.name.startswith("_"))
        key = ", ".join(_ident(k) for k in table.key)
        # Write order = the name of the part a row was first written in (time_ns first; kept by compaction).
        order = "coalesce(_part, parse_filename(filename))"
        return (
            f"SELECT {cols}, store, _created AS created, written AS updated FROM ("
            f"SELECT *, row_number() OVER (PARTITION BY {key} ORDER BY {order} DESC) AS _rn, "
            f"min(written) OVER (PARTITION BY {key}) AS _created FROM ({union})) WHERE _rn = 1"
        )

    def to_arrow(self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> pa.Table:
        """Run a query over the views and return an Arrow table.

        Tables: ``runs``, ``block_steps``, ``layer_steps``, ``predictors``, ``trials``, ``policies`` (columns:
        ``sixbit_tune.store.schema``; JSON columns have DuckDB type JSON, e.g. ``settings->>'steps'``).

        Args:
            sql: DuckDB SQL. Put every value in ``params`` (``?`` or ``$name`` placeholders), never in ``sql``.
            params: positional (sequence) or named (mapping) parameters.
        """
        with self._lock:
            cur = self._con.cursor()
        try:
            for attempt in range(_RETRIES):
                try:
                    rel = cur.sql(sql, params=params) if params else cur.sql(sql)
                    return rel.to_arrow_table()
                except duckdb.IOException:
                    # A part listed by the glob was removed by a concurrent compaction before it was read; the
                    # rows are in the compacted part, so simply read again.
                    if attempt == _RETRIES - 1:
                        raise
                    time.sleep(0.05 * (attempt + 1))
            raise AssertionError("unreachable")
        finally:
            cur.close()

    def query(self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> pd.DataFrame:
        """:meth:`to_arrow` as a pandas DataFrame (timestamps in UTC; empty results keep their columns)."""
        return self.to_arrow(sql, params).to_pandas()

    def runs(self, *, kind: str | None = None, run_ids: Iterable[str] | None = None) -> pd.DataFrame:
        """Runs (latest status), oldest first. ``kind`` filters by kind; ``run_ids`` by id."""
        if kind is not None and kind not in RUN_KINDS:
            raise ValueError(f"kind {kind!r} unknown; one of {list(RUN_KINDS)}")
        return self.query(
            "SELECT * FROM runs WHERE ($kind IS NULL OR kind = $kind) "
            "AND ($ids IS NULL OR list_contains($ids, run_id)) ORDER BY created, run_id",
            {"kind": kind, "ids": _opt_list(run_ids)},
        )

    def block_steps(self, run_ids: Iterable[str] | None = None) -> pd.DataFrame:
        """Block statistics, ordered by run, prompt, branch, step, block."""
        return self.query(
            "SELECT * FROM block_steps WHERE ($ids IS NULL OR list_contains($ids, run_id)) "
            "ORDER BY run_id, prompt_index, branch, step, block_index",
            {"ids": _opt_list(run_ids)},
        )

    def layer_steps(
        self, run_ids: Iterable[str] | None = None, *, formats: Iterable[str] | None = None
    ) -> pd.DataFrame:
        """Layer errors, ordered by run, prompt, branch, step, block, layer, format."""
        return self.query(
            "SELECT * FROM layer_steps WHERE ($ids IS NULL OR list_contains($ids, run_id)) "
            "AND ($fmts IS NULL OR list_contains($fmts, format)) "
            "ORDER BY run_id, prompt_index, branch, step, block_index, layer, format",
            {"ids": _opt_list(run_ids), "fmts": _opt_list(formats)},
        )

    def predictors(self, fit_id: str | None = None) -> pd.DataFrame:
        """Predictors of one fit, or of every fit when ``fit_id`` is None; ordered by fit, layer, format."""
        return self.query(
            "SELECT * FROM predictors WHERE ($fit IS NULL OR fit_id = $fit) ORDER BY created, fit_id, layer, format",
            {"fit": fit_id},
        )

    def latest_fit_id(self) -> str | None:
        """The fit written last, or None."""
        row = self.to_arrow("SELECT fit_id FROM predictors ORDER BY updated DESC, fit_id DESC LIMIT 1")
        return row.column(0)[0].as_py() if row.num_rows else None

    def trials(self, study: str | None = None) -> pd.DataFrame:
        """Trials (latest version of each), ordered by study and number."""
        return self.query(
            "SELECT * FROM trials WHERE ($study IS NULL OR study = $study) ORDER BY study, number",
            {"study": study},
        )

    def policies(self) -> pd.DataFrame:
        """Exported policies (latest per name), oldest first."""
        return self.query("SELECT * FROM policies ORDER BY created, name")


def _opt_list(values: Iterable[str] | None) -> list[str] | None:
    if values is None:
        return None
    if isinstance(values, str):
        return [values]
    return [str(v) for v in values]


def _check_path(root: Path) -> None:
    bad = sorted(_GLOB_CHARS & set(str(root)))
    if bad:
        raise ValueError(f"store path {root} contains glob characters {bad}; choose a folder name without them")


# ---------------------------------------------------------------------------------------------------- writer


class StoreWriter:
    """Writes part files into one store folder; obtained from :meth:`Store.writer`.

    Every ``write_*`` call persists its rows as one new Parquet part file, written under a temporary name and
    renamed into place: readers see all of it or nothing, and a killed process leaves only whole files. Nothing
    is buffered between calls, so call once per finished unit of work (a prompt, a trial). Writers never lock;
    any number of processes may write to one store at once.
    """

    def __init__(self, root: Path, worker_id: str | None = None) -> None:
        self.root = Path(root)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        raw = worker_id if worker_id is not None else f"{self.host}-{self.pid}"
        if not raw:
            raise ValueError("worker_id must not be empty")
        self.worker_id = _SAFE.sub("_", str(raw))[:64]
        self._seq = 0
        self._last_ns = 0
        self._runs: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    # -- mechanics ----------------------------------------------------------------------------------------

    def _part_name(self) -> str:
        with self._lock:
            ns = max(time.time_ns(), self._last_ns + 1)
            self._last_ns = ns
            self._seq += 1
            seq = self._seq
        return f"{ns:020d}-{self.worker_id}-{seq:06d}-{uuid.uuid4().hex[:8]}.parquet"

    def _write(self, table: Table, data: pa.Table) -> Path:
        dest = self.root / table.name / self._part_name()
        tmp_dir = self.root / TMP
        tmp_dir.mkdir(exist_ok=True)
        _atomic_parquet(data, tmp_dir, dest)
        return dest

    def _who(self) -> dict[str, Any]:
        return {"host": self.host, "worker_id": self.worker_id, "written": _now()}

    def _known_run(self, run_id: str) -> dict[str, Any]:
        if run_id in self._runs:
            return self._runs[run_id]
        with Store.open(self.root, read_only=True) as s:
            t = s.to_arrow("SELECT * EXCLUDE (store, created, updated) FROM runs WHERE run_id = ?", [run_id])
        if t.num_rows == 0:
            raise ValueError(f"unknown run_id {run_id!r}: begin it with StoreWriter.begin_run first")
        row = {k: v for k, v in t.to_pylist()[0].items() if k not in ("host", "worker_id")}
        self._runs[run_id] = row
        return row

    # -- runs ---------------------------------------------------------------------------------------------

    def begin_run(
        self,
        kind: str,
        model_spec: str,
        *,
        model_class: str | None = None,
        family: str | None = None,
        config_hash: str | None = None,
        settings: Mapping[str, Any] | None = None,
        gpu: Mapping[str, Any] | None = None,
        versions: Mapping[str, Any] | None = None,
        seed: int | None = None,
        timesteps: Sequence[float] | None = None,
        run_id: str | None = None,
    ) -> str:
        """Record a new run with status ``running``; returns its ``run_id``.

        Args:
            kind: one of ``RUN_KINDS`` (``"profile"``, ``"search"``, ...).
            model_spec: the spec the user gave.
            model_class, family, config_hash: from the model adapter.
            settings: JSON-serializable run settings (steps, height, width, frames, guidance, seed, prompts, ...).
            gpu: :func:`sixbit_tune.store.env.gpu_info` (None without a GPU); keys must be among ``GPU_KEYS``.
            versions: :func:`sixbit_tune.store.env.versions`.
            seed: the run's seed.
            timesteps: scheduler timesteps if known now (else give them to :meth:`finish_run`).
            run_id: an explicit id (default ``"<kind>-<UTC time>-<random>"``).

        Raises:
            ValueError: unknown kind, unknown gpu keys, settings that are not JSON, a run_id already begun here.
        """
        if gpu is not None:
            unknown = sorted(set(gpu) - set(GPU_KEYS))
            if unknown:
                raise ValueError(f"gpu: unknown keys {unknown}; allowed {list(GPU_KEYS)}")
        if run_id is None:
            run_id = f"{kind}-{_now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        if run_id in self._runs:
            raise ValueError(f"run {run_id!r} was already begun by this writer")
        gpu = gpu or {}
        row = {
            "run_id": run_id,
            "kind": kind,
            "status": "running",
            "model_spec": model_spec,
            "model_class": model_class,
            "family": family,
            "config_hash": config_hash,
            **{f"gpu_{k}": gpu.get(k) for k in GPU_KEYS},
            "versions": to_json_text(dict(versions) if versions is not None else None, "runs.versions"),
            "settings": to_json_text(dict(settings) if settings is not None else None, "runs.settings"),
            "seed": seed,
            "timesteps": [float(t) for t in timesteps] if timesteps is not None else None,
            "error": None,
            "pid": self.pid,
        }
        self._write(RUNS, conform(RUNS, [{**row, **self._who()}]))
        self._runs[run_id] = row
        return run_id

    def finish_run(
        self,
        run_id: str,
        status: str = "finished",
        *,
        timesteps: Sequence[float] | None = None,
        error: str | None = None,
    ) -> None:
        """Mark a run ``finished`` or ``failed`` (with ``error``). Works from any writer of the store.

        Raises:
            ValueError: unknown run_id, a status other than finished/failed, or ``failed`` without ``error``.
        """
        if status not in ("finished", "failed"):
            raise ValueError(f"status must be 'finished' or 'failed', not {status!r}")
        if status == "failed" and not error:
            raise ValueError("a failed run needs error= (why it failed)")
        row = dict(self._known_run(run_id))
        row["status"] = status
        row["error"] = error
        if timesteps is not None:
            row["timesteps"] = [float(t) for t in timesteps]
        self._write(RUNS, conform(RUNS, [{**row, **self._who()}]))
        self._runs[run_id] = row

    # -- facts ----------------------------------------------------------------------------------------------

    def write_block_steps(self, rows: RowsLike, *, run_id: str | None = None) -> Path:
        """Append block statistics (one prompt's worth, say) as one part file; returns its path.

        Args:
            rows: a pyarrow Table, pandas DataFrame, dict of columns (lists, numpy arrays, CPU/GPU tensors) or
                list of row dicts, with the columns of ``block_steps`` (optional ones may be absent).
            run_id: fills the ``run_id`` column (rows may then omit it; if present it must agree).

        Raises:
            ValueError: unknown/missing columns, bad enumerations or types, an unknown run_id.
            NonFiniteError: NaN/Inf in a statistic.
        """
        return self._write_facts(BLOCK_STEPS, rows, run_id)

    def write_layer_steps(self, rows: RowsLike, *, run_id: str | None = None) -> Path:
        """Append layer errors as one part file; same contract as :meth:`write_block_steps`."""
        return self._write_facts(LAYER_STEPS, rows, run_id)

    def _write_facts(self, table: Table, rows: RowsLike, run_id: str | None) -> Path:
        data = conform(table, rows, fill={"run_id": run_id} if run_id is not None else None)
        for rid in set(data.column("run_id").unique().to_pylist()):
            self._known_run(rid)
        return self._write(table, data)

    # -- predictors, trials, policies -----------------------------------------------------------------------

    def write_predictors(
        self,
        rows: RowsLike,
        *,
        run_ids: Sequence[str],
        fit_id: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> str:
        """Record one fit: rows with ``layer, format, alpha, beta, r2, n, trusted``; returns the ``fit_id``.

        Re-writing the same ``(fit_id, layer, format)`` replaces the earlier row.

        Args:
            rows: see :meth:`write_block_steps`.
            run_ids: the profile runs the fit used (stored on every row).
            fit_id: default ``"fit-<UTC time>-<random>"``.
            settings: JSON-serializable fit settings.
        """
        if fit_id is None:
            fit_id = f"fit-{_now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        if isinstance(run_ids, str):
            run_ids = [run_ids]
        data = conform(PREDICTORS, rows, fill={
            "fit_id": fit_id,
            "run_ids": list(run_ids),
            "settings": to_json_text(dict(settings) if settings is not None else None, "predictors.settings"),
            **self._who(),
        })
        self._write(PREDICTORS, data)
        return fit_id

    def write_trial(
        self,
        study: str,
        number: int,
        *,
        state: str,
        params: Mapping[str, Any] | None = None,
        latency_ms: float | None = None,
        speedup: float | None = None,
        peak_memory_bytes: int | None = None,
        weight_bytes: int | None = None,
        cache_bytes: int | None = None,
        psnr_db: float | None = None,
        ssim: float | None = None,
        quality: Mapping[str, Any] | None = None,
        skip_share: float | None = None,
        nvfp4_share: float | None = None,
        fail_reason: str | None = None,
        gpu: str | None = None,
        nvfp4_path: str | None = None,
        kernel_path: str | None = None,
        policy: Mapping[str, Any] | str | None = None,
    ) -> Path:
        """Record (or replace) trial ``(study, number)``: write RUNNING when it starts, then its final state.

        The views keep the latest write of each ``(study, number)``; ``created`` is the first write's time.

        Raises:
            ValueError: unknown state, FAIL without ``fail_reason``, values that do not fit the columns.
            NonFiniteError: NaN anywhere, or ±Inf outside ``psnr_db``.
        """
        if state == "FAIL" and not fail_reason:
            raise ValueError("a FAIL trial needs fail_reason=")
        row = {
            "study": study,
            "number": number,
            "state": state,
            "params": to_json_text(dict(params) if params is not None else None, "trials.params"),
            "latency_ms": latency_ms,
            "speedup": speedup,
            "peak_memory_bytes": peak_memory_bytes,
            "weight_bytes": weight_bytes,
            "cache_bytes": cache_bytes,
            "psnr_db": psnr_db,
            "ssim": ssim,
            "quality": to_json_text(dict(quality) if quality is not None else None, "trials.quality"),
            "skip_share": skip_share,
            "nvfp4_share": nvfp4_share,
            "fail_reason": fail_reason,
            "gpu": gpu,
            "nvfp4_path": nvfp4_path,
            "kernel_path": kernel_path,
            "policy": to_json_text(policy if isinstance(policy, str) or policy is None else dict(policy), "trials.policy"),
            **self._who(),
        }
        return self._write(TRIALS, conform(TRIALS, [row]))

    def write_policy(
        self,
        name: str,
        policy: Mapping[str, Any] | str,
        *,
        path: str | os.PathLike | None = None,
        study: str | None = None,
        trial: int | None = None,
    ) -> Path:
        """Record an exported policy (``Policy.to_dict()`` or its JSON text) under ``name`` (latest wins)."""
        row = {
            "name": name,
            "study": study,
            "trial": trial,
            "path": str(path) if path is not None else None,
            "policy": to_json_text(policy if isinstance(policy, str) else dict(policy), "policies.policy"),
            **self._who(),
        }
        return self._write(POLICIES, conform(POLICIES, [row]))
