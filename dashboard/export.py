"""Export from the dashboard: a safe file name inside the policies folder, then the search's own exporter.

The policy itself is built, validated and written by :func:`sixbit_tune.search.export.export_trial` (the same code
as ``sixbit-tune export``); this module only turns a user-typed name into a path that cannot leave the policies
folder, and returns the written bytes for the download button.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_export_name(name: str) -> str:
    """The file name (with ``.json``) for an export name, or ValueError saying why the name is refused.

    A name is one plain file name: letters, digits, ``_``, ``-`` and ``.``, starting with a letter or digit, at most
    128 characters, optionally ending in ``.json``. Path separators, ``..``, absolute paths, drive letters and
    anything else that could point outside the policies folder are rejected (never silently rewritten).
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError("give the policy a name (letters, digits, '_', '-', '.')")
    if name != name.strip():
        raise ValueError(f"policy name {name!r} has leading or trailing spaces")
    if "/" in name or "\\" in name or os.sep in name or (os.altsep and os.altsep in name):
        raise ValueError(f"policy name {name!r} contains a path separator: give a plain file name")
    if ".." in name:
        raise ValueError(f"policy name {name!r} contains '..'")
    if Path(name).is_absolute() or ":" in name:
        raise ValueError(f"policy name {name!r} is an absolute path or has a drive letter")
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"policy name {name!r} may only hold letters, digits, '_', '-' and '.', start with a letter or digit, "
            "and be at most 128 characters"
        )
    return name if name.endswith(".json") else f"{name}.json"


def export_path(name: str, policies_dir: str | os.PathLike) -> Path:
    """``<policies_dir>/<name>.json`` after :func:`check_export_name`, checked to resolve inside ``policies_dir``
    (a symlink planted in the folder cannot redirect the write either)."""
    root = Path(policies_dir).resolve()
    path = (root / check_export_name(name)).resolve()
    if path.parent != root:
        raise ValueError(f"policy name {name!r} resolves outside {root}")
    return path


def export_policy(
    store_root: str | os.PathLike,
    study: str,
    number: int,
    name: str,
    policies_dir: str | os.PathLike,
    storage: str | None = None,
) -> tuple[Path, bytes, bool]:
    """Write trial ``number`` of ``study`` as ``<policies_dir>/<name>.json`` and record it in the store.

    Args:
        store_root: the store folder holding the study's trials (and, by default, its ``optuna.journal``).
        study, number: the trial.
        name: the export name (:func:`check_export_name`).
        policies_dir: the policies folder (created if missing).
        storage: the study's Optuna storage when it is not ``<store>/optuna.journal``.

    Returns:
        ``(path, json_bytes, feasible)``: the written file, its bytes (for a download) and whether the trial met
        the study's quality floor.

    Raises:
        ValueError: a refused name, an unknown study or trial, a trial that did not complete.
        PolicyError: the trial's policy does not validate.
    """
    from sixbit_tune.search.export import export_trial

    path = export_path(name, policies_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    written, _policy, ok = export_trial(store_root, study, int(number), path, storage)
    return Path(written), Path(written).read_bytes(), ok
