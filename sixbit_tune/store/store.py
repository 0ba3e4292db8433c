"""The store: a folder of Parquet part files, queried through DuckDB views. See the package docstring."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import pyarrow.parquet as pq

from sixbit_tune.errors import StoreReadOnlyError, StoreSchemaError
from sixbit_tune.store.schema import (
    ATTN_PREDICTORS,
    ATTN_STEPS,
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
QUARANTINE = "quarantine"
_CHECKSUM = re.compile(r"\.sha256-([0-9a-f]{64})\.parquet$")
"""A part's name ends with ``.sha256-<hex>.parquet``: the SHA-256 of the whole file, computed after it was written
and fsynced, before it was renamed into its table folder. Parts named without it (schema version 1 wrote them) are
"unchecksummed"."""
_LEGACY_READABLE = frozenset({1, 2, 3})
"""Older schema versions that :meth:`Store.open` still reads (read-only) without a migration: version 1 differs
only in carrying no checksums and no attention tables, version 2 only in having no attention tables (they read as
empty), version 3 only in holding fewer routes in the layer and predictor ``format`` columns."""


class StoreDamageWarning(UserWarning):
    """A damaged part file was found: it is named, set aside and left out of every query."""


class StoreChecksumWarning(UserWarning):
    """Parts without checksums were read (an older store): they are checked by decoding them only."""


@dataclass(frozen=True)
class DamagedPart:
    """A part file that failed its check.

    Attributes:
        table: the table folder it was found in.
        path: where it was found.
        reason: what failed (checksum mismatch, or why it could not be decoded).
        moved_to: where it was moved (``<store>/quarantine/<table>/``), or None when the folder could not be
            written: it was then left in place and is skipped by this reader.
    """

    table: str
    path: Path
    reason: str
    moved_to: Path | None

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


def _atomic_parquet(data: pa.Table, tmp_dir: Path, dest: Path, *, checksum: bool = False) -> Path:
    """Write ``data`` to ``dest`` so that ``dest`` either does not exist or is a whole file (kill-safe).

    With ``checksum``, ``dest`` names the part without its ending (``<name>``): the file lands as
    ``<name>.sha256-<hex>.parquet``, the SHA-256 of the file as written. Returns the final path.
    """
    tmp = tmp_dir / f"{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            pq.write_table(data, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        if checksum:
            dest = dest.with_name(f"{dest.name}.sha256-{_sha256(tmp)}.parquet")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _warn(warning: Warning) -> None:
    """Warn, attributed to the first caller outside this package (the line that opened or queried the store)."""
    here = os.path.dirname(__file__)
    level, frame = 2, sys._getframe(1)  # stacklevel 2: the caller of _warn
    while frame is not None and os.path.dirname(frame.f_code.co_filename) == here:
        level, frame = level + 1, frame.f_back
    warnings.warn(warning, stacklevel=level)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_part(path: str | os.PathLike) -> str | None:
    """Check one part file: None when it is whole, else what is wrong with it (one line).

    A part whose name carries a SHA-256 must hash to it: any changed, missing or added byte is found. A part
    without one (written by schema version 1) must decode completely (footer, every page of every column):
    this finds truncated and garbage files, and most damage inside them, but not every changed value.

    Raises:
        FileNotFoundError: the file is gone (a compaction removed it, another reader set it aside).
    """
    path = Path(path)
    m = _CHECKSUM.search(path.name)
    if m:
        found = _sha256(path)
        if found != m.group(1):
            return (
                f"the SHA-256 of its {path.stat().st_size:,d} bytes is {found[:16]}..., not the {m.group(1)[:16]}... "
                f"recorded in its name when it was written: its bytes changed on disk"
            )
        return None
    try:
        with pq.ParquetFile(path) as f:
            for _ in f.iter_batches(batch_size=65536):
                pass
    except FileNotFoundError:
        raise
    except Exception as e:  # pyarrow raises many types (ArrowInvalid, OSError, ValueError, ...) for bad bytes
        return f"it is not a readable Parquet file ({type(e).__name__}: {str(e)[:300]})"
    return None


_VERIFIED: dict[str, tuple[int, int, int, int]] = {}
"""Parts this process checked, ``path -> (inode, size, mtime_ns, ctime_ns)`` when checked: a part is immutable
once in place, so an unchanged stat means an unchanged file (writing to a file in place changes its ctime, which no
tool can set back)."""
_VERIFIED_LOCK = threading.Lock()


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _list_parts(folder: Path) -> list[Path]:
    """The part files of a table folder (every ``*.parquet`` but the seed), sorted by name."""
    try:
        with os.scandir(folder) as it:
            names = [e.name for e in it if e.name.endswith(".parquet") and e.name != SEED and e.is_file()]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [folder / n for n in sorted(names)]


def _set_aside(root: Path, table: str, path: Path, reason: str) -> tuple[Path | None, bool]:
    """Move a damaged part to ``<root>/quarantine/<table>/`` with a ``.why.txt`` note beside it.

    Returns ``(new path or None if it could not be moved, gone)``; ``gone`` is True when the file had already
    disappeared (another process set it aside or a compaction removed it).
    """
    qdir = root / QUARANTINE / table
    try:
        qdir.mkdir(parents=True, exist_ok=True)
        dest = qdir / path.name
        if dest.exists():
            dest = qdir / f"{path.name}.{uuid.uuid4().hex[:8]}"
        os.rename(path, dest)
    except FileNotFoundError:
        return None, not path.exists()
    except OSError:
        return None, False
    try:
        dest.with_name(dest.name + ".why.txt").write_text(
            f"{path}\nset aside {_now().isoformat()} by {_tool_version()} (host {socket.gethostname()}, "
            f"pid {os.getpid()}):\n{reason}\n"
        )
    except OSError:
        pass  # the part itself is set aside; the note is a courtesy
    return dest, False


def checksum_parts(root: str | os.PathLike) -> tuple[int, list[DamagedPart]]:
    """Give every part of the store folder ``root`` that has no checksum one (schema version 1 -> 2).

    Each such part is first checked by decoding it completely (:func:`check_part`); a whole one is renamed to carry
    its SHA-256 (``<name>.sha256-<hex>.parquet``: the name keeps its write order), a damaged one is set aside in
    ``quarantine/`` with a :class:`StoreDamageWarning`. Safe to re-run after a crash (parts already named with a
    checksum are left alone). Stop every writer first.

    Returns:
        ``(number of parts checksummed, damaged parts set aside)``.
    """
    root = Path(root)
    done, damaged = 0, []
    for name in TABLES:
        for part in _list_parts(root / name):
            if _CHECKSUM.search(part.name):
                continue
            try:
                reason = check_part(part)
                if reason is None:
                    os.rename(part, part.with_name(f"{part.name[: -len('.parquet')]}.sha256-{_sha256(part)}.parquet"))
                    done += 1
                    continue
            except FileNotFoundError:
                continue
            moved, gone = _set_aside(root, name, part, reason)
            if gone:
                continue
            damaged.append(DamagedPart(name, part, reason, moved))
            _warn(
                StoreDamageWarning(f"damaged part of table {name!r}: {part}: {reason}. It was moved to {moved}.")
            )
    return done, damaged


_PROBE = ".write-probe-"


def _require_writable(root: Path) -> None:
    """Raise :class:`StoreReadOnlyError` unless a file can really be created in every folder writers use.

    Permission bits alone do not tell (root ignores them; a read-only mount or an immutable folder does not show
    in them), so each folder gets a real probe file, removed at once.
    """
    for folder in (root, root / TMP, *(root / name for name in TABLES)):
        if not folder.is_dir():
            continue
        probe = folder / f"{_PROBE}{uuid.uuid4().hex[:8]}"
        try:
            os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            os.unlink(probe)
        except OSError as e:
            raise StoreReadOnlyError(
                f"the store at {root} is not writable: creating a file in {folder} failed ({e.strerror}). "
                f"Commands that record results (profile, fit, search, export) need to write there: make the folder "
                f"writable, or copy the store to a writable place (cp -r {root} NEW_FOLDER) and pass that folder. "
                f"Reading works as it is (Store.open(path, read_only=True), the dashboard)."
            ) from None


def _check_version(root: Path, meta: Mapping[str, Any], *, read_only: bool = False) -> None:
    from sixbit_tune.store.migrations import migration_path

    found = meta["schema_version"]
    if found == SCHEMA_VERSION:
        return
    if read_only and found in _LEGACY_READABLE:
        if found != 1:
            return  # no attention tables: they read as empty
        _warn(
            StoreChecksumWarning(
                f"the store at {root} has schema version {found}: its parts carry no checksums, so reading checks "
                f"them by decoding them only (a changed value inside a part can go unnoticed). Stop every process "
                f"writing to it and run `python -m sixbit_tune.store migrate {root}` to add checksums (writing to "
                f"it needs that too)."
            )
        )
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


_DUCKDB_TYPES = {
    pa.string(): "VARCHAR",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float64(): "DOUBLE",
    pa.bool_(): "BOOLEAN",
    pa.timestamp("us", tz="UTC"): "TIMESTAMP WITH TIME ZONE",
}


def _duckdb_type(t: pa.DataType) -> str:
    """The DuckDB type that reading an Arrow/Parquet column of type ``t`` gives."""
    if pa.types.is_list(t):
        return _duckdb_type(t.value_type) + "[]"
    try:
        return _DUCKDB_TYPES[t]
    except KeyError:
        raise TypeError(f"no DuckDB type known for the store column type {t}; add it to _DUCKDB_TYPES") from None


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

    Every part is checked before it is first read (:func:`check_part`; once per process while the file is
    unchanged). A damaged part is moved to ``<store>/quarantine/<table>/`` (with a ``.why.txt`` note; nothing is
    deleted) and a :class:`StoreDamageWarning` names it; where the folder cannot be written it is left in place and
    skipped. Either way the other parts stay readable, and :meth:`damaged_parts` lists what was set aside.
    """

    def __init__(self, roots: Mapping[str, Path], *, read_only: bool) -> None:
        """Use :meth:`create`, :meth:`open` or :meth:`open_many`."""
        self._roots = dict(roots)
        self.read_only = read_only
        self._con = duckdb.connect(":memory:")
        self._con.execute("SET TimeZone = 'UTC'")
        self._lock = threading.Lock()
        self._files: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {}
        self._damaged: list[DamagedPart] = []
        self._skipped: dict[str, tuple[int, int, int, int]] = {}  # damaged, left in place: path -> stat
        self._unchecksummed: set[Path] = set()
        with self._lock:
            self._refresh()

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
            StoreReadOnlyError: the folder (or, for a new store, its parent) cannot be written.
        """
        root = Path(path).absolute()
        _check_path(root)

        def existing() -> Store:
            if exist_ok:
                return cls.open(root)
            raise FileExistsError(f"a store already exists at {root}; open it with Store.open({str(root)!r})")

        if (root / META).exists():
            return existing()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except PermissionError as e:
            raise StoreReadOnlyError(
                f"cannot create the store folder {root}: {e.strerror}; choose a folder you can write to"
            ) from None
        layout = {*TABLES, TMP, META, QUARANTINE}
        # Another process creating the same store at once leaves its meta.json.*.tmp and write probes there.
        foreign = sorted(
            p.name
            for p in root.iterdir()
            if p.name not in layout and not p.name.startswith((META, _PROBE))
        )
        if foreign:
            raise FileExistsError(
                f"{root} is not empty ({foreign[:5]}) and is no store; choose an empty or new folder for the store"
            )
        _require_writable(root)
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
            read_only: forbid :meth:`writer` (a dashboard opens read-only). Reading never locks either way. A
                read-only open also reads a store of schema version 1 (no checksums) without migrating it, with a
                :class:`StoreChecksumWarning`.

        Raises:
            FileNotFoundError: no store at ``path``.
            StoreSchemaError: the store has another schema version; the message says what to run.
            StoreReadOnlyError: not ``read_only`` and the folder cannot be written (checked by really creating a
                file in it, before any work is done).
        """
        root = Path(path).absolute()
        _check_path(root)
        meta = _read_meta(root)
        _check_version(root, meta, read_only=read_only)
        if not read_only:
            _require_writable(root)
            if _stale_seeds(root):
                _ensure_seeds(root, rewrite=True)
        # Read-only opens need no seed files: the views take every column's type from the code's schema.
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
        with self._lock:
            self._refresh()  # checks every part: a damaged one is set aside, never merged into a new part
            files = {name: [Path(p) for _, paths in f for p in paths] for name, f in self._files.items()}
        for table in TABLES.values():
            if not table.key:
                continue
            parts = files[table.name]
            if len(parts) < 2:
                continue
            pieces, read = [], []
            for p in parts:
                try:
                    t = pq.read_table(p, schema=table.arrow_schema)
                except FileNotFoundError:
                    continue  # set aside or compacted by another process since the listing
                read.append(p)
                part = t.column("_part")
                if part.null_count:
                    filled = pa.compute.coalesce(part, pa.scalar(p.name))
                    t = t.set_column(t.schema.get_field_index("_part"), table.arrow_schema.field("_part"), filled)
                pieces.append(t)
            if len(read) < 2:
                continue
            data = pa.concat_tables(pieces)
            w = StoreWriter(root, "compact")
            w._write(table, data)
            for p in read:
                p.unlink(missing_ok=True)
            merged[table.name] = len(read)
        cutoff = time.time() - tmp_max_age_s
        for f in (root / TMP).glob("*.tmp"):
            try:
                if f.stat().st_mtime < cutoff:
                    f.unlink()
            except FileNotFoundError:
                pass
        return merged

    # -- reading ------------------------------------------------------------------------------------------

    def damaged_parts(self) -> list[DamagedPart]:
        """The damaged parts this Store found and set aside (or skipped), oldest first."""
        with self._lock:
            self._refresh()
            return list(self._damaged)

    def _refresh(self) -> None:
        """List every table's parts, check the new ones, and point the views at the whole ones. Hold ``_lock``."""
        for table in TABLES.values():
            files = []
            for label, root in self._roots.items():
                good = tuple(str(p) for p in _list_parts(root / table.name) if self._part_ok(root, table.name, p))
                files.append((label, good))
            current = tuple(files)
            if self._files.get(table.name) != current:
                self._con.execute(f"CREATE OR REPLACE VIEW {_ident(table.name)} AS {self._view_sql(table, current)}")
                self._files[table.name] = current

    def _part_ok(self, root: Path, table: str, path: Path) -> bool:
        key = str(path)
        try:
            st = os.stat(path)
            if self._skipped.get(key) == _stat_key(st):
                return False  # damaged and left in place, unchanged since (a restored copy is checked again)
            with _VERIFIED_LOCK:
                if _VERIFIED.get(key) == _stat_key(st):
                    return True
            if not _CHECKSUM.search(path.name) and root not in self._unchecksummed:
                self._unchecksummed.add(root)
                if _read_meta(root)["schema_version"] == SCHEMA_VERSION:  # older stores were told at open
                    _warn(
                        StoreChecksumWarning(
                            f"{path} carries no checksum (a part copied from an older store?): it is checked by "
                            f"decoding it only. Run `python -m sixbit_tune.store migrate {root}` to add checksums."
                        )
                    )
            reason = check_part(path)
        except FileNotFoundError:
            return False  # removed by a compaction or set aside by another reader since the listing
        if reason is None:
            with _VERIFIED_LOCK:
                _VERIFIED[key] = _stat_key(st)
            return True
        moved, gone = _set_aside(root, table, path, reason)
        if gone:
            return False
        if moved is None:
            self._skipped[key] = _stat_key(st)
        self._damaged.append(DamagedPart(table, path, reason, moved))
        where = (
            f"moved to {moved}" if moved is not None
            else "left in place (the store folder cannot be written) and skipped by this reader"
        )
        _warn(
            StoreDamageWarning(
                f"damaged part of table {table!r}: {path}: {reason}. It was {where}; every query leaves its rows "
                f"out and the rest of the store stays readable. Restore the file from a copy, or re-run what wrote "
                f"it (a profile prompt, a search trial)."
            )
        )
        return False

    def _view_sql(self, table: Table, files: tuple[tuple[str, tuple[str, ...]], ...]) -> str:
        parts = []
        for label, paths in files:
            if paths:
                listed = "[" + ", ".join(_lit(p) for p in paths) + "]"
                parts.append(
                    f"SELECT *, {_lit(label)} AS store "
                    f"FROM read_parquet({listed}, union_by_name = true, filename = true)"
                )
        # A row-less select of the code's own columns fixes every column's type, whatever the part files hold.
        typed = ", ".join(f"CAST(NULL AS {_duckdb_type(c.type)}) AS {_ident(c.name)}" for c in table.columns)
        parts.append(f"SELECT {typed}, CAST(NULL AS VARCHAR) AS filename, CAST(NULL AS VARCHAR) AS store WHERE false")
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

        Tables: ``runs``, ``block_steps``, ``layer_steps``, ``attn_steps``, ``predictors``, ``attn_predictors``,
        ``trials``, ``policies`` (columns:
        ``sixbit_tune.store.schema``; JSON columns have DuckDB type JSON, e.g. ``settings->>'steps'``).

        Args:
            sql: DuckDB SQL. Put every value in ``params`` (``?`` or ``$name`` placeholders), never in ``sql``.
            params: positional (sequence) or named (mapping) parameters.
        """
        for attempt in range(_RETRIES):
            with self._lock:
                self._refresh()
                cur = self._con.cursor()
            try:
                rel = cur.sql(sql, params=params) if params else cur.sql(sql)
                return rel.to_arrow_table()
            except duckdb.IOException:
                # A listed part was removed before it was read: by a concurrent compaction (its rows are in the
                # compacted part) or set aside by another reader; list the parts again and re-run.
                if attempt == _RETRIES - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))
            finally:
                cur.close()
        raise AssertionError("unreachable")

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

    def attn_steps(
        self, run_ids: Iterable[str] | None = None, *, formats: Iterable[str] | None = None
    ) -> pd.DataFrame:
        """Attention errors, ordered by run, prompt, branch, step, block, format."""
        return self.query(
            "SELECT * FROM attn_steps WHERE ($ids IS NULL OR list_contains($ids, run_id)) "
            "AND ($fmts IS NULL OR list_contains($fmts, format)) "
            "ORDER BY run_id, prompt_index, branch, step, block_index, format",
            {"ids": _opt_list(run_ids), "fmts": _opt_list(formats)},
        )

    def attn_predictors(self, fit_id: str | None = None) -> pd.DataFrame:
        """Attention predictors of one fit, or of every fit when ``fit_id`` is None; ordered by fit, format,
        block, branch."""
        return self.query(
            "SELECT * FROM attn_predictors WHERE ($fit IS NULL OR fit_id = $fit) "
            "ORDER BY created, fit_id, format, block_index, branch",
            {"fit": fit_id},
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

    Every ``write_*`` call persists its rows as one new Parquet part file, written under a temporary name, fsynced,
    hashed (SHA-256, recorded in the final name) and renamed into place: readers see all of it or nothing, a killed
    process leaves only whole files, and a part is never checked before it is whole. Nothing
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
        return f"{ns:020d}-{self.worker_id}-{seq:06d}-{uuid.uuid4().hex[:8]}"

    def _write(self, table: Table, data: pa.Table) -> Path:
        dest = self.root / table.name / self._part_name()
        tmp_dir = self.root / TMP
        tmp_dir.mkdir(exist_ok=True)
        return _atomic_parquet(data, tmp_dir, dest, checksum=True)

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

    def write_attn_steps(self, rows: RowsLike, *, run_id: str | None = None) -> Path:
        """Append attention errors (``attn_steps``) as one part file; same contract as :meth:`write_block_steps`."""
        return self._write_facts(ATTN_STEPS, rows, run_id)

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

    def write_attn_predictors(
        self,
        rows: RowsLike,
        *,
        run_ids: Sequence[str],
        fit_id: str,
        settings: Mapping[str, Any] | None = None,
    ) -> Path:
        """Record the attention predictors of fit ``fit_id``: rows with ``block_index, branch, format, alpha, beta,
        r2, n, rmse, mean_err, ss_tot, pooled, trusted``. Re-writing the same ``(fit_id, block_index, branch,
        format)`` replaces the earlier row. Other arguments as :meth:`write_predictors`."""
        if isinstance(run_ids, str):
            run_ids = [run_ids]
        data = conform(ATTN_PREDICTORS, rows, fill={
            "fit_id": fit_id,
            "run_ids": list(run_ids),
            "settings": to_json_text(dict(settings) if settings is not None else None, "attn_predictors.settings"),
            **self._who(),
        })
        return self._write(ATTN_PREDICTORS, data)

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
