"""Calibration statistics a profile records beside the store's database: per in-block linear, ``sum xᵀx`` over its
inputs (the Hessian of the ``"gptq"`` NVFP4 weight encoder's proxy loss, ``apply_policy(..., nvfp4_hessians=...)``).

A profile run with ``ProfileConfig(nvfp4_hessians=True)`` writes one file per worker,
``<store>/calibration/<run_id>-w<worker>.nvfp4-hessians.pt`` (``torch.save`` of a dict: ``format``, ``run_id``,
``rows`` per layer, ``hessians`` per layer ``[K, K]``), once its worker has profiled all of its prompts.
:func:`load_hessians` sums the files of the runs a fit was made on.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from sixbit_tune.errors import SixbitError

#: The folder of the store that holds the calibration files.
CALIBRATION_DIR = "calibration"
#: File name suffix of one worker's Hessians.
HESSIANS_SUFFIX = ".nvfp4-hessians.pt"
#: The ``format`` key of a Hessians file.
HESSIANS_FORMAT = "sixbit-tune nvfp4 hessians 1"


class CalibrationMissingError(SixbitError, ValueError):
    """The calibration statistics a step needs were not recorded; the message says what to run."""


def hessians_path(store: str | os.PathLike, run_id: str, worker: int) -> Path:
    """Where worker ``worker`` of profile run ``run_id`` writes its Hessians."""
    return Path(store) / CALIBRATION_DIR / f"{run_id}-w{worker}{HESSIANS_SUFFIX}"


def save_atomic(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` of ``obj`` to ``path`` through a temporary file renamed into place (its folder is made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def save_hessians(path: str | os.PathLike, run_id: str, hessians: dict, rows: dict) -> Path:
    """Write one worker's Hessians atomically (:func:`save_atomic`)."""
    return save_atomic({"format": HESSIANS_FORMAT, "run_id": run_id, "rows": dict(rows), "hessians": dict(hessians)},
                       path)


def hessian_files(store: str | os.PathLike, run_ids: Iterable[str]) -> list[Path]:
    """The Hessians files of the profile runs ``run_ids`` in ``store`` (sorted)."""
    folder = Path(store) / CALIBRATION_DIR
    out: list[Path] = []
    for run_id in run_ids:
        out += sorted(folder.glob(f"{run_id}-w*{HESSIANS_SUFFIX}"))
    return out


def load_hessians(store: str | os.PathLike, run_ids: Iterable[str],
                  profile_hint: str = "") -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The Hessians of the profile runs ``run_ids`` summed over their workers and runs (float64, on the CPU), and
    the calibration rows per layer.

    Raises:
        CalibrationMissingError: none of the runs recorded Hessians (the message names the runs and how to record
            them; ``profile_hint`` is appended to it).
        ValueError: a file that is not a Hessians file, or Hessians of one layer with different shapes.
    """
    run_ids = list(run_ids)
    files = hessian_files(store, run_ids)
    if not files:
        raise CalibrationMissingError(
            f"the gptq NVFP4 weight encoder needs calibration Hessians, and the profile run(s) {run_ids} of "
            f"{store} recorded none (no {CALIBRATION_DIR}/<run>-w*{HESSIANS_SUFFIX}): profile again with "
            "`sixbit-tune profile ... --nvfp4-hessians` (ProfileConfig(nvfp4_hessians=True)) and fit that run"
            + (f"; {profile_hint}" if profile_hint else "")
        )
    hess: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    for f in files:
        data = torch.load(f, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("format") != HESSIANS_FORMAT:
            raise ValueError(f"{f} is not a sixbit-tune Hessians file (format {HESSIANS_FORMAT!r})")
        for name, h in data["hessians"].items():
            h = h.to(torch.float64)
            if name in hess:
                if hess[name].shape != h.shape:
                    raise ValueError(f"{f}: Hessian of {name} has shape {tuple(h.shape)}, other files "
                                     f"{tuple(hess[name].shape)}")
                hess[name] += h
            else:
                hess[name] = h.clone()
            rows[name] = rows.get(name, 0) + int(data["rows"].get(name, 0))
    return hess, rows
