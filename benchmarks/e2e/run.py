"""Running the contenders of each workload: time budget, one row per contender, errors recorded instead of ending the
run, the results file rewritten after every contender (partial results survive a timeout).

Timing: CUDA events around each pipeline call / transformer step after warm-up (compilation happens in the
warm-up, whose seconds are kept as ``warmup_s``), medians; peak memory is ``torch.cuda.max_memory_allocated``
reset before each contender's timed runs.
"""

from __future__ import annotations

import contextlib
import json
import signal
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

from .contenders import BASELINE, Contender, Context, choose_replay, contenders_for, missing, repeat_baseline
from .measurement import Clock, compile_blocks, compile_whole, environment, log, uncompile, weight_bytes
from .rendering import RESULTS_FILE, add_derived, dumps
from .workloads import Workload, make_runner


class ContenderTimeout(BaseException):
    """A contender ran past its time cap (a BaseException so that no eager-fallback ``except Exception`` retries)."""


def _chain(calls):
    calls = [c for c in calls if c is not None]
    if not calls:
        return None

    def on_generation(i: int) -> None:
        for c in calls:
            c(i)
    return on_generation


class Bench:
    def __init__(self, args, command: str):
        import torch

        self.args = args
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, args.dtype) if args.dtype else \
            (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.clock = Clock(self.device)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget_s
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results: list[dict] = []
        self.workloads: list[dict] = []
        self.replay: dict[str, Any] = {}
        if args.replay_from:
            self.replay = json.loads(Path(args.replay_from).read_text()).get("replay", {})
        self.meta = environment(self.device, self.dtype)
        self.meta["command"] = command
        self.meta["budget_s"] = args.budget_s
        self._wls: list[Workload] = []

    # ------------------------------------------------------------------------------------------ output
    def save(self) -> None:
        replay = {k: v for k, v in self.replay.items() if not k.startswith("_")}  # live objects stay out
        data = {"meta": self.meta, "workloads": self.workloads, "results": self.results, "replay": replay}
        add_derived(data)
        tmp = self.out / (RESULTS_FILE + ".tmp")
        tmp.write_text(dumps(data))
        tmp.replace(self.out / RESULTS_FILE)

    # ------------------------------------------------------------------------------------------ one contender
    def new_row(self, wl: Workload, c: Contender) -> dict:
        return {"workload": wl.name, "contender": c.name, "kind": c.kind, "gpu": self.meta["gpu"], "latency_s": None,
                "latency_step_s": None, "speedup_vs_bf16_compiled": None, "speedup_vs_best_peer": None,
                "peak_memory_bytes": None, "peak_memory_vs_bf16": None, "weight_bytes": None,
                "linear_weight_bytes": None, "weight_reduction_vs_bf16": None, "psnr_db": None, "ssim": None,
                "nvfp4_share": None, "skip_share": None, "compiled": False, "compile_mode": None, "warmup_s": None,
                "needs": list(c.requirements()), "notes": [], "error": None, "not_run": False,
                "run_date": self.meta["date"], **c.fields}

    def run_contender(self, ctx: Context, c: Contender, wl_deadline: float, est: float) -> dict:
        import torch

        wl = ctx.wl
        row = self.new_row(wl, c)
        left = wl_deadline - time.monotonic()
        reason = missing(c.requirements(), self.device)
        if reason is None and left < est:
            reason = f"time budget ({left:.0f} s left for this workload, ~{est:.0f} s needed)"
        if reason is not None:
            row.update(error=f"not run: {reason}", not_run=True)
            log(f"{wl.name} / {c.name}: not run ({reason})")
            self.results.append(row)
            self.save()
            return row
        log(f"{wl.name} / {c.name}: start ({left:.0f} s left for this workload)")
        t = time.monotonic()
        cap = max(20, int(left))
        use_alarm = hasattr(signal, "SIGALRM")
        if use_alarm:
            def on_alarm(_sig, _frame):
                raise ContenderTimeout(f"did not finish within its time cap of {cap} s (this workload's remaining "
                                       "budget); stopped")
            old = signal.signal(signal.SIGALRM, on_alarm)
            signal.alarm(cap)
        try:
            self.measure(ctx, c, row)
        except (Exception, ContenderTimeout) as e:  # recorded, the run goes on
            row["error"] = f"{type(e).__name__}: {e}"[:2000]
            row["traceback"] = traceback.format_exc()[-4000:]
            log(f"{wl.name} / {c.name}: FAILED {row['error'][:300]}")
        finally:
            if use_alarm:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, old)
            with contextlib.suppress(Exception):
                uncompile(ctx.runner.adapter)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        row["wall_s"] = round(time.monotonic() - t, 2)
        if row["latency_s"] is not None:
            log(f"{wl.name} / {c.name}: {row['latency_s']:.4f} s/video, {row['latency_step_s'] * 1e3:.2f} ms/step, "
                f"psnr {row['psnr_db']}, skip {row['skip_share']}, nvfp4 {row['nvfp4_share']} "
                f"({row['wall_s']:.0f} s wall)")
        self.results.append(row)
        self.save()
        return row

    def measure(self, ctx: Context, c: Contender, row: dict) -> None:
        """Measure ``c`` compiled as it declares (falling back to eager, with a note, when compiling or the compiled
        run of a block-compiled contender fails)."""
        mode = "eager" if self.args.no_compile else c.compile
        if mode != "eager":
            try:
                self._measure_once(ctx, c, row, mode)
                return
            except Exception as e:
                if mode == "graphs":  # its eager fallback would be bf16 eager, measured already
                    raise
                row["notes"].append(f"compiled run failed ({type(e).__name__}: {str(e)[:300]}); measured eager")
                log(f"  compiled run failed: {type(e).__name__}: {str(e)[:300]}; retrying eager")
        self._measure_once(ctx, c, row, "eager")

    def _measure_once(self, ctx: Context, c: Contender, row: dict, mode: str) -> None:
        runner = ctx.runner
        ctx.mode = mode
        installed = []
        try:
            if mode == "graphs":
                compile_whole(runner.transformer)
            for i, part in enumerate(c.parts):
                if mode == "blocks" and i == c.compile_after:
                    compile_blocks(runner.adapter)
                installed.append(part.install(ctx, row))
            if mode == "blocks" and c.compile_after >= len(c.parts):
                compile_blocks(runner.adapter)
            row["compiled"], row["compile_mode"] = mode != "eager", mode
            handle = next((i.handle for i in installed if i.handle is not None), None)
            m = runner.measure(self.clock, on_generation=_chain(i.on_generation for i in installed), handle=handle,
                               all_steps=c.replay, make_refs=c.name == "bf16-eager")
            row.update(m)
            if handle is not None:
                st = handle.stats()
                if st is not None:
                    row.update(nvfp4_share=st.nvfp4_share, skip_share=st.skip_share, execution=st.execution,
                               tdc_cache_peak_bytes=st.cache_bytes, runtime_notes=st.notes)
            for inst in installed:
                if inst.finish is not None:
                    inst.finish(row)
            row["weight_bytes"], row["linear_weight_bytes"] = weight_bytes(runner.transformer, runner.adapter)
        finally:
            for inst in reversed(installed):
                inst.remove()
            uncompile(runner.adapter)

    # ------------------------------------------------------------------------------------------ workloads
    def _share_left(self, wl: Workload) -> float:
        done = {w["name"] for w in self.workloads}
        return sum(w.budget_share for w in self._wls if w.name not in done or w.name == wl.name)

    def run_workload(self, wl: Workload) -> None:
        import torch

        start = time.monotonic()
        wl_deadline = start + (self.deadline - start) * wl.budget_share / max(1e-9, self._share_left(wl))
        entry = {"name": wl.name, "spec": wl.spec, "kind": wl.kind, "steps": wl.steps, "steps_timed": wl.steps_timed,
                 "quality_meaningful": wl.quality_meaningful, "notes": wl.notes}
        self.workloads.append(entry)
        log(f"== workload {wl.name}: budget {wl_deadline - start:.0f} s")
        try:
            runner = make_runner(wl, self.device, self.dtype)
        except Exception as e:
            entry["error"] = f"{type(e).__name__}: {e}"[:2000]
            log(f"{wl.name}: could not load: {entry['error']}")
            self.save()
            return
        entry.update(runner.info)
        ctx = Context(wl=wl, runner=runner, device=self.device, args=self.args, replay=self.replay,
                      deadline=self.deadline)
        wanted = self.args.contenders
        walls: list[float] = []
        ours_rows: list[dict] = []
        def rank(c: Contender) -> int | None:
            """Where ``--contenders`` puts ``c``: -1 always runs, first; None: not run."""
            if c.name == BASELINE or (c.name == "bf16-eager" and wl.kind == "pipeline"):
                return -1
            if not wanted:
                return 0
            return next((i for i, w in enumerate(wanted) if c.name.startswith(w)), None)

        ranked = [(r, c) for c in contenders_for(ctx) if (r := rank(c)) is not None]
        for r, c in sorted(ranked, key=lambda rc: rc[0]):  # stable: the workload's own order within one prefix
            always = r < 0
            est = 0.0 if always or not walls else statistics.median(walls)
            row = self.run_contender(ctx, c, wl_deadline, est)
            if row.get("wall_s") and not row["not_run"]:
                walls.append(row["wall_s"])
            if wl.kind == "pipeline" and row["error"] is None and row["psnr_db"] is not None:
                # the quality each contender stands for on the shape workloads (which may run in another process)
                self.replay.setdefault("reference_quality", {})[c.name] = row["psnr_db"]
            if wl.kind == "pipeline" and c.kind == "ours":
                ours_rows.append(row)
                choose_replay(ctx, ours_rows)
        if self.args.repeat_baseline:
            self.run_contender(ctx, repeat_baseline(), wl_deadline, 0.0)
        self.save()
        del runner, ctx  # free the model before the next workload
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def run(self, wls: list[Workload]) -> None:
        self._wls = wls
        for wl in wls:
            if time.monotonic() > self.deadline:
                self.workloads.append({"name": wl.name, "spec": wl.spec, "error": "not run: time budget"})
                continue
            self.run_workload(wl)
        self.meta["wall_s"] = round(time.monotonic() - self.t0, 1)
        self.save()
