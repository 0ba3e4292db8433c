"""One search worker's view of the world: the pipeline, the predictors, the references; measuring one policy.

:class:`SearchContext` is built once per worker process. :meth:`SearchContext.measure` applies a policy to the
pipeline, generates every (prompt, seed), measures latency, memory and quality, and removes the policy again.

Latency: every generation is timed — with CUDA events on a GPU (after a synchronize), with the wall clock on the
CPU — after one untimed warm-up generation; the figure is the median over prompts × repeats.

Memory: the measured peak of the bytes torch tensors hold while the policy runs (weights in every encoding the
policy keeps, the Temporal Delta Cache, activations): on a GPU ``torch.cuda.max_memory_allocated`` over the timed
generations, on the CPU the pipeline's parameters and buffers plus the peak of torch's CPU allocator over applying
the policy and one untimed generation (the first warm-up, or one more untimed generation when there is none); see
:mod:`sixbit_tune.search.memory`. The method is recorded with every trial (``memory_metric``).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from sixbit_tune.errors import NonFiniteError, PolicyError
from sixbit_tune.search.config import SearchConfig, TrialFigures
from sixbit_tune.search.quality import Generation, GenerationSettings, ReferenceCache, compare, generate

#: Reference trials (the corners of the policy space), enqueued before TPE samples anything.
CORNERS = ("static_int8", "static_nvfp4", "dmpq_no_cache")
#: The corners of a search whose every in-block linear stores NVFP4 (``SearchConfig.weights == "nvfp4"``):
#: static INT8 becomes NVFP4-stored on the robust route (W4A8) everywhere.
NVFP4_CORNERS = ("static_nvfp4_robust", "static_nvfp4", "dmpq_no_cache")


def corners_of(weights: str) -> tuple[str, ...]:
    """The corner trials of a search with this ``SearchConfig.weights`` setting."""
    return NVFP4_CORNERS if weights == "nvfp4" else CORNERS

#: Exceptions that fail a trial and let the study go on (anything else stops the worker: it is a bug). A
#: PolicyError is a policy the model cannot run (e.g. NVFP4 on a layer whose K is not a multiple of 16).
TRIAL_FAILURES: tuple[type[BaseException], ...] = (torch.OutOfMemoryError, NonFiniteError, PolicyError)


def pipeline_dtype(device: str):
    """The dtype searches run the model in: bfloat16 on a GPU, the model's own (float32) on the CPU."""
    return torch.bfloat16 if device == "cuda" else None


def memory_metric(device: str) -> str:
    """How a trial's memory is measured on ``device`` (recorded with the study and every trial)."""
    from sixbit_tune.search.memory import method

    return method(device)


def _is_cpu_oom(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)


@dataclass
class Baseline:
    """The unquantized pipeline's figures (for speedups)."""

    latency_ms: float
    memory_bytes: int
    peak_memory_bytes: int | None
    weight_bytes: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class SearchContext:
    """Pipeline + predictors + references of one worker.

    Args:
        config: the search settings.
        pipe: an already loaded pipeline (default: ``load_pipeline(config.model)`` on the config's device).
        generation: generation settings (default: the config's, else the profile run's, else the defaults).
    """

    def __init__(self, config: SearchConfig, pipe=None, store=None):
        from sixbit_tune.models.adapters import get_adapter
        from sixbit_tune.predictor import read_predictors
        from sixbit_tune.store import Store

        self.config = config
        self.device = config.resolved_device
        self.store = store if store is not None else Store.open(config.store)
        self.predictors = read_predictors(self.store, config.fit_id)
        profile = self.store.runs(run_ids=self.predictors.run_ids)
        self.profile_settings = _json(profile["settings"].iloc[-1]) if len(profile) else {}
        self.generation = config.generation or GenerationSettings.for_model(
            config.model, self.profile_settings, steps=config.steps
        )
        self.prompts = list(config.prompts or self.profile_settings.get("prompts") or _default_prompts())
        self.cases = [(p, config.seeds[i % len(config.seeds)]) for i, p in enumerate(self.prompts)]
        if pipe is None:
            from sixbit_tune.models.specs import load_pipeline

            pipe = load_pipeline(config.model, device=self.device, dtype=pipeline_dtype(self.device))
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.adapter = get_adapter(pipe)
        fitted = {h for h in profile["config_hash"] if h is not None} if len(profile) else set()
        if fitted and self.adapter.config_hash() not in fitted:
            spec = profile["model_spec"].iloc[-1]
            raise ValueError(
                f"the fit {self.predictors.fit_id} was made on {spec!r} (config hash {sorted(fitted)[0][:12]}…), "
                f"not on {config.model!r} (config hash {self.adapter.config_hash()[:12]}…): search the model "
                "that was profiled, or profile and fit this one"
            )
        self.model_id = {
            "spec": config.model,
            "class": type(self.adapter.transformer).__name__,
            "config_hash": self.adapter.config_hash(),
        }
        self.references = ReferenceCache(_store_path(self.store) / "references", self.model_id)
        if config.dmpq and config.weights == "nvfp4":
            odd = [n for n, lin in self.adapter.all_linears().items() if lin.in_features % 16 != 0]
            if odd:
                raise ValueError(
                    f"--weights nvfp4 stores every in-block linear in NVFP4, which needs in_features to be a "
                    f"multiple of 16; {len(odd)} layer(s) are not, e.g. {odd[0]!r}: search with --weights mixed")
        #: per layer, the calibration Hessian of the gptq NVFP4 weight encoder (None: another encoder)
        self.nvfp4_hessians: dict[str, torch.Tensor] | None = None
        if config.dmpq and config.nvfp4_encoder == "gptq":
            from sixbit_tune.profiling.calibration import load_hessians

            self.nvfp4_hessians = load_hessians(
                _store_path(self.store), self.predictors.run_ids,
                profile_hint=f"the fit {self.predictors.fit_id} was made on them")[0]
        self._refs: dict[tuple[str, int], Generation] = {}
        self._menu = None  # the measured route menu (route_menu), measured at the first use
        if self.device == "cuda" and config.memory_budget_bytes:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, config.memory_budget_bytes / total))

    # ------------------------------------------------------------------------------------------- references
    def reference(self, prompt: str, seed: int) -> Generation:
        key = (prompt, seed)
        if key not in self._refs:
            self._refs[key] = self.references.get(self.pipe, prompt, seed, self.generation)
        return self._refs[key]

    def ensure_references(self) -> None:
        for p, s in self.cases:
            self.reference(p, s)

    # ------------------------------------------------------------------------------------------- policies
    def route_menu(self):
        """This device's route menu (:func:`sixbit_tune.runtime.menu.measure_menu`) at the shapes the in-block
        linears see in a one-step generation of the first case (the search's video size and guidance), 8-bit
        routes only, each layer compiled on a GPU; measured once per worker."""
        if self._menu is None:
            from sixbit_tune.runtime.menu import EIGHT_BIT_ALTERNATIVES, linear_shapes, measure_menu

            one_step = dataclasses.replace(self.generation, steps=1)
            prompt, seed = self.cases[0]
            shapes = linear_shapes(self.pipe, lambda: generate(self.pipe, prompt, seed, one_step))
            dtype = next(iter(self.adapter.all_linears().values())).weight.dtype
            self._menu = measure_menu(shapes, self.device, dtype,
                                      routes=[r for pair in EIGHT_BIT_ALTERNATIVES for r in pair],
                                      compile=self.device == "cuda")
        return self._menu

    def build_policy(self, params: dict, corner: str | None = None):
        """The policy of one trial: DMPQ at τ (untrusted layers static) and TDC from the window knobs; a corner
        (:func:`corners_of`) gives the static all-INT8 / all-NVFP4 policies or DMPQ without the cache. With
        ``config.dmpq`` off, every linear keeps its weights (mode ``"none"``) and only the cache is configured."""
        if not self.config.dmpq:
            from sixbit_tune.runtime import make_static_policy
            from sixbit_tune.search.policies import tdc_options

            return make_static_policy(self.pipe, "none", float(params["delta"]), spec=self.config.model,
                                      **tdc_options(params))
        from sixbit_tune.search.policies import build_policy

        policy = build_policy(self, params, corner)
        if self.config.measures_menu:
            from sixbit_tune.runtime.menu import choose_8bit_routes

            policy, _ = choose_8bit_routes(policy, self.route_menu())
        return policy

    # ------------------------------------------------------------------------------------------- measuring
    def _timed_generate(self, prompt: str, seed: int) -> tuple[Generation, float]:
        if self.device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            gen = generate(self.pipe, prompt, seed, self.generation)
            end.record()
            torch.cuda.synchronize()
            return gen, float(start.elapsed_time(end))
        t0 = time.perf_counter()
        gen = generate(self.pipe, prompt, seed, self.generation)
        return gen, (time.perf_counter() - t0) * 1e3

    def measure_baseline(self) -> Baseline:
        """Latency and memory of the pipeline with no policy (references are generated first)."""
        self.ensure_references()
        times, peak, _ = self._run_cases(outputs=None)
        weight = sum(
            lin.weight.numel() * lin.weight.element_size() for lin in self.adapter.all_linears().values()
        )
        return Baseline(statistics.median(times), int(peak), int(peak), int(weight))

    def _memory_run(self, apply, encode_first: int | None = None):
        """Install the policy (``apply()``, None for none) and, on the CPU, run one untimed generation, all under
        the CPU allocator's measurement. Returns (the handle, the CPU peak in bytes or None on a GPU).

        ``encode_first`` (the bytes of the original weights of the layers the policy replaces): install the policy
        before the measurement begins and count what it holds as resident (the pipeline's parameters and buffers
        after installing, the quantized encodings among them, plus those original weights, which the handle
        keeps); only the generation is measured by the allocator. Used for the gptq NVFP4 weight encoder, whose column-by-column loop of small operations makes
        the profiler's record of the installation grow to tens of GB on the reference model."""
        if self.device == "cuda":
            return (apply() if apply is not None else None), None
        from sixbit_tune.search.memory import AllocatorPeak, resident_bytes

        gc.collect()
        handle = None
        if encode_first is not None and apply is not None:
            handle = apply()
            gc.collect()
            resident = resident_bytes(self.pipe) + int(encode_first)
        else:
            resident = resident_bytes(self.pipe)
        try:
            with AllocatorPeak() as mem:
                if handle is None and apply is not None:
                    handle = apply()
                generate(self.pipe, self.cases[0][0], self.cases[0][1], self.generation)
        except BaseException:
            if handle is not None:
                handle.remove()
            raise
        return handle, resident + int(mem.peak_bytes)

    def _run_cases(self, outputs: dict | None, on_output=None, apply=None, encode_first: int | None = None):
        """Install the policy (``apply``), warm up, time every case. Returns (times in ms, peak memory in bytes,
        the policy's handle); the caller removes the handle (also when this raises: then it is removed here).
        ``encode_first``: as in :meth:`_memory_run`."""
        cfg = self.config
        handle, cpu_peak = self._memory_run(apply, encode_first)
        try:
            warmups = cfg.warmup_runs if cpu_peak is None else max(0, cfg.warmup_runs - 1)
            for _ in range(warmups):  # untimed
                generate(self.pipe, self.cases[0][0], self.cases[0][1], self.generation)
            if self.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = []
            for prompt, seed in self.cases:
                for r in range(cfg.repeats):
                    gen, ms = self._timed_generate(prompt, seed)
                    times.append(ms)
                    if r == 0 and outputs is not None:
                        outputs[(prompt, seed)] = gen
                        if on_output is not None:
                            on_output(handle)
        except BaseException:
            if handle is not None:
                handle.remove()
            raise
        peak = int(torch.cuda.max_memory_allocated()) if self.device == "cuda" else cpu_peak
        return times, peak, handle

    def measure(self, policy) -> tuple[TrialFigures, Any]:
        """Apply ``policy``, generate every case, measure, remove the policy. Returns (figures, last RunStats).

        Raises:
            torch.OutOfMemoryError: out of memory (also: a CPU allocation failure, or the memory budget exceeded).
            NonFiniteError: a generated video or latents with NaN/Inf.
        """
        from sixbit_tune.runtime import apply_policy
        from sixbit_tune.search.policies import gptq_layers

        cfg = self.config
        self.ensure_references()
        counts = {"nvfp4": 0, "layer": 0, "skipped": 0, "blocks": 0}
        last: dict[str, Any] = {}

        def collect(handle):
            st = handle.stats()
            if st is None:
                return
            last["stats"] = st
            counts["nvfp4"] += st.layer_calls.get("nvfp4", 0)
            counts["layer"] += sum(st.layer_calls.values())
            counts["skipped"] += st.skipped_blocks
            counts["blocks"] += st.block_calls

        outputs: dict[tuple[str, int], Generation] = {}
        encode_first = None
        if gptq_layers(policy):
            linears = self.adapter.all_linears()
            encode_first = sum(linears[n].weight.numel() * linears[n].weight.element_size()
                               for n, lp in policy.dmpq.layers.items() if lp.weight != "none")
        try:
            times, peak, handle = self._run_cases(outputs, on_output=collect,
                                                  apply=lambda: apply_policy(self.pipe, policy,
                                                                             nvfp4_hessians=self.nvfp4_hessians),
                                                  encode_first=encode_first)
            handle.remove()
        except RuntimeError as e:
            if _is_cpu_oom(e) and not isinstance(e, torch.OutOfMemoryError):
                raise torch.OutOfMemoryError(str(e)) from e
            raise
        finally:
            if self.device == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
        stats = last.get("stats")
        weight = int(sum(stats.weight_bytes.values())) if stats is not None else 0
        cache = int(stats.cache_bytes) if stats is not None else 0
        memory = int(peak)
        if cfg.memory_budget_bytes is not None and memory > cfg.memory_budget_bytes:
            raise torch.OutOfMemoryError(
                f"measured memory {memory} bytes ({memory_metric(self.device)}) exceeds the memory budget "
                f"{cfg.memory_budget_bytes} bytes"
            )
        qs = [compare(outputs[c], self.reference(*c)) for c in self.cases]
        psnrs = [q["psnr_db"] for q in qs]
        ssims = [q["ssim"] for q in qs if q["ssim"] is not None and math.isfinite(q["ssim"])]
        lp = [q["lpips"] for q in qs if q["lpips"] is not None]
        figures = TrialFigures(
            latency_ms=float(statistics.median(times)),
            memory_bytes=int(memory),
            peak_memory_bytes=memory,
            weight_bytes=weight,
            cache_bytes=cache,
            psnr_db=float(statistics.fmean(psnrs)),
            ssim=float(statistics.fmean(ssims)) if ssims else None,
            latent_rel_l2=float(statistics.fmean(q["latent_rel_l2"] for q in qs)),
            psnr_min_db=float(min(psnrs)),
            lpips=float(statistics.fmean(lp)) if lp else None,
            nvfp4_share=counts["nvfp4"] / counts["layer"] if counts["layer"] else None,
            skip_share=counts["skipped"] / counts["blocks"] if counts["blocks"] else None,
            execution=dict(stats.execution) if stats is not None else {},
            latencies_ms=[float(t) for t in times],
        )
        return figures, stats


def _default_prompts():
    from sixbit_tune.search.config import DEFAULT_PROMPTS

    return DEFAULT_PROMPTS


def _json(v) -> dict:
    import json

    if v is None:
        return {}
    if isinstance(v, str):
        return json.loads(v)
    return dict(v)


def _store_path(store):
    return store.path
