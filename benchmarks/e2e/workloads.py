"""What is run: the workloads (model, clip size, steps) and the runners that load a model and measure one call.

* ``reference`` — the shipped trained model, full pipeline (text encoder, 2 CFG branches per step, scheduler) at
  its default clip size. Latency is one whole pipeline call (one video); quality is measured against the eager
  video of the same prompt and seed (PSNR over the whole video, SSIM per frame averaged;
  :func:`sixbit_tune.search.quality.compare`). The reference model is the quality oracle.
* ``shape:cogvideox-2b`` (49 frames 480x720 -> latent 13x60x90, CFG batch 2 in one call) and ``shape:wan2.1-1.3b``
  (81 frames 480x832, one call per CFG branch, as the diffusers pipelines call them) — the real architectures with
  random weights, transformer only. Random latents and text of the real token count; a run of ``--steps-timed``
  consecutive denoising steps is timed and the per-video figure is that run's mean step time x ``--steps``. Quality
  means nothing on random weights (null), and so do cache decisions: each cache's skip pattern on the reference
  model is *replayed* (see :mod:`.skipmaps`).
"""

from __future__ import annotations

import contextlib
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from .measurement import peak_memory, reset_peak

REFERENCE_PROMPTS = (
    "a red square moving left on a striped background",
    "a blue circle moving right on a checkered background",
    "a green triangle moving up on a plain background",
)


@dataclass
class Workload:
    """One model and how it is run."""

    name: str
    spec: str
    kind: str  # "pipeline" (full pipeline, quality measured) | "transformer" (per-step timing, random inputs)
    steps: int
    steps_timed: int
    quality_meaningful: bool
    budget_share: float
    prompts: tuple[str, ...] = ()
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    notes: list[str] = field(default_factory=list)


def workloads_for(args) -> list[Workload]:
    """The workloads of a run: ``--smoke`` (tiny models on the CPU) or the GPU set, narrowed by ``--workloads``
    and resized by ``--shape-size``."""
    timed = args.steps_timed or args.steps
    if args.smoke:
        wls = [
            Workload("tiny:wan (pipeline)", "tiny:wan", "pipeline", args.steps, args.steps, False, 0.5,
                     prompts=("a cat runs on the beach", "a red car in snow")),
            Workload("tiny:cogvideox (transformer)", "tiny:cogvideox", "transformer", args.steps, timed, False, 0.25),
            Workload("tiny:wan (transformer)", "tiny:wan", "transformer", args.steps, timed, False, 0.25),
        ]
    else:
        wls = [
            Workload("reference", "reference", "pipeline", args.steps, args.steps, True, 0.45,
                     prompts=REFERENCE_PROMPTS[: args.prompts]),
            Workload("shape:cogvideox-2b", "shape:cogvideox-2b", "transformer", args.steps, timed, False, 0.275,
                     frames=49, height=480, width=720),
            Workload("shape:wan2.1-1.3b", "shape:wan2.1-1.3b", "transformer", args.steps, timed, False, 0.275,
                     frames=81, height=480, width=832),
        ]
    if args.shape_size:
        f, h, w = (int(v) for v in args.shape_size.split(","))
        for wl in wls:
            if wl.spec.startswith("shape:"):
                wl.frames, wl.height, wl.width = f, h, w
                wl.name = f"{wl.spec} ({f}x{h}x{w})"
    if args.workloads:
        keep = [w.strip() for w in args.workloads.split(",") if w.strip()]
        wls = [w for w in wls if w.spec in keep or w.name in keep]
        total = sum(w.budget_share for w in wls) or 1.0
        for w in wls:
            w.budget_share /= total
    return wls


class PipelineRunner:
    """Full pipeline: one timed generation per prompt (+ one repeat), quality against the eager bf16 videos."""

    kind = "pipeline"

    def __init__(self, wl: Workload, device, dtype):
        from sixbit_tune.errors import NotBuiltYet
        from sixbit_tune.models.adapters import get_adapter
        from sixbit_tune.models.specs import load_pipeline
        from sixbit_tune.search.quality import GenerationSettings

        self.wl, self.device, self.dtype = wl, device, dtype
        try:
            self.pipe = load_pipeline(wl.spec, device=device, dtype=dtype)
        except NotBuiltYet:
            if wl.spec != "reference":
                raise
            # specs.py looks for weights/config.json; the shipped folder is a diffusers pipeline folder
            # (model_index.json), which the reference package's own loader reads.
            from sixbit_tune.models.reference import load_reference_pipeline

            self.pipe = load_reference_pipeline(device=device, dtype=dtype)
            wl.notes.append("loaded with sixbit_tune.models.reference.load_reference_pipeline (load_pipeline("
                            "'reference') looks for weights/config.json, absent from the shipped pipeline folder)")
        self.pipe.set_progress_bar_config(disable=True)
        self.adapter = get_adapter(self.pipe)
        if wl.spec.startswith("tiny:"):
            self.settings = GenerationSettings.for_model(wl.spec, steps=wl.steps)
        else:
            self.settings = GenerationSettings(steps=wl.steps)
        self.refs: dict[str, Any] = {}
        #: the cache contexts of one step, in call order
        self.contexts = ["cond", "uncond"]
        cfg = self.adapter.transformer.config
        self.info = {"blocks": len(self.adapter.blocks()), "class": type(self.adapter.transformer).__name__,
                     "settings": self.settings.to_dict(), "prompts": list(wl.prompts),
                     "patch_size": list(cfg.get("patch_size", []) or [])}

    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def target(self):
        """What ``apply_policy`` and the caches are installed on."""
        return self.pipe

    def measure(self, clock, on_generation=None, make_refs=False, **_) -> dict:
        """Warm-up generation, then one timed generation per prompt and a repeat of the first. ``on_generation(i)``
        is called after the warm-up (``i = -1``) and after each timed generation."""
        from sixbit_tune.search.quality import compare, generate

        prompts = list(self.wl.prompts)
        w = clock.start()
        generate(self.pipe, prompts[0], 0, self.settings)  # warm-up (compilation happens here)
        warmup_s = clock.seconds(clock.stop(w))
        if on_generation is not None:
            on_generation(-1)
        reset_peak(self.device)
        times, quality = [], []
        for i, p in enumerate(prompts + prompts[:1]):
            a = clock.start()
            g = generate(self.pipe, p, 0, self.settings)
            pair = clock.stop(a)
            times.append(clock.seconds(pair))
            if on_generation is not None:
                on_generation(i)
            if i < len(prompts):
                if make_refs:
                    self.refs[p] = g
                if p in self.refs:
                    quality.append(compare(g, self.refs[p], with_lpips=False))
        video = statistics.median(times)
        out = {"latency_s": video, "latency_step_s": video / self.wl.steps, "timed_runs": len(times),
               "latency_runs_s": times, "peak_memory_bytes": peak_memory(self.device), "warmup_s": warmup_s}
        out["psnr_db"] = statistics.mean(q["psnr_db"] for q in quality) if quality else None
        ss = [q["ssim"] for q in quality if q["ssim"] is not None and not math.isnan(q["ssim"])]
        out["ssim"] = statistics.mean(ss) if ss else None
        out["psnr_db_per_prompt"] = [q["psnr_db"] for q in quality]
        if not quality:
            out["quality_note"] = "no bf16 eager reference videos (the bf16-eager run failed or was not run)"
        return out


class TransformerRunner:
    """Transformer only, random inputs of the real token count; CFG as the family's pipeline calls it."""

    kind = "transformer"

    def __init__(self, wl: Workload, device, dtype):
        import torch

        from sixbit_tune.models.adapters import get_adapter
        from sixbit_tune.models.specs import load_transformer

        self.wl, self.device, self.dtype = wl, device, dtype
        self._t = load_transformer(wl.spec, device=device, dtype=dtype)
        self.adapter = get_adapter(self._t)
        self.batched = self.adapter.cfg_mode == "batched"
        #: the cache contexts of one step, in call order (a replayed skip map is given per context)
        self.contexts = ["cond_uncond"] if self.batched else ["cond", "uncond"]
        rows = 2 if self.batched else 1
        g = torch.Generator().manual_seed(0)
        if wl.spec.startswith("tiny:"):
            from sixbit_tune.models.tiny import tiny_transformer_inputs

            inputs = tiny_transformer_inputs(wl.spec.split(":", 1)[1], batch=rows, device=device, dtype=dtype)
            inputs.pop("timestep")
        else:
            from sixbit_tune.profiling.runner import shape_step_inputs

            inputs = shape_step_inputs(self.adapter, wl.frames, wl.height, wl.width, rows, g, device, dtype)
        self.text = inputs.pop("encoder_hidden_states")
        self.uncond = None if self.batched else torch.randn(self.text.shape, generator=g).to(device, dtype)
        self.hidden = inputs.pop("hidden_states")
        self.rest = inputs
        lat = list(self.hidden.shape)
        fhw = lat[1] * lat[3] * lat[4] if self.adapter.family.name == "cogvideox" else lat[2] * lat[3] * lat[4]
        patch = self._t.config.get("patch_size", 1)
        patch_n = math.prod(patch) if isinstance(patch, list | tuple) else patch * patch
        self.info = {"blocks": len(self.adapter.blocks()), "class": type(self._t).__name__,
                     "latent_shape": list(self.hidden.shape), "video_tokens_per_row": fhw // patch_n,
                     "cfg": "one call, batch 2 [uncond; cond]" if self.batched else
                     "two calls per step (cond, uncond), batch 1 each"}
        self.wl.notes.append(
            f"transformer only, random weights; {wl.steps_timed} consecutive steps timed after a 2-step warm-up "
            f"(contenders that replay a skip map: all {wl.steps} steps timed, after a warm-up on the whole loop, "
            f"so every path is compiled before timing and the map is replayed step for step); per-video latency = "
            f"mean timed step x {wl.steps} steps")

    @property
    def transformer(self):
        return self._t

    @property
    def target(self):
        return self._t

    def step(self, i: int, n: int) -> None:
        import torch

        t = torch.full((self.hidden.shape[0],), int(999 * (1 - i / n)), device=self.device, dtype=torch.long)
        tr = self._t
        texts = [self.text] if self.batched else [self.text, self.uncond]
        for ctx, text in zip(self.contexts, texts):
            with tr.cache_context(ctx):
                tr(hidden_states=self.hidden, encoder_hidden_states=text, timestep=t, **self.rest)

    def measure(self, clock, handle=None, all_steps=False, **_) -> dict:
        """Time ``steps_timed`` consecutive steps after a 2-step warm-up; with ``all_steps`` (contenders that replay
        a skip map) time all ``steps`` steps after warming up on the whole loop, so the replayed map is the
        reference's, step for step, and every block path is compiled before timing."""
        import torch

        n = self.wl.steps if all_steps else self.wl.steps_timed
        with torch.no_grad():
            w = clock.start()
            for i in range(n if all_steps else min(2, n)):  # warm-up (compilation happens here)
                self.step(i, n)
            warmup_s = clock.seconds(clock.stop(w))
            if handle is not None:
                handle.reset()
            with contextlib.suppress(Exception):
                self._t._reset_stateful_cache()
            reset_peak(self.device)
            pairs = []
            for i in range(n):
                a = clock.start()
                self.step(i, n)
                pairs.append(clock.stop(a))
            times = [clock.seconds(p) for p in pairs]
        mean = statistics.mean(times)
        # A replayed skip map makes step times cyclic (skipped / computed steps): its per-step figure is the mean.
        return {"latency_s": mean * self.wl.steps, "latency_step_s": mean if all_steps else statistics.median(times),
                "latency_step_median_s": statistics.median(times),
                "latency_step_mean_s": mean, "latency_steps_s": times, "timed_runs": n,
                "peak_memory_bytes": peak_memory(self.device), "psnr_db": None, "ssim": None, "warmup_s": warmup_s}


def make_runner(wl: Workload, device, dtype):
    return PipelineRunner(wl, device, dtype) if wl.kind == "pipeline" else TransformerRunner(wl, device, dtype)
