"""The Optuna study: storages, creation and resumption, the objective, workers, mirroring into the store.

Storages: a journal file (``JournalStorage(JournalFileBackend(path))``, default
``<store>/optuna.journal``) for several processes on one host; an RDB URL (``postgresql://...``) for several hosts.
On several hosts, each runs ``sixbit-tune search --storage <url>`` on its own copy of the store (same profile and
fit: the fit id is checked); each host mirrors its trials into its own store, and ``Store.open_many`` reads them
together.

Trials. The objectives are (latency_ms ↓, memory_bytes ↓, psnr_db ↑), ``memory_bytes`` the measured peak
(:mod:`sixbit_tune.search.memory`), with the constraint ``quality_floor_db − psnr_db ≤ 0`` and, with
``max_memory_gib``, ``peak − max_memory ≤ 0`` (in GiB): a trial above the memory budget completes and is recorded
as infeasible, and the trial chosen for export is the fastest feasible one. The corner policies (:func:`~sixbit_tune.search.runner.corners_of`) are
enqueued when the study is created, marked by ``user_attrs["reference"]``. Every trial is mirrored into the
store's ``trials`` table: RUNNING when it starts, then COMPLETE or FAIL (with its reason). Out-of-memory and
non-finite quality fail the trial and the study goes on; any other exception stops the worker.

Trial count. ``trials`` is the study's total. Each worker runs trials while the study holds fewer than that.
``--workers N`` on one host splits the missing trials into exact per-worker quotas, so the total is exact. Several
independent ``search`` commands on one RDB study (several hosts) may overshoot by at most one trial per extra host:
a trial numbered beyond the total is pruned at once (state PRUNED, ``user_attrs["surplus"]``).

Creation and resumption. A study's search space and settings are kept in the study's user attributes and must
match on resume (else: a clear error asking for another ``--study``). Creating a study (the Optuna study, its
settings, the enqueued corners) runs under a creation lock — a lock file next to a journal, an advisory lock on
PostgreSQL, a lock file next to an SQLite database — and ends by setting ``user_attrs["settings_recorded"]``. A
process that finds a study without that mark (its creator was killed half-way) finishes the creation: it records
the settings still missing, checks those present, and enqueues the corners not yet enqueued, so each corner is
enqueued exactly once however many workers start together. A trial left RUNNING by a process that died is marked
FAIL before new trials start: on this host when its recorded pid is gone; on an RDB storage also through Optuna's
heartbeat (``fail_stale_trials``).

Journal files are opened through :class:`~sixbit_tune.search.journal.RecoveringJournalBackend`: the partial last
line a writer killed mid-write leaves is moved aside to a named backup (with a warning), never glued to.

Workers. ``--workers N`` spawns ``python -m sixbit_tune.search.worker`` processes, which end when the parent
process ends (however it ends). A worker that dies (killed, or an error) does not stop the others; when they are
done, the dead worker's RUNNING trial is marked FAIL and :class:`WorkerDiedError` names the worker, its pid and its
exit code or signal in one line. The study stays usable: running the same command again resumes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from sixbit_tune.errors import SixbitError
from sixbit_tune.search.config import DIRECTIONS, OBJECTIVES, SearchConfig
from sixbit_tune.search.runner import TRIAL_FAILURES, SearchContext, corners_of, memory_metric
from sixbit_tune.search.space import SearchSpace, attention_quantiles, derive_space, profile_quantiles

HEARTBEAT_S = 20
GRACE_S = 60
#: Keys of the study's user attributes that must agree when a study is resumed.
_FROZEN_KEYS = ("space", "quality_floor_db", "generation", "prompts", "seeds", "fit_id", "model", "device",
                "memory_metric", "dmpq", "max_memory_gib", "weights", "nvfp4_encoder", "measured_menu")
#: Frozen settings that studies created before they existed lack, and the value those studies had.
_DEFAULTS = {"dmpq": True, "max_memory_gib": None, "weights": "mixed", "nvfp4_encoder": "standard",
             "measured_menu": False}
#: The study's user attribute set last when a study is created: without it, the creation was cut short.
SETTINGS_RECORDED = "settings_recorded"


class WorkerDiedError(SixbitError, RuntimeError):
    """A search worker process ended with an error or was killed; the message names it and how it ended."""


class NoTrialFitsError(SixbitError, ValueError):
    """No completed trial of a study fits its memory budget; the message names the smallest peak measured."""


# ----------------------------------------------------------------------------------------------- storages
def open_storage(url_or_path: str) -> optuna.storages.BaseStorage:
    """An RDB storage for a URL (``scheme://...``), else a journal file storage at that path."""
    if "://" in url_or_path:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url_or_path, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                engine_kwargs={"pool_pre_ping": True},
            )
    from optuna.storages.journal import JournalStorage

    from sixbit_tune.search.journal import RecoveringJournalBackend

    path = Path(url_or_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(RecoveringJournalBackend(str(path)))


@contextlib.contextmanager
def creation_lock(storage: optuna.storages.BaseStorage, url_or_path: str, study_name: str):
    """Hold the lock under which a study is created, across processes (and hosts, on PostgreSQL).

    A journal file: ``flock`` on ``<journal>.create.lock``. PostgreSQL: ``pg_advisory_lock`` on a key derived from the
    study name. SQLite: ``flock`` on ``<database>.create.lock``. Other databases: no lock (two processes creating
    the same study at the same moment may then enqueue the corners twice). The kernel or the database server
    releases these locks when the process holding them dies.
    """
    if isinstance(storage, optuna.storages.RDBStorage):
        engine = storage.engine
        if engine.dialect.name == "postgresql":
            from sqlalchemy import text

            digest = hashlib.sha256(f"sixbit-tune study {study_name}".encode()).digest()
            key = int.from_bytes(digest[:8], "big", signed=True)
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
                conn.commit()
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()
            return
        database = engine.url.database if engine.dialect.name == "sqlite" else None
        if not database or database == ":memory:":
            yield
            return
        lock_path = Path(database).absolute().with_name(Path(database).name + ".create.lock")
    else:
        lock_path = Path(url_or_path).absolute().with_name(Path(url_or_path).name + ".create.lock")
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def make_sampler(config: SearchConfig, worker: int = 0) -> optuna.samplers.TPESampler:
    """Seeded multi-objective TPE (constraints come from ``trial.set_constraint``).

    The enqueued corners are not random draws: the random startup phase comes after them, so the startup trials
    are reproducible draws of the seed. (Later TPE draws depend on the measured objectives, wall-clock latency
    among them, so two runs agree on them only as far as their measurements agree.)
    """
    corners = len(corners_of(config.weights)) if config.corners else 0
    return optuna.samplers.TPESampler(
        seed=config.seed + worker, n_startup_trials=corners + config.n_startup, multivariate=True, constant_liar=True
    )


def study_attrs(config: SearchConfig, ctx: SearchContext, space: SearchSpace) -> dict:
    return {
        "space": space.to_dict(),
        "quality_floor_db": config.quality_floor_db,
        "generation": ctx.generation.to_dict(),
        "prompts": list(ctx.prompts),
        "seeds": list(config.seeds),
        "fit_id": ctx.predictors.fit_id,
        "profile_runs": list(ctx.predictors.run_ids),
        "model": config.model,
        "device": ctx.device,
        "memory_metric": memory_metric(ctx.device),
        "dmpq": config.dmpq,
        "max_memory_gib": config.max_memory_gib,
        "weights": config.weights,
        "nvfp4_encoder": config.nvfp4_encoder,
        "measured_menu": config.measures_menu,
        "objectives": list(OBJECTIVES),
        "sampler": {"name": "TPESampler", "seed": config.seed, "n_startup_trials": config.n_startup},
        "trials": config.trials,
    }


def create_or_load(config: SearchConfig, ctx: SearchContext, worker: int = 0) -> optuna.Study:
    """Create the study (space from the profile, corners enqueued, baseline measured) or load it and check it.

    Creation (or finishing a creation cut short) runs under :func:`creation_lock`; loading a study whose settings
    are recorded takes no lock.
    """
    storage = open_storage(config.storage_url)
    sampler = make_sampler(config, worker)
    study = _load_recorded(storage, config.study_name, sampler)
    if study is not None:
        _check_settings(study, config, ctx)
    else:
        with creation_lock(storage, config.storage_url, config.study_name):
            study = optuna.create_study(
                storage=storage,
                study_name=config.study_name,
                directions=list(DIRECTIONS),
                sampler=sampler,
                load_if_exists=True,
            )
            if study.user_attrs.get(SETTINGS_RECORDED):  # recorded by another process meanwhile
                _check_settings(study, config, ctx)
            else:
                _record_settings(study, config, ctx)
    if "baseline" not in study.user_attrs:
        study.set_user_attr("baseline", ctx.measure_baseline().to_dict())
    return study


def _load_recorded(storage, study_name: str, sampler) -> optuna.Study | None:
    """The study when it exists with its settings recorded, else None."""
    try:
        storage.get_study_id_from_name(study_name)
    except KeyError:
        return None
    study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)
    return study if study.user_attrs.get(SETTINGS_RECORDED) else None


def _settings_diffs(config: SearchConfig, attrs: dict, mine: dict) -> None:
    """Raise when a frozen setting recorded in the study differs from this run's (settings not recorded pass)."""
    def recorded(k):
        return attrs[k] if k in attrs else _DEFAULTS[k]

    # a study whose creation finished lacks a setting only when it was created before the setting existed
    finished = bool(attrs.get(SETTINGS_RECORDED))
    keys = [k for k in _FROZEN_KEYS if k != "space" and (k in attrs or (finished and k in _DEFAULTS))]
    diffs = [k for k in keys if _norm(recorded(k)) != _norm(mine.get(k))]
    if diffs:
        detail = "; ".join(f"{k}: study {recorded(k)!r} vs now {mine.get(k)!r}" for k in diffs)
        raise ValueError(
            f"study {config.study_name!r} in {config.storage_url} was created with other settings ({detail}); "
            "resume it with the same settings or pass another --study"
        )


def _check_settings(study: optuna.Study, config: SearchConfig, ctx: SearchContext) -> None:
    attrs = study.user_attrs
    _settings_diffs(config, attrs, study_attrs(config, ctx, SearchSpace.from_dict(attrs["space"])))


def _record_settings(study: optuna.Study, config: SearchConfig, ctx: SearchContext) -> None:
    """Record the settings, metric names and corners a study is created with; idempotent, so that it also finishes
    a creation cut short: settings present are checked and kept, corners already enqueued are not enqueued again.
    """
    attrs = study.user_attrs
    if "space" in attrs:
        space = SearchSpace.from_dict(attrs["space"])
    else:
        tau_q, delta_q = profile_quantiles(ctx.store, ctx.predictors.fit_id, ctx.predictors.run_ids)
        attn_q, attn_format = attention_quantiles(ctx.store, ctx.predictors.fit_id, ctx.predictors.run_ids)
        space = derive_space(tau_q, delta_q, ctx.generation.steps, dmpq=config.dmpq, attn_q=attn_q,
                             attn_format=attn_format)
    mine = study_attrs(config, ctx, space)
    _settings_diffs(config, attrs, mine)
    for k, v in mine.items():
        if k not in attrs:
            study.set_user_attr(k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(OBJECTIVES))
    if config.corners:
        # DMPQ without the cache at the first quartile of the predicted errors: a conservative mix (about a
        # quarter of the dynamic layer-calls in NVFP4), between the two static corners.
        q = (space.tau_quantiles or {}).get("q25")
        dmpq_tau = q if q is not None else 0.5 * (space.tau_low + space.tau_high)
        taus = {"static_int8": space.tau_low, "static_nvfp4_robust": space.tau_low, "static_nvfp4": space.tau_high,
                "dmpq_no_cache": dmpq_tau}
        enqueued = {t.user_attrs.get("reference") for t in study.get_trials(deepcopy=False)}
        for corner in corners_of(config.weights):
            if corner not in enqueued:
                study.enqueue_trial(space.corner(taus[corner], 0.0), user_attrs={"reference": corner})
    study.set_user_attr(SETTINGS_RECORDED, True)


def _norm(v):
    return json.loads(json.dumps(v, sort_keys=True)) if v is not None else None


# ----------------------------------------------------------------------------------------------- stale trials
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_trials(study: optuna.Study, writer=None) -> list[int]:
    """Mark FAIL every RUNNING trial whose worker died (same host: pid gone; RDB: stale heartbeat)."""
    failed = []
    storage = study._storage
    if isinstance(storage, optuna.storages.RDBStorage):
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        optuna.storages.fail_stale_trials(study)
        after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        failed += sorted(before - after)
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w = t.user_attrs.get("worker") or {}
        if w.get("host") == host and isinstance(w.get("pid"), int) and w["pid"] != os.getpid() and not _pid_alive(
            w["pid"]
        ):
            reason = f"worker process {w['pid']} on {host} died while the trial was running"
            storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
            if storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                failed.append(t.number)
    if writer is not None:
        for t in study.get_trials(deepcopy=False):
            if t.number in failed:
                writer.write_trial(
                    study.study_name,
                    t.number,
                    state="FAIL",
                    params=t.params,
                    fail_reason=t.user_attrs.get("fail_reason") or "worker died (stale heartbeat)",
                )
    return failed


# ----------------------------------------------------------------------------------------------- objective
class Objective:
    """Optuna objective of one worker: build, apply, measure, mirror."""

    def __init__(self, config: SearchConfig, ctx: SearchContext, study: optuna.Study, writer):
        self.config = config
        self.ctx = ctx
        self.space = SearchSpace.from_dict(study.user_attrs["space"])
        self.baseline = study.user_attrs.get("baseline") or {}
        self.floor = float(study.user_attrs["quality_floor_db"])
        self.max_memory_gib = study.user_attrs.get("max_memory_gib")
        self.study_name = study.study_name
        self.writer = writer
        self.total = config.trials

    def __call__(self, trial: optuna.Trial):
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        params = self.space.suggest(trial)
        if trial.number >= self.total:
            trial.set_user_attr("surplus", True)
            self.writer.write_trial(self.study_name, trial.number, state="PRUNED", params=params)
            raise optuna.TrialPruned(f"trial {trial.number} is beyond the study's {self.total} trials")
        corner = trial.user_attrs.get("reference")
        w = self.writer
        w.write_trial(self.study_name, trial.number, state="RUNNING", params=params)
        try:
            policy = self.ctx.build_policy(params, corner)
            figures, _stats = self.ctx.measure(policy)
        except BaseException as e:
            reason = f"{type(e).__name__}: {e}"[:2000]
            trial.set_user_attr("fail_reason", reason)
            w.write_trial(self.study_name, trial.number, state="FAIL", params=params, fail_reason=reason)
            raise
        base = self.baseline.get("latency_ms")
        speedup = base / figures.latency_ms if base and figures.latency_ms > 0 else None
        feasible_gap = self.floor - figures.psnr_db
        trial.set_constraint("quality_floor", feasible_gap)
        memory_gap = None
        if self.max_memory_gib is not None:
            memory_gap = figures.memory_bytes / 2**30 - float(self.max_memory_gib)
            trial.set_constraint("max_memory", memory_gap)
        d = figures.to_dict()
        d["speedup"] = speedup
        trial.set_user_attr("figures", d)
        trial.set_user_attr("policy", policy.to_dict())
        w.write_trial(
            self.study_name,
            trial.number,
            state="COMPLETE",
            params=params,
            latency_ms=figures.latency_ms,
            speedup=speedup,
            peak_memory_bytes=figures.peak_memory_bytes,
            weight_bytes=figures.weight_bytes,
            cache_bytes=figures.cache_bytes,
            psnr_db=figures.psnr_db,
            ssim=figures.ssim,
            quality={
                "latent_rel_l2": figures.latent_rel_l2,
                "psnr_min_db": figures.psnr_min_db,
                "lpips": figures.lpips,
                "memory_bytes": figures.memory_bytes,
                "memory_metric": memory_metric(self.ctx.device),
                "feasible": feasible_gap <= 0 and (memory_gap is None or memory_gap <= 0),
                "quality_floor_db": self.floor,
                "max_memory_gib": self.max_memory_gib,
                "memory_feasible": None if memory_gap is None else memory_gap <= 0,
                "reference": corner,
                "latencies_ms": figures.latencies_ms,
            },
            skip_share=figures.skip_share,
            nvfp4_share=figures.nvfp4_share,
            gpu=policy.target.gpu,
            nvfp4_path=policy.target.nvfp4_path,
            kernel_path=json.dumps(figures.execution, sort_keys=True) if figures.execution else None,
            policy=policy.to_dict(),
        )
        return figures.latency_ms, float(figures.memory_bytes), figures.psnr_db


def count_trials(study: optuna.Study) -> int:
    """Trials that ran or run (enqueued WAITING trials are not counted: they are yet to run)."""
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED,
                                                        TrialState.RUNNING)))


def pareto_size(study: optuna.Study) -> int:
    try:
        return len(study.best_trials)
    except (ValueError, RuntimeError):
        return 0


def progress_postfix(study: optuna.Study) -> dict:
    """What the progress bar shows besides the count: the Pareto front's size, the measured peak memory of the
    latest completed trial, and (with a memory budget) how many completed trials fit it."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if (t.user_attrs.get("figures") or {}).get("memory_bytes") is not None]
    post: dict = {"pareto": pareto_size(study)}
    if done:
        post["peak"] = _bytes(max(done, key=lambda t: t.datetime_complete or t.datetime_start).user_attrs[
            "figures"]["memory_bytes"])
    budget = study.user_attrs.get("max_memory_gib")
    if budget is not None:
        fits = sum(1 for t in done if t.user_attrs["figures"]["memory_bytes"] <= budget * 2**30)
        post["fit"] = f"{fits}/{len(done)}<={_gib(budget)}"
    return post


def check_memory_fit(study: optuna.Study) -> None:
    """Raise :class:`NoTrialFitsError` when the study has a memory budget and no completed trial fits it.

    Raises:
        NoTrialFitsError: naming the budget and the smallest peak measured (and its trial).
    """
    budget = study.user_attrs.get("max_memory_gib")
    if budget is None:
        return
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if (t.user_attrs.get("figures") or {}).get("memory_bytes") is not None]
    if not done:
        raise NoTrialFitsError(f"no trial of study {study.study_name!r} completed, so none is known to fit "
                               f"--max-memory {budget} GiB")
    if any(t.user_attrs["figures"]["memory_bytes"] <= budget * 2**30 for t in done):
        return
    small = min(done, key=lambda t: (t.user_attrs["figures"]["memory_bytes"], t.number))
    peak = small.user_attrs["figures"]["memory_bytes"]
    raise NoTrialFitsError(
        f"no trial of study {study.study_name!r} fits --max-memory {budget} GiB ({int(budget * 2**30)} bytes): "
        f"the smallest peak measured is {peak / 2**30:.4g} GiB ({peak} bytes, "
        f"{study.user_attrs.get('memory_metric')}) in trial {small.number} of {len(done)} completed; "
        "raise --max-memory to at least that, or search in a new --study with other settings"
    )


# ----------------------------------------------------------------------------------------------- running
def run_worker(
    config: SearchConfig, quota: int | None = None, worker: int = 0, pipe=None, store=None, bar=None, ctx=None
):
    """Run trials of the study in this process until it holds ``config.trials`` (or ``quota`` trials ran)."""
    ctx = ctx or SearchContext(config, pipe=pipe, store=store)
    study = create_or_load(config, ctx, worker)
    writer = ctx.store.writer(worker_id=f"{socket.gethostname()}-{os.getpid()}-w{worker}")
    objective = Objective(config, ctx, study, writer)
    ran = 0
    while quota is None or ran < quota:
        if count_trials(study) >= config.trials:
            break
        study.optimize(objective, n_trials=1, catch=TRIAL_FAILURES)
        ran += 1
        if bar is not None:
            bar.n = min(count_trials(study), config.trials)
            bar.set_postfix(progress_postfix(study))
            bar.refresh()
    return study


def prepare(config: SearchConfig, pipe=None, store=None) -> tuple[optuna.Study, SearchContext, list[int]]:
    """Create or load the study, fail dead trials, make sure references and the baseline exist."""
    ctx = SearchContext(config, pipe=pipe, store=store)
    study = create_or_load(config, ctx)
    failed = fail_dead_trials(study, ctx.store.writer(worker_id=f"{socket.gethostname()}-{os.getpid()}-coord"))
    ctx.ensure_references()
    return study, ctx, failed


def run_search(config: SearchConfig, pipe=None, store=None, log=print) -> optuna.Study:
    """The whole search: prepare, then run the missing trials in this process or in ``config.workers`` workers.

    Returns:
        The study (reload it for the latest state when workers ran it).
    """
    if config.progress:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, ctx, failed = prepare(config, pipe=pipe, store=store)
    if failed:
        log(f"marked {len(failed)} trial(s) of dead workers FAIL: {failed}")
    have = count_trials(study)
    missing = max(0, config.trials - have)
    log(
        f"study {config.study_name!r} ({config.storage_url}): {have} trial(s) present, {missing} to run, "
        f"{config.workers} worker(s), device {ctx.device}"
    )
    bar = _bar(config, have)
    try:
        if missing == 0:
            pass
        elif config.workers == 1:
            run_worker(config, quota=missing, bar=bar, ctx=ctx)
        else:
            device = ctx.device
            del ctx  # free this process's copy of the model before the workers load theirs
            if device == "cuda":
                import gc

                import torch

                gc.collect()
                torch.cuda.empty_cache()
            run_workers(config, missing, study, bar)
    finally:
        if bar is not None:
            bar.close()
    return optuna.load_study(study_name=config.study_name, storage=open_storage(config.storage_url))


def _bar(config: SearchConfig, initial: int):
    if not config.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=config.trials, initial=min(initial, config.trials), desc="trials", unit="trial", file=sys.stderr)


def quotas(missing: int, workers: int) -> list[int]:
    base, extra = divmod(missing, workers)
    return [base + (1 if i < extra else 0) for i in range(workers)]


def run_workers(config: SearchConfig, missing: int, study: optuna.Study, bar=None) -> None:
    """Spawn one process per worker (``python -m sixbit_tune.search.worker``), pinning a GPU each when any.

    The workers end when this process ends, however it ends. A worker that dies does not stop the others; when all
    have ended, the RUNNING trials of dead workers are marked FAIL and :class:`WorkerDiedError` names each dead
    worker in one line.

    Raises:
        WorkerDiedError: a worker exited with an error or was killed.
    """
    import torch

    n_gpus = torch.cuda.device_count() if config.resolved_device == "cuda" else 0
    procs: list[tuple[int, subprocess.Popen]] = []
    for i, q in enumerate(quotas(missing, config.workers)):
        if q == 0:
            continue
        env = dict(os.environ)
        if not n_gpus and "OMP_NUM_THREADS" not in env:  # share the CPU cores instead of oversubscribing them
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // config.workers))
        if n_gpus:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = visible.split(",") if visible else [str(k) for k in range(n_gpus)]
            env["CUDA_VISIBLE_DEVICES"] = ids[i % len(ids)]
        cmd = [sys.executable, "-m", "sixbit_tune.search.worker", "--config", config.replace(progress=False).to_json(),
               "--quota", str(q), "--worker", str(i), "--parent-pid", str(os.getpid())]
        procs.append((i, subprocess.Popen(cmd, env=env)))
    try:
        while any(p.poll() is None for _, p in procs):
            time.sleep(1.0)
            if bar is not None:
                bar.n = min(count_trials(study), config.trials)
                bar.set_postfix(progress_postfix(study))
                bar.refresh()
    except BaseException:
        for _, p in procs:
            if p.poll() is None:
                p.terminate()
        for _, p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=30)
        raise
    dead = [(i, p) for i, p in procs if p.returncode != 0]
    if dead:
        raise WorkerDiedError(_dead_workers_message(config, study, dead))


def _dead_workers_message(config: SearchConfig, study: optuna.Study, dead) -> str:
    """One line: which workers died and how, the trials marked FAIL, and how to resume."""
    from sixbit_tune.store import Store

    try:
        with Store.open(config.store) as st:
            failed = fail_dead_trials(study, st.writer(worker_id=f"{socket.gethostname()}-{os.getpid()}-coord"))
        marked = f"; its running trial(s) {failed} marked FAIL" if failed else ""
    except Exception as e:  # the report must still come out; the next run marks them
        marked = f"; its running trials not marked FAIL yet ({type(e).__name__}: {e})"
    from sixbit_tune.profiling.lifeline import how_it_ended

    workers = "; ".join(
        f"search worker {i} (pid {p.pid}) {how_it_ended(p.returncode)}"
        + (" (its error is printed above)" if p.returncode > 0 else "")
        for i, p in dead
    )
    have = count_trials(study)
    return (
        f"{workers}{marked}; study {config.study_name!r} holds {have} of {config.trials} trials: "
        "run the same command again to resume it"
    )


# ----------------------------------------------------------------------------------------------- results
def feasible(trial: optuna.trial.FrozenTrial) -> bool:
    """Completed, at or above the quality floor and (when the study has one) within the memory budget."""
    return trial.state == TrialState.COMPLETE and all(v <= 0 for v in (trial.constraints or {}).values())


def _verdict(trial: optuna.trial.FrozenTrial) -> str:
    if trial.state == TrialState.FAIL:
        return "FAIL"
    if trial.state != TrialState.COMPLETE:
        return trial.state.name
    if feasible(trial):
        return "yes"
    over = [{"quality_floor": "quality", "max_memory": "memory"}.get(k, k)
            for k, v in (trial.constraints or {}).items() if v > 0]
    return f"no ({', '.join(over)})"


#: Completed trials :func:`summarize` lists (fastest first) when no trial is feasible.
_SHOWN_INFEASIBLE = 10


def summarize(study: optuna.Study) -> str:
    """A table of the reference trials and the feasible Pareto front (with no feasible trial: the fastest
    completed trials, each saying which constraint it misses)."""
    floor = study.user_attrs.get("quality_floor_db")
    budget = study.user_attrs.get("max_memory_gib")
    rows = []
    trials = study.get_trials(deepcopy=False)
    best = {t.number for t in study.best_trials} if trials else set()
    for t in trials:
        if t.user_attrs.get("reference") or t.number in best:
            rows.append(t)
    if not best:  # nothing feasible: show the fastest completed trials and why each is infeasible
        shown = {t.number for t in rows}
        done = sorted((t for t in trials if t.state == TrialState.COMPLETE and t.number not in shown and t.values),
                      key=lambda t: (t.values[0], t.number))
        rows = sorted(rows + done[:_SHOWN_INFEASIBLE], key=lambda t: t.number)
    counts = {s.name: sum(1 for t in trials if t.state == s) for s in TrialState}
    lines = [
        f"study {study.study_name}: {len(trials)} trials "
        + ", ".join(f"{k} {v}" for k, v in counts.items() if v)
        + f"; quality floor PSNR >= {floor} dB"
        + ("" if budget is None else f"; peak memory <= {_gib(budget)}")
        + f"; Pareto front (feasible) {len(best)}",
        f"{'#':>4} {'kind':<14} {'latency ms':>10} {'peak mem':>10} {'PSNR dB':>8} {'NVFP4':>6} {'skip':>6} feasible",
    ]
    for t in rows:
        f = t.user_attrs.get("figures") or {}
        kind = t.user_attrs.get("reference") or ("pareto" if t.number in best else "searched")
        lines.append(
            f"{t.number:>4} {kind:<14} {_fmt(f.get('latency_ms'), '.1f'):>10} {_bytes(f.get('memory_bytes')):>10} "
            f"{_fmt(f.get('psnr_db'), '.2f'):>8} {_pct(f.get('nvfp4_share')):>6} {_pct(f.get('skip_share')):>6} "
            f"{_verdict(t)}"
        )
    return "\n".join(lines)


def _fmt(v, spec) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _bytes(v) -> str:
    if v is None:
        return "-"
    if v >= 2**30:
        return f"{v / 2**30:.2f}G"
    return f"{v / 2**20:.2f}M" if v >= 2**20 else f"{v / 2**10:.1f}K"


def _gib(v) -> str:
    return f"{v:g} GiB"
