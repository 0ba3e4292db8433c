"""Turn a finished trial into a deployable policy file: the trial's policy plus provenance and measured figures."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import optuna
from optuna.trial import TrialState

from sixbit_tune import __version__
from sixbit_tune import policy as P
from sixbit_tune.search.policies import gptq_layers
from sixbit_tune.search.study import feasible, open_storage


def load_study(store: str | Path, study: str, storage: str | None = None) -> optuna.Study:
    """Load a search study from its storage (default: the store's journal file).

    Raises:
        ValueError: no such study (the message lists the studies there are).
    """
    url = storage or str(Path(store).absolute() / "optuna.journal")
    if "://" not in url and not Path(url).exists():
        raise ValueError(f"no Optuna journal at {url}: run `sixbit-tune search --store {store}` first")
    st = open_storage(url)
    names = [s.study_name for s in optuna.get_all_study_summaries(st, include_best_trial=False)]
    if study not in names:
        raise ValueError(f"no study {study!r} in {url}; studies there: {names}")
    return optuna.load_study(study_name=study, storage=st)


def trial_policy(study: optuna.Study, number: int, require_feasible: bool = False) -> tuple[P.Policy, bool]:
    """The policy trial ``number`` measured, with its provenance and measured figures; and its feasibility.

    Raises:
        ValueError: no such trial, a trial that did not complete (FAIL says why), or (``require_feasible``) a
            trial below the quality floor.
    """
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise ValueError(f"study {study.study_name!r} has no trial {number} (trials 0..{len(trials) - 1})")
    t = trials[number]
    if t.state != TrialState.COMPLETE:
        why = t.user_attrs.get("fail_reason")
        raise ValueError(
            f"trial {number} of {study.study_name!r} is {t.state.name}" + (f" ({why})" if why else "")
            + ": only completed trials can be exported"
        )
    ok = feasible(t)
    if require_feasible and not ok:
        raise ValueError(
            f"trial {number} is below the quality floor ({study.user_attrs.get('quality_floor_db')} dB PSNR); "
            "pick a feasible trial"
        )
    f = t.user_attrs.get("figures") or {}
    policy = P.Policy.from_dict(t.user_attrs["policy"])
    measured = P.Measured(
        latency_ms=f.get("latency_ms"),
        speedup=f.get("speedup"),
        peak_memory_bytes=f.get("peak_memory_bytes"),
        weight_bytes=f.get("weight_bytes"),
        cache_bytes=f.get("cache_bytes"),
        psnr_db=f.get("psnr_db"),
        ssim=None if f.get("ssim") is None else max(-1.0, min(1.0, f["ssim"])),
        nvfp4_share=f.get("nvfp4_share"),
        skip_share=f.get("skip_share"),
    )
    provenance = P.Provenance(
        study=study.study_name,
        trial=number,
        profile_runs=list(study.user_attrs.get("profile_runs") or []),
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        tool_version=__version__,
    )
    return policy.replace(measured=measured, provenance=provenance), ok


def hessians_path(out: str | Path) -> Path:
    """Where the export of a policy to ``out`` writes its calibration Hessians (``NAME.nvfp4-hessians.pt`` beside
    ``NAME.json``)."""
    out = Path(out)
    return out.with_name(out.stem + ".nvfp4-hessians.pt")


def write_policy_hessians(store: str | Path, study: optuna.Study, policy: P.Policy, out: str | Path) -> Path | None:
    """Write the calibration Hessians the policy's gptq-encoded layers need (``{layer: [K, K]}``, what
    ``apply_policy(..., nvfp4_hessians=torch.load(path))`` takes) to :func:`hessians_path` of ``out``, from the
    profile runs the study was fitted on. None (nothing written) when no layer is gptq-encoded.

    Raises:
        CalibrationMissingError: the profile runs recorded no Hessians.
        ValueError: a gptq-encoded layer has no Hessian in them.
    """
    layers = gptq_layers(policy)
    if not layers:
        return None
    from sixbit_tune.profiling.calibration import load_hessians, save_atomic

    hess, _ = load_hessians(store, study.user_attrs.get("profile_runs") or [])
    missing = [n for n in layers if n not in hess]
    if missing:
        raise ValueError(f"the profile's Hessians lack {len(missing)} gptq-encoded layer(s), e.g. {missing[0]!r}")
    return save_atomic({n: hess[n] for n in layers}, hessians_path(out))


def export_trial(
    store: str | Path,
    study: str,
    number: int,
    out: str | Path,
    storage: str | None = None,
    require_feasible: bool = False,
) -> tuple[Path, P.Policy, bool]:
    """Write trial ``number``'s policy to ``out`` (validated JSON) and record it in the store's ``policies``.
    A policy whose NVFP4 weights the gptq encoder encodes gets its calibration Hessians beside it
    (:func:`write_policy_hessians`; written first, so a policy file never lacks them)."""
    from sixbit_tune.store import Store

    with Store.open(store) as st:  # a store that cannot be written is refused before any file is written
        s = load_study(store, study, storage)
        policy, ok = trial_policy(s, number, require_feasible)
        write_policy_hessians(store, s, policy, out)
        path = P.save(policy, out)
        st.writer().write_policy(Path(out).stem, policy.to_dict(), path=str(Path(out).absolute()), study=study,
                                 trial=number)
    return path, policy, ok
