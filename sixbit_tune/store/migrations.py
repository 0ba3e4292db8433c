"""Schema versions of the store and the migrations between them.

How to change the schema (the one documented path):

1. Edit the tables in ``sixbit_tune/store/schema.py`` and bump ``SCHEMA_VERSION`` (say 1 -> 2).
2. Add ``MIGRATIONS[1] = Migration(1, "what changes", fn)`` below. ``fn(root: Path)`` brings a version-1 store
   folder to version 2 *in place*:

   - a new nullable column needs nothing: :func:`migrate` rewrites every table's seed file with the new schema
     after the steps ran, and the readers' ``union_by_name`` fills the column with NULL in older part files;
   - a renamed, retyped or removed column, or a new required column: rewrite each part file of the table with
     DuckDB (``COPY (SELECT ... FROM read_parquet(part)) TO tmp (FORMAT parquet)`` then ``os.replace(tmp,
     part)``), one file at a time, so a crash leaves whole files behind and the migration can simply be re-run.

3. Add a test in ``tests/store/`` that builds a version-1 store with the previous code's layout and migrates it.

Users are told to run ``python -m sixbit_tune.store migrate <store>`` when they open an older store for which a
path of migrations exists; when none exists the error tells them to re-create the store.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from sixbit_tune.errors import StoreSchemaError
from sixbit_tune.store.schema import SCHEMA_VERSION


@dataclass(frozen=True)
class Migration:
    """One step ``from_version -> from_version + 1``.

    Attributes:
        from_version: the version this step reads.
        description: one line, printed by ``migrate``.
        apply: ``fn(store_root)``; must be safe to re-run after a crash midway (rewrite whole files atomically).
    """

    from_version: int
    description: str
    apply: Callable[[Path], None]


def _checksum_parts(root: Path) -> None:
    from sixbit_tune.store.store import checksum_parts  # import cycle

    checksum_parts(root)


def _add_attention_tables(root: Path) -> None:
    """Version 2 -> 3: the new tables ``attn_steps`` and ``attn_predictors`` (folders; ``migrate`` writes their seed
    files). No existing part changes."""
    for name in ("attn_steps", "attn_predictors"):
        (root / name).mkdir(exist_ok=True)


def _layer_routes(root: Path) -> None:
    """Version 3 -> 4: ``layer_steps.format`` and ``predictors.format`` accept the routes ``"fp8"``,
    ``"nvfp4/int8"`` and ``"nvfp4/fp8"`` besides ``"nvfp4"`` and ``"int8"``, which keep their meaning. No stored part
    changes (``migrate`` rewrites the seed files); the version bump keeps an older sixbit-tune, which would reject
    the new values when it writes a fit, from opening a store that may hold them."""


MIGRATIONS: dict[int, Migration] = {
    1: Migration(
        1,
        "name every part with the SHA-256 of its bytes (parts that do not decode are moved to quarantine/)",
        _checksum_parts,
    ),
    2: Migration(2, "add the attention tables attn_steps and attn_predictors (empty)", _add_attention_tables),
    3: Migration(3, "layer_steps and predictors may hold the routes fp8, nvfp4/int8 and nvfp4/fp8 (no part changes)",
                 _layer_routes),
}
"""``from_version -> Migration``. Version 1 is the first released schema."""


def migration_path(
    found: int, target: int = SCHEMA_VERSION, migrations: Mapping[int, Migration] | None = None
) -> list[Migration] | None:
    """The steps from ``found`` to ``target``, or None when a step is missing (or ``found > target``)."""
    migrations = MIGRATIONS if migrations is None else migrations
    if found > target:
        return None
    steps = []
    for v in range(found, target):
        if v not in migrations:
            return None
        steps.append(migrations[v])
    return steps


def migrate(root: str | Path, *, migrations: Mapping[int, Migration] | None = None) -> list[str]:
    """Bring the store folder ``root`` to ``SCHEMA_VERSION`` in place. Stop every writer first.

    Applies each step, recording the new version in ``meta.json`` after each one, then rewrites the seed
    (schema) file of every table and checksums any part that still has no checksum (e.g. copied in from an older
    store). Re-running after a crash continues where it stopped.

    Returns:
        The descriptions of the steps applied (empty when the store was already current and every part had its
        checksum).

    Raises:
        FileNotFoundError: ``root`` is not a store.
        StoreSchemaError: no path of migrations leads from the store's version to ``SCHEMA_VERSION``.
        StoreReadOnlyError: the store folder cannot be written.
    """
    from sixbit_tune.store.store import (  # import cycle
        _ensure_seeds,
        _read_meta,
        _require_writable,
        _write_meta,
        checksum_parts,
    )

    root = Path(root)
    meta = _read_meta(root)
    found = int(meta["schema_version"])
    target = SCHEMA_VERSION
    steps = migration_path(found, target, migrations)
    if steps is None:
        raise StoreSchemaError(
            f"cannot migrate the store at {root} from schema version {found} to {target}: "
            + (
                "it is newer than this sixbit-tune; upgrade sixbit-tune (pip install -U sixbit-tune)"
                if found > target
                else f"no migration from version {found} exists; re-create the store (re-run the profile or search "
                f"into a new --store folder) or read it with the sixbit-tune release that wrote it "
                f"({meta.get('created_by', 'unknown')})"
            )
        )
    _require_writable(root)
    done = []
    for step in steps:
        step.apply(root)
        meta = {**meta, "schema_version": step.from_version + 1}
        _write_meta(root, meta)
        done.append(f"{step.from_version} -> {step.from_version + 1}: {step.description}")
    _ensure_seeds(root, rewrite=True)
    n, damaged = checksum_parts(root)
    if n or damaged:
        done.append(f"checksummed {n} parts that had none" + (f"; set aside {len(damaged)} damaged" if damaged else ""))
    return done


def read_version(root: str | Path) -> int:
    """The schema version recorded in ``<root>/meta.json`` (no check)."""
    return int(json.loads((Path(root) / "meta.json").read_text())["schema_version"])
