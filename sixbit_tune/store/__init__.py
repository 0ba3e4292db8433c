"""The sixbit-tune store: profile statistics, predictors, search trials and exported policies, queried with DuckDB.

Layout and why
--------------
A store is a FOLDER of Parquet part files, one sub-folder per table, plus ``meta.json`` holding the schema
version::

    <store>/meta.json                       {"format": "sixbit-tune-store", "schema_version": 3, ...}
    <store>/<table>/00000000000000000000-schema.parquet     zero-row seed: the table's exact column types
    <store>/<table>/<time_ns>-<worker>-<seq>-<rand>.sha256-<hex>.parquet   one part per write_* call; <hex> is
                                            the SHA-256 of the file's bytes
    <store>/.tmp/                           parts being written (never read; a killed writer's leftovers are
                                            removed by compact() after an hour)
    <store>/quarantine/<table>/             damaged parts set aside by a reader, each with a <name>.why.txt

A DuckDB database file admits one read-write process at a time, and other processes cannot even read it while
that process holds it; the requirements (dashboard reading while runs write, several workers at once, a crash
loses at most the unit in flight, several machines in one view) all follow from never sharing a writable file
instead:

- each ``write_*`` call writes one part file under ``.tmp/``, fsyncs it, hashes it and ``os.replace``s it into
  the table folder under a name that carries the hash: readers see the whole part or nothing, a killed writer
  leaves whole files only (the part in flight is lost), and a part is never visible before its checksum is;
- writers never lock and never touch each other's files, so any number of processes may write at once;
- readers open an in-memory DuckDB with one view per table over ``read_parquet([<the table's parts>],
  union_by_name=true)``; every query first lists the table folders again, so a reader sees parts that appeared
  after it opened. The code's own empty table fixes every column's type (empty tables are queryable);
- integrity: a reader checks each part before it first reads it (the SHA-256 in its name, once per process while
  the file's stat is unchanged). A damaged part (truncated, overwritten, a flipped bit) is named in a
  ``StoreDamageWarning``, moved to ``quarantine/<table>/`` (nothing is deleted) and left out of every query; where
  the folder cannot be written it is left in place and skipped. The rest of the store stays readable.
  ``Store.damaged_parts()`` and ``python -m sixbit_tune.store verify <store>`` list them;
- combining machines: :meth:`Store.open_many` reads several folders as one (a ``store`` column tells them
  apart), which gives the same result as copying their part files into one folder.

Many small parts make reads slow (2,000 trial parts: 1.2 s per ``trials()``; after compaction 0.03 s, 2 CPU
cores): ``store.compact()`` / ``python -m sixbit_tune.store compact <store>`` merges the parts of the entity
tables into one, safely while readers and writers run (search may call it now and then).

Fact tables (``block_steps``, ``layer_steps``, ``attn_steps``) are append-only: rows written twice count twice, so write each
prompt once (a resumed profile uses a new run_id). Entity tables are keyed and the latest write of a
key wins in the views (a trial written RUNNING then COMPLETE shows once, COMPLETE): ``runs`` (run_id),
``trials`` (study, number), ``predictors`` (fit_id, layer, format), ``attn_predictors`` (fit_id, block_index,
branch, format), ``policies`` (name). Their views add
``created`` (first write of the key) and ``updated`` (latest write). "Latest" is the part file name order: the
writer's wall clock in ns (strictly increasing per writer). A run killed before ``finish_run`` stays ``running``
(look at ``updated``/``host``/``pid``). Every view has a ``store`` column (the folder, or the label given to
:meth:`Store.open_many`). Column definitions: ``sixbit_tune.store.schema`` (``TABLES``).

Several processes may call ``Store.create(path, exist_ok=True)`` at once (one creates, the others open).
``query`` returns pandas' default conversion (an integer column holding NULLs comes out as float64); use
``to_arrow`` for exact types.

Versions: ``SCHEMA_VERSION`` is kept in ``meta.json``. Opening a store of another version raises
``sixbit_tune.errors.StoreSchemaError`` naming both versions and the remedy (``python -m sixbit_tune.store
migrate <store>`` when a migration exists, upgrading sixbit-tune for a newer store, re-creating it otherwise).
See ``sixbit_tune.store.migrations``. Version 1 stores (parts without checksums) stay readable without migrating:
``Store.open(path, read_only=True)`` reads them with a ``StoreChecksumWarning``, checking each part by decoding it
completely (this finds truncated and garbage parts, not every changed value); writing to them needs the
migration (1 -> 2 renames each part to carry its SHA-256, setting aside parts that do not decode). Version 2 stores
(no attention tables) are read the same way, their attention tables empty; 2 -> 3 adds those tables.

Writable opens (``Store.open(path)``, ``Store.create``) first create and remove a probe file in every folder
writers use, and raise ``StoreReadOnlyError`` (a ``StoreError`` and a ``PermissionError``) when the store cannot be
written: profile, fit, search and export open their store before any work, so a read-only store stops them
at once. Permission bits alone would not tell (root ignores them; a read-only mount does not show in them).

Public API
----------
::

    from sixbit_tune.store import Store, gpu_info, versions

    store = Store.create(path, exist_ok=False)       # -> Store; FileExistsError if already a store
    store = Store.open(path, read_only=False)        # FileNotFoundError / StoreSchemaError / StoreReadOnlyError
    both  = Store.open_many([dir_a, dir_b])          # or {"machine-a": dir_a, ...}; read-only union

    w = store.writer(worker_id=None)                 # one per process/worker; PermissionError if read-only
    run_id = w.begin_run(kind, model_spec, *, model_class=None, family=None, config_hash=None,
                         settings=None, gpu=None, versions=None, seed=None, timesteps=None, run_id=None) -> str
    w.write_block_steps(rows, *, run_id=None) -> Path   # rows: pyarrow Table | pandas DataFrame |
    w.write_layer_steps(rows, *, run_id=None) -> Path   #       dict of columns | list of row dicts
    w.write_attn_steps(rows, *, run_id=None) -> Path
    w.finish_run(run_id, status="finished", *, timesteps=None, error=None)   # status "finished" | "failed"
    fit_id = w.write_predictors(rows, *, run_ids, fit_id=None, settings=None) -> str
    w.write_attn_predictors(rows, *, run_ids, fit_id, settings=None) -> Path
    w.write_trial(study, number, *, state, params=None, latency_ms=None, speedup=None, peak_memory_bytes=None,
                  weight_bytes=None, cache_bytes=None, psnr_db=None, ssim=None, quality=None, skip_share=None,
                  nvfp4_share=None, fail_reason=None, gpu=None, nvfp4_path=None, kernel_path=None,
                  policy=None) -> Path
    w.write_policy(name, policy, *, path=None, study=None, trial=None) -> Path

    store.query(sql, params=None) -> pandas.DataFrame    # values ONLY through params (? or $name)
    store.to_arrow(sql, params=None) -> pyarrow.Table
    store.runs(*, kind=None, run_ids=None); store.block_steps(run_ids=None)
    store.layer_steps(run_ids=None, *, formats=None); store.predictors(fit_id=None); store.latest_fit_id()
    store.attn_steps(run_ids=None, *, formats=None); store.attn_predictors(fit_id=None)
    store.trials(study=None); store.policies()
    store.compact() -> dict[str, int]                    # merge entity-table parts; safe beside readers/writers
    store.damaged_parts() -> list[DamagedPart]           # (table, path, reason, moved_to) of parts set aside
    check_part(path) -> str | None                       # what is wrong with one part file, or None

    gpu_info(cuda_index=0) -> dict | None   # {"name","driver","memory_bytes","compute_capability","uuid"}
    versions() -> dict                      # torch, diffusers, triton, ..., sixbit_tune, python

Columns (``sixbit_tune.store.schema``; * = required):

- runs: run_id*, kind* (profile|search|bench|fit), status* (running|finished|failed), model_spec*, model_class,
  family, config_hash, gpu_name, gpu_driver, gpu_memory_bytes, gpu_compute_capability, gpu_uuid (NULL without a
  GPU), versions JSON, settings JSON, seed, timesteps DOUBLE[], error, pid, host, worker_id, created, updated.
- block_steps: run_id*, prompt_index*, prompt, branch* (cond|uncond), step*, timestep, block_index*, block,
  gamma*, delta_change, delta_cos, delta_norm.
- layer_steps: run_id*, prompt_index*, branch*, step*, block_index*, layer*, format* (nvfp4|int8), act_err,
  out_err*.
- attn_steps: run_id*, prompt_index*, branch*, step*, block_index*, format* (fp8|int8: the Q·Kᵀ format),
  attn_err*.
- predictors: fit_id*, layer*, format*, alpha, beta, r2, n*, trusted*, run_ids* VARCHAR[], settings JSON, host,
  worker_id, created, updated.
- attn_predictors: fit_id*, block_index*, branch*, format*, alpha, beta, r2, n*, rmse, mean_err, ss_tot, pooled*,
  trusted*, run_ids* VARCHAR[], settings JSON, host, worker_id, created, updated.
- trials: study*, number*, state* (COMPLETE|FAIL|PRUNED|RUNNING), params JSON, latency_ms, speedup,
  peak_memory_bytes, weight_bytes, cache_bytes, psnr_db (may be +inf), ssim, quality JSON, skip_share,
  nvfp4_share, fail_reason (required for FAIL), gpu, nvfp4_path (emulated|native|reference), kernel_path,
  policy JSON, host, worker_id, created, updated.
- policies: name*, study, trial, path, policy* JSON, host, worker_id, created, updated.

NaN is rejected everywhere (``NonFiniteError``; use None/NULL for "missing"); ±Inf too except ``psnr_db``.

Example::

    store = Store.create("runs/h200")
    w = store.writer("gpu0")
    rid = w.begin_run("profile", "tiny:wan", settings={"steps": 4}, gpu=gpu_info(), versions=versions())
    w.write_block_steps({"prompt_index": [0], "branch": ["cond"], "step": [0], "block_index": [0],
                         "gamma": [0.12]}, run_id=rid)
    w.finish_run(rid)
    store.query("SELECT block_index, avg(gamma) FROM block_steps WHERE run_id = ? GROUP BY ALL", [rid])
"""

from __future__ import annotations

from sixbit_tune.errors import StoreError, StoreReadOnlyError
from sixbit_tune.store.env import gpu_info, versions
from sixbit_tune.store.migrations import MIGRATIONS, Migration, migrate
from sixbit_tune.store.schema import (
    ATTENTION_FORMATS,
    BRANCHES,
    LAYER_FORMATS,
    RUN_KINDS,
    RUN_STATUSES,
    SCHEMA_VERSION,
    TABLES,
    TRIAL_STATES,
)
from sixbit_tune.store.store import (
    GPU_KEYS,
    DamagedPart,
    Store,
    StoreChecksumWarning,
    StoreDamageWarning,
    StoreWriter,
    check_part,
)

__all__ = [
    "ATTENTION_FORMATS",
    "BRANCHES",
    "DamagedPart",
    "GPU_KEYS",
    "LAYER_FORMATS",
    "MIGRATIONS",
    "Migration",
    "RUN_KINDS",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "Store",
    "StoreChecksumWarning",
    "StoreDamageWarning",
    "StoreError",
    "StoreReadOnlyError",
    "StoreWriter",
    "TABLES",
    "TRIAL_STATES",
    "check_part",
    "gpu_info",
    "migrate",
    "versions",
]
