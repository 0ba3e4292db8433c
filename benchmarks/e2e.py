"""End-to-end benchmark of sixbit-tune against its peers on one GPU (issue #9); ``sixbit-tune bench`` wraps it.

Workloads (GPU run):

* ``reference`` — the shipped trained model, full pipeline (text encoder, 2 CFG branches per step, scheduler) at
  its default clip size. Latency is one whole pipeline call (one video), quality is measured against the bf16 eager
  video of the same prompt and seed (PSNR over the whole video, SSIM per frame averaged;
  :func:`sixbit_tune.search.quality.compare`).
* ``shape:cogvideox-2b`` (49 frames 480x720 -> latent 13x60x90, CFG batch 2 in one call) and ``shape:wan2.1-1.3b``
  (81 frames 480x832, one call per CFG branch, as the diffusers pipelines call them) — the real architectures with
  random weights, transformer only. Random latents and text of the real token count; a run of ``--steps-timed``
  consecutive denoising steps is timed and the per-video figure is that run's mean step time x ``--steps``. Quality
  means nothing on random weights (null), and so do cache decisions: the skip pattern the chosen policy produced on
  the reference model is *replayed* (same share of blocks at the same relative steps, scaled to the model's block
  and step count, forced through the runtime's own Temporal Delta Cache), as is FirstBlockCache's.

Contenders, in one process on one GPU: bf16 eager; bf16 with every block compiled (``torch.compile`` per block:
the baseline every speedup is against); torchao dynamic FP8 (per-row) and dynamic INT8 on the in-block linears,
blocks compiled; diffusers' FirstBlockCache (a threshold sweep on the reference model), blocks compiled; sixbit-tune
static all-INT8, static all-NVFP4 and the searched policy (``policies/*.json`` made for the model; without one, a
short profile + fit + DMPQ/TDC grid on the GPU, said in the notes), blocks compiled after the policy is applied
(falling back to eager with a note if compilation fails).

Each contender runs inside ``try``; an error is recorded in the results instead of ending the run, and the JSON is
rewritten after every contender (partial results survive a timeout). ``--budget-s`` bounds the whole run; a
contender that would not fit is skipped with that reason.

Timing: CUDA events around each pipeline call / transformer step after warm-up (compilation happens in the
warm-up), medians; peak memory is ``torch.cuda.max_memory_allocated`` reset before each contender's timed runs.

Usage::

    python benchmarks/e2e.py --out DIR                 # GPU run (all workloads)
    python benchmarks/e2e.py --smoke --out DIR          # CPU code-path check: tiny:wan pipeline + tiny:cogvideox
    python benchmarks/e2e.py --render a.json [b.json] --out benchmarks/results/e2e-h200   # merge, table, figure
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import functools
import glob
import json
import math
import os
import signal
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "bf16-compiled"
FBC_THRESHOLDS = (0.02, 0.05, 0.1, 0.2)
REFERENCE_PROMPTS = (
    "a red square moving left on a striped background",
    "a blue circle moving right on a checkered background",
    "a green triangle moving up on a plain background",
)
README_HEADING = "## Results on the H200"
#: How a reference skip map (two guidance contexts) becomes the target's, by whether the target calls once per step.
REPLAY_RULE = {
    False: "two guidance contexts replayed onto two: per step and block, as many contexts skip as did on the "
           "reference (same skip share)",
    True: "one batched call for both guidance rows: a block is skipped only where both reference contexts skipped "
          "it (the runtime's joint, conservative rule for a batched call), so the share can be below the reference's",
}


def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ================================================================================================ workloads
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
    if args.smoke:
        wls = [
            Workload("tiny:wan (pipeline)", "tiny:wan", "pipeline", args.steps, args.steps, False, 0.5,
                     prompts=("a cat runs on the beach", "a red car in snow")),
            Workload("tiny:cogvideox (transformer)", "tiny:cogvideox", "transformer", args.steps,
                     args.steps_timed or args.steps, False, 0.25),
            Workload("tiny:wan (transformer)", "tiny:wan", "transformer", args.steps,
                     args.steps_timed or args.steps, False, 0.25),
        ]
    else:
        wls = [
            Workload("reference", "reference", "pipeline", args.steps, args.steps, True, 0.45,
                     prompts=REFERENCE_PROMPTS[: args.prompts]),
            Workload("shape:cogvideox-2b", "shape:cogvideox-2b", "transformer", args.steps,
                     args.steps_timed or args.steps, False, 0.275, frames=49, height=480, width=720),
            Workload("shape:wan2.1-1.3b", "shape:wan2.1-1.3b", "transformer", args.steps,
                     args.steps_timed or args.steps, False, 0.275, frames=81, height=480, width=832),
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


# ================================================================================================ measuring
class Clock:
    """CUDA events on a GPU, ``perf_counter`` on the CPU."""

    def __init__(self, device):
        import torch

        self.cuda = torch.device(device).type == "cuda"

    def start(self):
        import torch

        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def stop(self, start) -> Any:
        import torch

        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return (start, e)
        return (start, time.perf_counter())

    def seconds(self, pair) -> float:
        import torch

        a, b = pair
        if self.cuda:
            torch.cuda.synchronize()
            return a.elapsed_time(b) / 1000.0
        return b - a


def reset_peak(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device) -> int | None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    return None


def _tensor_bytes(t) -> int:
    """Storage bytes of a tensor, looking inside tensor subclasses (torchao's quantized weights)."""
    import torch

    if t is None:
        return 0
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = flatten()
        return sum(_tensor_bytes(getattr(t, n, None)) for n in names)
    return t.numel() * t.element_size()


def weight_bytes(transformer, adapter) -> tuple[int, int]:
    """(all transformer parameters, in-block linears only) in bytes; quantized encodings counted as stored by the
    runtime's accounting (both encodings for dynamic layers), torchao's subclasses through their inner tensors."""
    from sixbit_tune.runtime import MixedPrecisionLinear

    total = sum(_tensor_bytes(p) for p in transformer.parameters())
    linear = 0
    for mod in transformer.modules():
        if isinstance(mod, MixedPrecisionLinear):
            enc = sum(mod.weight_bytes().values())
            total += enc
            linear += enc + (_tensor_bytes(mod.bias) if mod.bias is not None else 0)
    for lin in adapter.all_linears().values():  # original or torchao-quantized nn.Linear still in place
        linear += sum(_tensor_bytes(p) for p in lin.parameters())
    return int(total), int(linear)


# ================================================================================================ compile
def compile_blocks(adapter) -> None:
    """Regional compilation: each block's own ``forward`` is replaced by ``torch.compile`` of it (one compiled graph
    shared by all blocks of a class). Hooks installed afterwards (the sixbit runtime, FirstBlockCache) wrap the
    compiled forward and stay eager; so no block hook object ends up in a guard (which would recompile per block)."""
    import torch

    torch._dynamo.reset()
    for ref in adapter.blocks():
        m = ref.module
        m.forward = torch.compile(type(m).forward.__get__(m))
        m._e2e_compiled = True


def uncompile_blocks(adapter) -> None:
    import torch

    for ref in adapter.blocks():
        m = ref.module
        if m.__dict__.pop("_e2e_compiled", False):
            m.__dict__.pop("forward", None)
    torch._dynamo.reset()


# ================================================================================================ skip maps
def record_policy_skips(handle):
    """Record, per cache context and step, which blocks the runtime decided to skip (its own decisions, taken on
    the host once per call, so compiled blocks do not matter). Uses the controller's per-call decision hook."""
    rec: dict[str, dict[int, list[bool]]] = {}
    ctrl = handle.controller
    original = ctrl._decide

    def decide(state, ctx):
        original(state, ctx)
        rec.setdefault(ctx.name, {})[state.step] = [bool(s) for s in state.skip]

    ctrl._decide = decide
    return rec


def record_fbc_skips(head_block):
    """Forward hook on FirstBlockCache's head block: per context, whether the remaining blocks were skipped."""
    rec: dict[str, list[bool]] = {}

    def hook(_module, _args, _out):
        fbc = head_block._diffusers_hook.get_hook("fbc_leader_block_hook")
        sm = fbc.state_manager
        ctx = sm._context.name if sm._context is not None else "inference"
        rec.setdefault(ctx, []).append(not sm.get_state().should_compute)

    return rec, head_block.register_forward_hook(hook)


def fbc_skip_share(rec: dict[str, list[bool]], blocks: int) -> float | None:
    """Share of skipped block calls from :func:`record_fbc_skips`' record: a call whose remaining blocks came from
    the cache skipped ``blocks - 1`` of ``blocks`` (the head block always runs). None without calls."""
    calls = sum(len(v) for v in rec.values())
    return sum(map(sum, rec.values())) * (blocks - 1) / (calls * blocks) if calls else None


def skip_fraction_map(rec: dict[str, dict[int, list[bool]]]) -> list[list[float]]:
    """Per step, per block: the share of contexts in which the block was skipped."""
    steps = sorted({s for per in rec.values() for s in per})
    out = []
    for s in steps:
        rows = [per[s] for per in rec.values() if s in per]
        out.append([sum(r[b] for r in rows) / len(rows) for b in range(len(rows[0]))])
    return out


def scale_map(fractions: list[list[float]], steps: int, blocks: int, contexts: list[str],
              fbc: bool = False) -> dict[str, list[list[bool]]]:
    """Scale a reference skip map (steps x blocks of skip fractions over the reference's guidance contexts) to
    ``steps`` x ``blocks`` for each of the target's ``contexts``.

    Target step ``s`` covers reference steps [s*S/steps, (s+1)*S/steps) (with ``steps == S``, step for step);
    target block ``b`` follows reference block floor(b*L/blocks) (FirstBlockCache: block 0 always runs, the rest
    follow the step's decision). With v the mean skip fraction over the covered steps, context ``c`` of ``n``
    skips when v*n >= c+1: with the reference's two contexts replayed onto two (separate CFG, Wan), a block that
    one reference context skipped is skipped in one target context, so the skip share is the reference's; onto
    one batched call (CogVideoX, both guidance rows in one call) a block is skipped only where every reference
    context skipped it, the joint and conservative rule the runtime itself applies to a batched call. Nothing is
    skipped at step 0."""
    S = len(fractions)
    n = len(contexts)
    if S == 0:
        return {c: [[False] * blocks for _ in range(steps)] for c in contexts}
    L = len(fractions[0])
    out: dict[str, list[list[bool]]] = {c: [] for c in contexts}
    for s in range(steps):
        lo = int(s * S / steps)
        hi = max(lo + 1, int((s + 1) * S / steps))
        rows: list[list[bool]] = [[] for _ in contexts]
        for b in range(blocks):
            rb = (1 if b > 0 else 0) if fbc else min(L - 1, int(b * L / blocks))
            vals = [fractions[r][rb] for r in range(lo, min(hi, S))]
            v = sum(vals) / len(vals)
            runs = s == 0 or (fbc and b == 0)
            for ci in range(n):
                rows[ci].append(not runs and v * n >= ci + 1 - 1e-9)
        for c, row in zip(contexts, rows):
            out[c].append(row)
    return out


def map_share(maps: dict[str, list[list[bool]]]) -> float:
    """Share of skipped block calls over every context's map."""
    n = sum(len(r) for m in maps.values() for r in m)
    return sum(sum(r) for m in maps.values() for r in m) / n if n else 0.0


def force_skips(handle, skip_maps: dict[str, list[list[bool]]]) -> None:
    """Make the runtime skip exactly the blocks of ``skip_maps[context]`` (step -> blocks): its own decision runs
    first (the replay policy's tiny tolerance makes it skip nothing but keep every cache), then is overridden."""
    ctrl = handle.controller
    original = ctrl._decide

    def decide(state, ctx):
        original(state, ctx)
        skip_map = skip_maps.get(ctx.name)
        if skip_map is None:
            raise KeyError(f"no replayed skip map for cache context {ctx.name!r} (have {sorted(skip_maps)})")
        row = skip_map[state.step] if state.step < len(skip_map) else [False] * len(state.skip)
        for i, want in enumerate(row):
            state.skip[i] = bool(want) and state.cache[i] is not None

    ctrl._decide = decide


# ================================================================================================ policies
def policy_args(args) -> list[tuple[str, str]]:
    """``(contender name, path)`` for every ``--policy`` (comma-separated, named by ``--policy-name``)."""
    paths = [p.strip() for p in (args.policy or "").split(",") if p.strip()]
    names = [n.strip() for n in (args.policy_name or "").split(",") if n.strip()]
    if len(paths) != len(names) or len(set(names)) != len(names):
        raise SystemExit(f"--policy gives {len(paths)} policies and --policy-name {len(names)} distinct names "
                         f"({args.policy_name!r}): give one name per policy")
    for path in paths:
        if not Path(path).is_file():
            raise SystemExit(f"--policy {path}: no such file")
    return list(zip(names, paths))


def find_policy(transformer, spec: str) -> tuple[Any, str] | None:
    """The newest policy in ``policies/`` made for this model (class, config hash, block count)."""
    from sixbit_tune.errors import PolicyError
    from sixbit_tune.models.adapters import get_adapter
    from sixbit_tune.runtime import check_policy_fits, load_policy

    adapter = get_adapter(transformer)
    found = []
    for path in glob.glob(str(ROOT / "policies" / "*.json")):
        if path.endswith("schema.json"):
            continue
        try:
            pol = load_policy(path)
        except (PolicyError, OSError, ValueError):
            continue
        if not check_policy_fits(pol, adapter):
            found.append((os.path.getmtime(path), path, pol))
    if not found:
        return None
    found.sort()
    _, path, pol = found[-1]
    return pol, os.path.relpath(path, ROOT)


def replay_policy(transformer, ref_policy, nvfp4_share: float | None, skip: bool):
    """A policy for a random-weight model mirroring the chosen reference policy: the same shares of layer modes
    (interleaved along the layer list), dynamic layers pinned (alpha 0, beta -1 -> NVFP4 after the first step,
    beta +1 -> INT8) so that the NVFP4 share of layer calls matches the reference run's; TDC with a negligible
    tolerance and no window, so that every block keeps its cache and :func:`force_skips` decides."""
    from sixbit_tune import policy as P
    from sixbit_tune.models.adapters import get_adapter
    from sixbit_tune.runtime import make_static_policy

    adapter = get_adapter(transformer)
    names = list(adapter.all_linears())
    linears = adapter.all_linears()
    modes = [lp.mode for lp in ref_policy.dmpq.layers.values()]
    counts = {m: modes.count(m) / len(modes) for m in ("dynamic", "nvfp4", "int8", "none")}
    acc = dict.fromkeys(counts, 0.0)
    assigned = []
    for _ in names:  # largest-remainder interleaving
        for m in counts:
            acc[m] += counts[m]
        m = max(acc, key=acc.get)
        acc[m] -= 1.0
        assigned.append(m)
    n_dyn = assigned.count("dynamic")
    want_fp4 = round((nvfp4_share or 0.0) * len(names)) - assigned.count("nvfp4")
    fp4_dyn = max(0, min(n_dyn, want_fp4))
    layers, k = {}, 0
    for name, m in zip(names, assigned):
        lin = linears[name]
        if m == "dynamic":
            beta = -1.0 if (k * fp4_dyn) // max(1, n_dyn) != ((k + 1) * fp4_dyn) // max(1, n_dyn) else 1.0
            k += 1
            layers[name] = P.LayerPolicy("dynamic", lin.in_features, lin.out_features, 0.0, beta)
        else:
            layers[name] = P.LayerPolicy(m, lin.in_features, lin.out_features)
    base = make_static_policy(transformer, "int8")
    tdc = P.TDC(tolerance=1e-30 if skip else 0.0, warmup=0, cooldown=0, max_skips=10_000,
                cache_dtype=ref_policy.tdc.cache_dtype)
    dmpq = P.DMPQ(threshold=0.0, layers=layers, first_step_format=ref_policy.dmpq.first_step_format)
    return dataclasses.replace(base, dmpq=dmpq, tdc=tdc), {"modes": {m: assigned.count(m) for m in counts},
                                                           "dynamic_pinned_nvfp4": fp4_dyn}


def fallback_policy(pipe, spec, device, settings, prompts, refs, deadline):
    """A short tuning on this device: profile 2 prompts, fit the predictors, then a small grid (DMPQ tau x TDC
    delta, static NVFP4 x delta) judged on the benchmark's first prompt; the fastest policy with PSNR >= 30 dB (else
    the best PSNR)."""
    import tempfile

    from sixbit_tune.predictor import fit_store, read_predictors, write_fit
    from sixbit_tune.profiling.runner import ProfileConfig, profile
    from sixbit_tune.runtime import apply_policy, make_dynamic_policy
    from sixbit_tune.search.quality import compare, generate
    from sixbit_tune.store import Store

    tmp = tempfile.mkdtemp(prefix="e2e-fallback-")
    run_id = profile(ProfileConfig(model=spec, prompts=list(prompts[:2]), store=tmp, steps=min(settings.steps, 20),
                                   device=str(device), progress=False, compile_stats=False))
    with Store.open(tmp) as store:
        fit_id = write_fit(store.writer(), fit_store(store, [run_id]))
        preds = read_predictors(store, fit_id)
    dyn = preds.dynamic_layers()
    betas = sorted(v[1] for v in dyn.values()) or [0.0]
    taus = [float("-inf"), betas[len(betas) // 2], float("inf")]  # -inf: dynamic layers INT8 (TDC alone)
    from sixbit_tune.runtime import make_static_policy

    best, tried = None, []
    grid = [("dynamic", tau, delta) for tau in taus for delta in (0.1, 0.25, 0.5)]
    grid += [("static-nvfp4", None, delta) for delta in (0.1, 0.25)]
    for kind, tau, delta in grid:
        if tried and time.monotonic() > deadline:
            break
        if kind == "dynamic":
            pol = make_dynamic_policy(pipe, dyn, tau, other_layers=preds.untrusted_mode, tdc_tolerance=delta,
                                      spec=spec, warmup=3, cooldown=2, max_skips=2)
        else:
            pol = make_static_policy(pipe, "nvfp4", delta, spec=spec, warmup=3, cooldown=2, max_skips=2)
        h = apply_policy(pipe, pol)
        try:
            if not tried:  # first candidate: one untimed run (Triton kernels compile on first use)
                generate(pipe, prompts[0], 0, settings)
            t0 = time.perf_counter()
            g = generate(pipe, prompts[0], 0, settings)
            dt = time.perf_counter() - t0
            q = compare(g, refs[prompts[0]], with_lpips=False)["psnr_db"]
            st = h.stats()
        finally:
            h.remove()
        tried.append({"kind": kind, "tau": tau, "delta": delta, "psnr_db": q, "seconds": dt,
                      "skip_share": st.skip_share if st else None, "nvfp4_share": st.nvfp4_share if st else None})
        key = (q >= 30.0, -dt if q >= 30.0 else q)
        if best is None or key > best[0]:
            best = (key, pol, kind, tau, delta)
    what = f"static NVFP4, delta={best[4]}" if best[2] != "dynamic" else f"DMPQ tau={best[3]:.4g}, delta={best[4]}"
    note = (f"short tuning in this run: profiled 2 prompts x {min(settings.steps, 20)} steps on "
            f"{device}, fitted predictors ({len(dyn)} trusted layers), then a grid of {len(tried)} policies, each "
            f"one eager generation of prompt 0: picked {what}, the fastest with PSNR >= 30 dB (else the best PSNR)")
    return best[1], note, tried


# ================================================================================================ runners
class PipelineRunner:
    """Full pipeline: one timed generation per prompt (+ one repeat), quality against bf16 eager."""

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
        cfg = self.adapter.transformer.config
        self.info = {"blocks": len(self.adapter.blocks()), "class": type(self.adapter.transformer).__name__,
                     "settings": self.settings.to_dict(), "prompts": list(wl.prompts),
                     "patch_size": list(cfg.get("patch_size", []) or [])}

    @property
    def transformer(self):
        return self.pipe.transformer

    def set_transformer(self, t) -> None:
        self.pipe.transformer = t
        from sixbit_tune.models.adapters import get_adapter

        self.adapter = get_adapter(self.pipe)

    def measure(self, clock, on_generation=None, make_refs=False) -> dict:
        """Warm-up generation, then one timed generation per prompt and a repeat of the first. ``on_generation(i)``
        is called after the warm-up (``i = -1``) and after each timed generation."""
        from sixbit_tune.search.quality import compare, generate

        prompts = list(self.wl.prompts)
        generate(self.pipe, prompts[0], 0, self.settings)  # warm-up (compilation happens here)
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
               "latency_runs_s": times, "peak_memory_bytes": peak_memory(self.device)}
        out["psnr_db"] = statistics.mean(q["psnr_db"] for q in quality) if quality else None
        ss = [q["ssim"] for q in quality if q["ssim"] is not None and not math.isnan(q["ssim"])]
        out["ssim"] = statistics.mean(ss) if ss else None
        out["psnr_db_per_prompt"] = [q["psnr_db"] for q in quality]
        if not quality:
            out["quality_note"] = "no bf16 eager reference videos (the bf16-eager run failed or was not run)"
        return out


class TransformerRunner:
    """Transformer only, random inputs of the real token count; CFG as the family's pipeline calls it."""

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

    def set_transformer(self, t) -> None:
        from sixbit_tune.models.adapters import get_adapter

        self._t = t
        self.adapter = get_adapter(t)

    def step(self, i: int, n: int) -> None:
        import torch

        t = torch.full((self.hidden.shape[0],), int(999 * (1 - i / n)), device=self.device, dtype=torch.long)
        tr = self._t
        if self.batched:
            with tr.cache_context(self.contexts[0]):
                tr(hidden_states=self.hidden, encoder_hidden_states=self.text, timestep=t, **self.rest)
        else:
            with tr.cache_context(self.contexts[0]):
                tr(hidden_states=self.hidden, encoder_hidden_states=self.text, timestep=t, **self.rest)
            with tr.cache_context(self.contexts[1]):
                tr(hidden_states=self.hidden, encoder_hidden_states=self.uncond, timestep=t, **self.rest)

    def measure(self, clock, handle=None, all_steps=False) -> dict:
        """Time ``steps_timed`` consecutive steps after a 2-step warm-up; with ``all_steps`` (contenders that replay
        a skip map) time all ``steps`` steps after warming up on the whole loop, so the replayed map is the
        reference's, step for step, and every block path is compiled before timing."""
        import torch

        n = self.wl.steps if all_steps else self.wl.steps_timed
        with torch.no_grad():
            for i in range(n if all_steps else min(2, n)):  # warm-up
                self.step(i, n)
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
                "peak_memory_bytes": peak_memory(self.device), "psnr_db": None, "ssim": None}


# ================================================================================================ the benchmark
class Bench:
    def __init__(self, args):
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
        self.meta["command"] = command_line(args)
        self.meta["budget_s"] = args.budget_s

    # ------------------------------------------------------------------------------------------ output
    def save(self) -> None:
        data = {"meta": self.meta, "workloads": self.workloads, "results": self.results, "replay": self.replay}
        add_speedups(data)
        tmp = self.out / "e2e.json.tmp"
        tmp.write_text(dumps(data))
        tmp.replace(self.out / "e2e.json")

    # ------------------------------------------------------------------------------------------ one contender
    def contender(self, wl: Workload, runner, name: str, fn, wl_deadline: float, est: float, **extra) -> dict:
        import torch

        row: dict[str, Any] = {"workload": wl.name, "contender": name, "latency_s": None, "latency_step_s": None,
                               "speedup_vs_bf16_compiled": None, "peak_memory_bytes": None, "weight_bytes": None,
                               "linear_weight_bytes": None, "psnr_db": None, "ssim": None, "nvfp4_share": None,
                               "skip_share": None, "compiled": False, "notes": [], "error": None,
                               "run_date": self.meta["date"], **extra}
        left = wl_deadline - time.monotonic()
        if left < est:
            row["error"] = f"not run: time budget ({left:.0f} s left for this workload, ~{est:.0f} s needed)"
            log(f"{wl.name} / {name}: skipped ({row['error']})")
            self.results.append(row)
            self.save()
            return row
        log(f"{wl.name} / {name}: start ({left:.0f} s left for this workload)")
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
            fn(row)
        except (Exception, ContenderTimeout) as e:  # recorded, the run goes on
            row["error"] = f"{type(e).__name__}: {e}"[:2000]
            row["traceback"] = traceback.format_exc()[-4000:]
            log(f"{wl.name} / {name}: FAILED {row['error'][:300]}")
        finally:
            if use_alarm:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, old)
            with contextlib.suppress(Exception):
                uncompile_blocks(runner.adapter)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        row["wall_s"] = round(time.monotonic() - t, 2)
        if row["latency_s"] is not None:
            log(f"{wl.name} / {name}: {row['latency_s']:.4f} s/video, {row['latency_step_s'] * 1e3:.2f} ms/step, "
                f"psnr {row['psnr_db']}, skip {row['skip_share']}, nvfp4 {row['nvfp4_share']} "
                f"({row['wall_s']:.0f} s wall)")
        self.results.append(row)
        self.save()
        return row

    def _measure(self, runner, row, handle=None, on_generation=None, all_steps=False):
        """Run the runner's measurement and collect the applied policy's statistics and the weight bytes."""
        if isinstance(runner, PipelineRunner):
            m = runner.measure(self.clock, on_generation, make_refs=row["contender"] == "bf16-eager")
        else:
            m = runner.measure(self.clock, handle, all_steps)
        row.update(m)
        if handle is not None:
            st = handle.stats()
            if st is not None:
                row["nvfp4_share"] = st.nvfp4_share
                row["skip_share"] = st.skip_share
                row["execution"] = st.execution
                row["tdc_cache_peak_bytes"] = st.cache_bytes
                row["runtime_notes"] = st.notes
        row["weight_bytes"], row["linear_weight_bytes"] = weight_bytes(runner.transformer, runner.adapter)

    def _attempt(self, runner, row, compile_, setup=None, teardown=None, compile_after_setup=False,
                 all_steps=False):
        """Measure a contender, its blocks compiled when ``compile_`` (falling back to eager, with a note, if
        compiling or the compiled run fails). ``setup()`` installs the contender (policy, cache, quantization) and
        returns ``(handle or None, on_generation or None)``; ``teardown(handle)`` takes it out. Blocks are compiled
        before ``setup`` (so hooks stay outside the compiled block forward) unless ``compile_after_setup``."""
        setup = setup or (lambda: (None, None))
        teardown = teardown or (lambda h: None)
        if compile_ and not self.args.no_compile:
            failed = None
            if not compile_after_setup:
                compile_blocks(runner.adapter)
            handle, on_gen = setup()
            try:
                if compile_after_setup:
                    compile_blocks(runner.adapter)
                row["compiled"] = True
                self._measure(runner, row, handle, on_gen, all_steps)
            except Exception as e:
                failed = e
                row["compiled"] = False
                row["notes"].append(f"compiled run failed ({type(e).__name__}: {str(e)[:300]}); measured eager")
                log(f"  compiled run failed: {type(e).__name__}: {str(e)[:300]}; retrying eager")
            finally:
                teardown(handle)
                uncompile_blocks(runner.adapter)
            if failed is None:
                return
        handle, on_gen = setup()
        try:
            self._measure(runner, row, handle, on_gen, all_steps)
        finally:
            teardown(handle)

    # ------------------------------------------------------------------------------------------ contenders
    def run_workload(self, wl: Workload) -> None:
        import torch

        start = time.monotonic()
        remaining_total = self.deadline - start
        wl_deadline = start + remaining_total * wl.budget_share / max(1e-9, self._share_left(wl))
        entry = {"name": wl.name, "spec": wl.spec, "kind": wl.kind, "steps": wl.steps, "steps_timed": wl.steps_timed,
                 "quality_meaningful": wl.quality_meaningful, "notes": wl.notes}
        self.workloads.append(entry)
        log(f"== workload {wl.name}: budget {wl_deadline - start:.0f} s")
        try:
            runner = PipelineRunner(wl, self.device, self.dtype) if wl.kind == "pipeline" else \
                TransformerRunner(wl, self.device, self.dtype)
        except Exception as e:
            entry["error"] = f"{type(e).__name__}: {e}"[:2000]
            log(f"{wl.name}: could not load: {entry['error']}")
            self.save()
            return
        entry.update(runner.info)
        walls: list[float] = []

        def go(name, fn, **extra):
            wanted = self.args.contenders
            if wanted and name != BASELINE and not any(name.startswith(w) for w in wanted):
                return {}
            est = statistics.mean(walls) if walls else 0.0
            row = self.contender(wl, runner, name, fn, wl_deadline, est, **extra)
            if row.get("wall_s"):
                walls.append(row["wall_s"])
            return row

        from sixbit_tune.runtime import apply_policy, make_static_policy

        def plain(compile_):
            def fn(row):
                self._attempt(runner, row, compile_)
            return fn

        # The bf16 eager run comes first on a pipeline: it makes the quality references.
        if wl.kind == "pipeline" or not self.args.contenders or "bf16-eager" in self.args.contenders:
            self.contender(wl, runner, "bf16-eager", plain(False), wl_deadline, 0.0, kind="baseline")
        go(BASELINE, plain(True), kind="baseline")

        def ours(policy_fn, replay_map=None, record=None, compile_=True):
            def fn(row):
                policy = policy_fn(row)

                def setup():
                    # the runtime's per-block statistics fused with torch.compile wherever the blocks are compiled
                    fuse = compile_ and not self.args.no_compile and not self.args.no_compile_stats
                    row["compile_stats"] = fuse  # a failed compile shows in runtime_notes
                    if isinstance(runner, PipelineRunner):
                        h = apply_policy(runner.pipe, policy, compile_stats=fuse)
                    else:
                        steps = wl.steps if replay_map is not None else wl.steps_timed  # the steps measure() runs
                        h = apply_policy(runner.transformer, policy, num_inference_steps=steps, compile_stats=fuse)
                    on_gen = None
                    if replay_map is not None:
                        force_skips(h, replay_map)
                    if record is not None:
                        rec = record_policy_skips(h)

                        def on_gen(i, rec=rec):
                            if i == 0:
                                record["map"] = skip_fraction_map(rec)
                            rec.clear()
                    return h, on_gen

                self._attempt(runner, row, compile_, setup, lambda h: h.remove(),
                              all_steps=replay_map is not None and map_share(replay_map) > 0)
            return fn

        def static(fmt, compile_=True):
            return ours(lambda row: make_static_policy(runner.transformer, fmt, spec=wl.spec), compile_=compile_)

        # Order = priority (a contender that no longer fits the time budget is skipped with that reason):
        # the chosen policy, the peers, then the static corners and the eager variants.
        if wl.kind == "pipeline":
            self._ours_chosen_pipeline(wl, runner, go, ours)
            self._fbc_pipeline(wl, runner, go)
        else:
            self._replays(wl, runner, go, ours, part="ours")
        for label, cfg_name in (("torchao-fp8-dynamic", "fp8"), ("torchao-int8-dynamic", "int8")):
            go(label, self._torchao(runner, cfg_name), kind="peer")
        if wl.kind != "pipeline":
            self._replays(wl, runner, go, ours, part="fbc")
        go("ours-int8", static("int8"), kind="ours")
        go("ours-nvfp4", static("nvfp4"), kind="ours")
        if not self.args.no_compile and self.args.eager_variants:
            if wl.kind == "pipeline":
                for fmt in ("int8", "nvfp4"):
                    go(f"ours-{fmt} (eager)", static(fmt, compile_=False), kind="ours")
            else:
                self._replays(wl, runner, go, ours, part="eager")
        if self.args.repeat_baseline:  # drift check: the baseline again, after every other contender
            self.contender(wl, runner, f"{BASELINE} (repeat)", plain(True), wl_deadline, 0.0, kind="baseline")
        runner = None  # free the model before the next workload
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _share_left(self, wl) -> float:
        done = {w["name"] for w in self.workloads}
        return sum(w.budget_share for w in self._wls if w.name not in done or w.name == wl.name)

    def _ours_chosen_pipeline(self, wl, runner, go, ours):
        """``ours-chosen``: the exported policy for this model (as exported). ``ours-tuned``: a short tuning on this
        device (profile, fit, small DMPQ/TDC grid; :func:`fallback_policy`), run when no policy was exported or
        when the exported one skips no block (then it cannot move the time on this GPU, DESIGN §4). The transformer
        workloads replay the faster of the two among those with PSNR >= 30 dB (else the one with the best PSNR)."""
        if self.args.policy:
            from sixbit_tune.runtime import load_policy

            given = [(name, (load_policy(path), path)) for name, path in policy_args(self.args)]
        else:
            found = find_policy(runner.transformer, wl.spec)
            given = [("ours-chosen", found)] if found is not None else []

        def exported(row, found):
            pol, path = found
            note = (f"policy {path} (study {pol.provenance.study}, trial {pol.provenance.trial}, tuned on "
                    f"{pol.target.gpu or 'CPU'}) applied as exported")
            return {"policy": pol, "notes": [note], "policy_summary": policy_summary(pol), "policy_path": path}

        def tuned(row):
            deadline = time.monotonic() + 0.25 * max(0.0, self.deadline - time.monotonic())
            pol, note, tried = fallback_policy(runner.pipe, wl.spec, self.device, runner.settings, list(wl.prompts),
                                               runner.refs, deadline)
            return {"policy": pol, "notes": [note], "policy_summary": policy_summary(pol), "fallback_grid": tried,
                    "policy_path": f"tuned in this run on {self.device.type}"}

        def source(make):
            made: dict[str, Any] = {}

            def policy_fn(row):
                if not made:
                    made.update(make(row))
                row.update({k: v for k, v in made.items() if k not in ("policy", "notes")})
                row["notes"].extend(made["notes"])
                return made["policy"]
            return policy_fn, made

        candidates = []
        runs = [(name, functools.partial(exported, found=found)) for name, found in given]
        if not any(pol.tdc.tolerance > 0 and pol.tdc.max_skips > 0 for _, (pol, _path) in given):
            runs.append(("ours-tuned", tuned))
        for name, make in runs:
            record: dict[str, Any] = {}
            policy_fn, made = source(make)
            row = go(name, ours(policy_fn, record=record), kind="ours")
            if "map" in record and row.get("latency_s") and made:
                candidates.append((row, record["map"], made["policy"], policy_fn, name))
        if not candidates:
            return
        # Every policy measured here is replayed on the transformer workloads; the FirstBlockCache pattern is
        # matched to the quality of the one with the most skipping among those at >= 30 dB (else the best PSNR).
        ok = [c for c in candidates if (c[0].get("psnr_db") or 0) >= 30.0]
        pick = max(ok, key=lambda c: c[0].get("skip_share") or 0) if ok else \
            max(candidates, key=lambda c: c[0]["psnr_db"] or 0)
        self.replay["candidates"] = [
            {"name": name, "policy": pol.to_dict(), "map": skip_map, "nvfp4_share": row.get("nvfp4_share"),
             "psnr_db": row.get("psnr_db"), "skip_share": row.get("skip_share"), "source": f"{wl.name} / {name}"}
            for row, skip_map, pol, _, name in candidates]
        row, skip_map, pol, policy_fn, name = pick
        self.replay.update({"policy": pol.to_dict(), "ours_map": skip_map, "ours_nvfp4_share": row.get("nvfp4_share"),
                            "ours_psnr_db": row.get("psnr_db"), "ours_skip_share": row.get("skip_share"),
                            "source": f"{wl.name} / {name}"})
        self.save()
        if not self.args.no_compile and self.args.eager_variants:
            go(f"{name} (eager)", ours(policy_fn, compile_=False), kind="ours")

    def _fbc_pipeline(self, wl, runner, go):
        from diffusers import FirstBlockCacheConfig

        fbc_rows = []
        blocks = len(runner.adapter.blocks())
        for thr in self.args.fbc_thresholds:
            rec_holder: dict[str, Any] = {}

            def fn(row, thr=thr, rec_holder=rec_holder):
                tr = runner.transformer
                hooks = []

                def setup():
                    tr.enable_cache(FirstBlockCacheConfig(threshold=thr))
                    rec, hook = record_fbc_skips(runner.adapter.blocks()[0].module)
                    hooks.append(hook)

                    def on_gen(i, rec=rec):
                        if i == 0:
                            rec_holder["steps"] = {k: list(v) for k, v in rec.items()}
                        rec.clear()
                    return None, on_gen

                def teardown(_h):
                    while hooks:
                        hooks.pop().remove()
                    tr.disable_cache()

                self._attempt(runner, row, True, setup, teardown)
                seqs = rec_holder.get("steps", {})
                calls = sum(len(v) for v in seqs.values())
                row["skip_share"] = fbc_skip_share(seqs, blocks)
                row["skipped_steps_share"] = sum(sum(v) for v in seqs.values()) / calls if calls else None
                row["notes"].append("skip share = calls whose blocks 1..L-1 were answered from the cache x (L-1)/L")

            row = go(f"fbc-{thr:g}", fn, kind="peer", threshold=thr)
            if "steps" in rec_holder:
                seqs = rec_holder["steps"]
                n = max(len(v) for v in seqs.values())
                frac = [[sum(v[s] for v in seqs.values() if s < len(v)) / len(seqs)] * 2 for s in range(n)]
                fbc_rows.append({"threshold": thr, "map": frac, "psnr_db": row.get("psnr_db"),
                                 "latency_s": row.get("latency_s"), "skip_share": row.get("skip_share")})
        self.replay["fbc"] = fbc_rows
        self.save()

    def _replays(self, wl, runner, go, ours, part: str):
        """Transformer workloads: ``part`` "ours" (the chosen policy replayed), "fbc" (FirstBlockCache's pattern
        replayed) or "eager" (the chosen policy replayed, blocks not compiled)."""
        rp = self.replay
        pol_dict = rp.get("policy")
        if pol_dict is None:
            name = {"ours": "ours-chosen (replay)", "fbc": "fbc (replay)", "eager": "ours-chosen (replay, eager)"}
            go(name[part], _raise("no chosen reference policy was recorded in this run (reference workload missing "
                                  "or failed; pass --replay-from a results JSON that has one)"), kind="ours")
            return
        from sixbit_tune.runtime import load_policy

        ref_pol = load_policy(pol_dict)
        blocks, n = len(runner.adapter.blocks()), wl.steps  # replays time every step (measure(all_steps=True))
        ours_map = scale_map(rp.get("ours_map") or [], n, blocks, runner.contexts)

        def chosen(row):
            pol, info = replay_policy(runner.transformer, ref_pol, rp.get("ours_nvfp4_share"), map_share(ours_map) > 0)
            row["replay"] = {"from": rp.get("source"), "reference_skip_share": rp.get("ours_skip_share"),
                             "reference_nvfp4_share": rp.get("ours_nvfp4_share"),
                             "replayed_map_share": map_share(ours_map), "layer_modes": info["modes"],
                             "dynamic_pinned_nvfp4": info["dynamic_pinned_nvfp4"]}
            row["notes"].append("random weights: the reference run's skip map and NVFP4 share are replayed (forced), "
                                "not decided; " + REPLAY_RULE[len(runner.contexts) == 1])
            return pol

        label = (rp.get("source") or "ours-chosen").split(" / ")[-1]
        if part == "ours":
            go(f"{label} (replay)", ours(chosen, replay_map=ours_map), kind="ours")
            return
        if part == "eager":
            go(f"{label} (replay, eager)", ours(chosen, replay_map=ours_map, compile_=False), kind="ours")
            return
        # FirstBlockCache: replay the step pattern of the threshold that matched our quality on the reference.
        fbc = [f for f in rp.get("fbc", []) if f.get("psnr_db") is not None]
        target_q = rp.get("ours_psnr_db")
        if not fbc:
            go("fbc (replay)", _raise("no FirstBlockCache run with a quality figure was recorded"), kind="peer")
            return
        ok = [f for f in fbc if target_q is None or f["psnr_db"] >= target_q]
        pick = max(ok, key=lambda f: f["threshold"]) if ok else max(fbc, key=lambda f: f["psnr_db"])
        fbc_map = scale_map(pick["map"], n, blocks, runner.contexts, fbc=True)

        def fbc_fn(row):
            from sixbit_tune.runtime import make_static_policy

            pol = make_static_policy(runner.transformer, "none", 1e-30 if map_share(fbc_map) > 0 else 0.0,
                                     warmup=0, cooldown=0, max_skips=10_000)
            row["replay"] = {"threshold": pick["threshold"], "reference_psnr_db": pick["psnr_db"],
                             "reference_skip_share": pick.get("skip_share"),
                             "replayed_map_share": map_share(fbc_map), "matched_to_ours_psnr_db": target_q}
            row["notes"].append("FirstBlockCache's step pattern on the reference (largest threshold with PSNR >= "
                                "ours) replayed through the sixbit runtime in bf16 (block 0 always runs); "
                                + REPLAY_RULE[len(runner.contexts) == 1])
            return pol

        go(f"fbc-{pick['threshold']:g} (replay)", ours(fbc_fn, replay_map=fbc_map), kind="peer")

    def _torchao(self, runner, which):
        def fn(row):
            import torch

            try:
                import torchao
                from torchao.quantization import (
                    Float8DynamicActivationFloat8WeightConfig,
                    Int8DynamicActivationInt8WeightConfig,
                    PerRow,
                    quantize_,
                )
            except ImportError as e:
                raise RuntimeError(f"torchao is not installed here ({e})") from e
            row["torchao"] = torchao.__version__
            linears = runner.adapter.all_linears()
            cfg = Int8DynamicActivationInt8WeightConfig() if which == "int8" else \
                Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
            saved: dict[str, Any] = {}

            def setup():
                # in place (no model copy): keep the bf16 weights on the host, quantize the in-block linears
                for name, lin in linears.items():
                    saved[name] = lin.weight.detach().to("cpu")
                names = set(linears)
                quantize_(runner.transformer, cfg, filter_fn=lambda m, fqn: fqn in names)
                return None, None

            def teardown(_h):
                for name, lin in linears.items():
                    if name in saved:
                        lin.weight = torch.nn.Parameter(saved.pop(name).to(self.device), requires_grad=False)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

            compile_ = isinstance(runner, PipelineRunner) or self.args.torchao_compile
            self._attempt(runner, row, compile_, setup, teardown, compile_after_setup=True)
            if not compile_:
                row["notes"].append("eager: in the first H200 run, compiling the torchao-quantized CogVideoX-2B blocks "
                                    "did not finish within 270 s, so on the shape workloads torchao runs uncompiled")
            row["notes"].append(f"torchao {which} dynamic on the in-block linears (same layers as ours)")
        return fn

    def run(self, wls: list[Workload]) -> None:
        self._wls = wls
        for wl in wls:
            if time.monotonic() > self.deadline:
                self.workloads.append({"name": wl.name, "spec": wl.spec, "error": "not run: time budget"})
                continue
            self.run_workload(wl)
        self.meta["wall_s"] = round(time.monotonic() - self.t0, 1)
        self.save()


class ContenderTimeout(BaseException):
    """A contender ran past its time cap (a BaseException so that no eager-fallback ``except Exception`` retries)."""


def _raise(msg):
    def fn(row):
        raise RuntimeError(msg)
    return fn


def _json_default(o):
    return str(o)


def _finite(o):
    """JSON has no Infinity/NaN: write non-finite floats as the strings "inf", "-inf", "nan"."""
    if isinstance(o, float) and not math.isfinite(o):
        return "nan" if math.isnan(o) else ("inf" if o > 0 else "-inf")
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_finite(v) for v in o]
    return o


def dumps(data) -> str:
    return json.dumps(_finite(data), indent=1, default=_json_default, allow_nan=False)


def policy_summary(pol) -> dict:
    modes = [lp.mode for lp in pol.dmpq.layers.values()]
    return {"threshold": pol.dmpq.threshold, "modes": {m: modes.count(m) for m in sorted(set(modes))},
            "tdc": dataclasses.asdict(pol.tdc), "target": dataclasses.asdict(pol.target)}


def environment(device, dtype) -> dict:
    import torch

    meta: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    for mod in ("triton", "diffusers", "torchao", "torchmetrics"):
        try:
            meta[mod] = __import__(mod).__version__
        except Exception:
            meta[mod] = None
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
        meta["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        meta["gpu"] = None
    try:
        from sixbit_tune.kernels import kernel_path

        meta["kernel_paths"] = {f: kernel_path(f, device) for f in ("int8", "nvfp4")}
    except Exception as e:
        meta["kernel_paths"] = f"unknown ({e})"
    return meta


def add_speedups(data: dict) -> None:
    base = {r["workload"]: r["latency_s"] for r in data["results"] if r["contender"] == BASELINE and r["latency_s"]}
    wb = {r["workload"]: r["weight_bytes"] for r in data["results"]
          if r["contender"] in ("bf16-eager", BASELINE) and r.get("weight_bytes")}
    for r in data["results"]:
        b = base.get(r["workload"])
        r["speedup_vs_bf16_compiled"] = (b / r["latency_s"]) if (b and r.get("latency_s")) else None
        w = wb.get(r["workload"])
        r["weight_reduction_vs_bf16"] = (w / r["weight_bytes"]) if (w and r.get("weight_bytes")) else None


# ================================================================================================ rendering
def merge(paths: list[str]) -> dict:
    """Merge result files; later files replace earlier rows of the same (workload, contender) and workloads."""
    data = {"meta": {}, "workloads": [], "results": [], "replay": {}}
    for i, p in enumerate(paths, start=1):
        d = json.loads(Path(p).read_text())
        for r in d["results"]:
            r.setdefault("run", i)
        data["meta"] = {**data["meta"], **d["meta"]} if not data["meta"] else data["meta"]
        data.setdefault("runs", []).append({"file": os.path.basename(p), "command": d["meta"].get("command"),
                                            "date": d["meta"].get("date"), "wall_s": d["meta"].get("wall_s")})
        old_wl = {w["name"]: w for w in data["workloads"]}
        for w in d["workloads"]:
            if w["name"] in old_wl:
                merged = {**old_wl[w["name"]], **w, "notes": list(dict.fromkeys(old_wl[w["name"]].get("notes", [])
                                                                            + w.get("notes", [])))}
                data["workloads"][data["workloads"].index(old_wl[w["name"]])] = merged
            else:
                data["workloads"].append(w)
        # A later row replaces an earlier one of the same (workload, contender) unless it failed where the earlier
        # one did not, or its run's baseline failed (its speedup would be missing) while the earlier row is fine.
        base_ok = {r["workload"] for r in d["results"] if r["contender"] == BASELINE and not r.get("error")}
        old = {(r["workload"], r["contender"]): r for r in data["results"]}
        for r in d["results"]:
            key = (r["workload"], r["contender"])
            prev = old.get(key)
            keep_prev = prev is not None and not prev.get("error") and (
                r.get("error") or r["workload"] not in base_ok)
            if prev is not None and not keep_prev:
                data["results"][data["results"].index(prev)] = r
            elif prev is None:
                data["results"].append(r)
        if d.get("replay"):
            data["replay"] = d["replay"]
    # speedups stay those computed inside each file: a ratio is only meaningful against the baseline measured in
    # the same run (same machine, same process)
    return data


def _fmt(v, spec, scale=1.0, none="—"):
    if v is None:
        return none
    return format(v * scale, spec)


def _x(v) -> str:
    return "—" if v is None else f"{v:.2f}×"


def markdown(data: dict) -> str:
    m = data["meta"]
    lines = [
        f"GPU: {m.get('gpu') or 'CPU'} (cc {m.get('compute_capability')}); torch {m.get('torch')}, triton "
        f"{m.get('triton')}, diffusers {m.get('diffusers')}, torchao {m.get('torchao')}; kernel paths "
        f"{m.get('kernel_paths')}; {m.get('date')}.",
        "",
        "Runs: " + "; ".join(f"run {i} ({r.get('file', 'this run')}): `{r['command']}` ({r.get('date')})"
                             for i, r in enumerate(data.get("runs", [{"command": m.get("command")}]), start=1))
        + ". Speedups are against the compiled bf16 baseline of the same run (column run).",
        "",
    ]
    for w in data["workloads"]:
        rows = [r for r in data["results"] if r["workload"] == w["name"]]
        lines.append(f"### {w['name']}")
        desc = []
        if w.get("kind") == "pipeline":
            desc.append(f"full pipeline, {w.get('steps')} steps, CFG; latency = median whole-pipeline call")
        else:
            desc.append(f"transformer only, random weights, {w.get('cfg', '')}; per-video = mean of "
                        f"{w.get('steps_timed')} timed consecutive steps x {w.get('steps')} (skip-map replays: all "
                        f"{w.get('steps')} steps timed)")
        if w.get("video_tokens_per_row"):
            desc.append(f"{w['video_tokens_per_row']} video tokens per row, latent {w.get('latent_shape')}")
        if w.get("error"):
            desc.append(f"**not run: {w['error']}**")
        lines.append("; ".join(desc) + ".")
        for n in w.get("notes", []):
            lines.append(f"- {n}")
        lines += [
            "",
            "| contender | s/video | ms/step | speedup vs bf16 compiled | peak mem GiB | weights MiB | weight ÷ | "
            "PSNR dB | SSIM | NVFP4 share | skip share | compiled | run |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
        ]
        for r in rows:
            if r.get("error"):
                lines.append(f"| {r['contender']} | — | — | — | — | — | — | — | — | — | — | error: "
                             f"{r['error'][:160].replace('|', '/')} | {r.get('run', '')} |")
                continue
            lines.append(
                f"| {r['contender']} | {_fmt(r['latency_s'], '.3f')} | {_fmt(r['latency_step_s'], '.2f', 1e3)} | "
                f"{_x(r['speedup_vs_bf16_compiled'])} | {_fmt(r['peak_memory_bytes'], '.2f', 2**-30)} | "
                f"{_fmt(r['weight_bytes'], '.1f', 2**-20)} | {_x(r.get('weight_reduction_vs_bf16'))} | "
                f"{_fmt(r['psnr_db'], '.1f')} | {_fmt(r['ssim'], '.3f')} | {_fmt(r['nvfp4_share'], '.2f')} | "
                f"{_fmt(r['skip_share'], '.2f')} | {'yes' if r.get('compiled') else 'no'} | {r.get('run', '')} |")
        lines.append("")
    return "\n".join(lines)


def figure(data: dict, path: Path) -> None:
    """Speedup against compiled bf16 (top) and transformer weight reduction against bf16 (bottom), per workload;
    bars of the pipeline workload carry their PSNR."""
    from plotly.subplots import make_subplots

    wls = [w["name"] for w in data["workloads"] if not w.get("error")]
    cols = max(1, len(wls))
    fig = make_subplots(rows=2, cols=cols, subplot_titles=wls + [""] * cols, vertical_spacing=0.22)

    def colour(name: str) -> str:
        return "#2a9d8f" if name.startswith("ours") else "#8d99ae" if name.startswith("bf16") else "#e76f51"

    for j, w in enumerate(wls, start=1):
        rows = [r for r in data["results"] if r["workload"] == w and r.get("latency_s")]
        sp = [r for r in rows if r.get("speedup_vs_bf16_compiled")]
        fig.add_bar(x=[r["contender"] for r in sp], y=[r["speedup_vs_bf16_compiled"] for r in sp],
                    text=[f"{r['speedup_vs_bf16_compiled']:.2f}×" + (f"<br>{r['psnr_db']:.1f} dB"
                                                                     if r.get("psnr_db") is not None else "")
                          for r in sp],
                    marker_color=[colour(r["contender"]) for r in sp], showlegend=False, row=1, col=j)
        wr = [r for r in rows if r.get("weight_reduction_vs_bf16")]
        fig.add_bar(x=[r["contender"] for r in wr], y=[r["weight_reduction_vs_bf16"] for r in wr],
                    text=[f"{r['weight_reduction_vs_bf16']:.2f}×" for r in wr],
                    marker_color=[colour(r["contender"]) for r in wr], showlegend=False, row=2, col=j)
    fig.update_yaxes(title_text="speedup vs bf16 compiled (×)", row=1, col=1)
    fig.update_yaxes(title_text="transformer weights ÷ (vs bf16)", row=2, col=1)
    m = data["meta"]
    fig.update_layout(title=f"sixbit-tune end-to-end on {m.get('gpu') or 'CPU'} — torch {m.get('torch')}, triton "
                            f"{m.get('triton')}, {m.get('date')}", height=900, width=max(800, 560 * cols))
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)


def update_readme(md: str, readme: Path) -> None:
    text = readme.read_text()
    section = f"{README_HEADING}\n\n{md.strip()}\n"
    if README_HEADING in text:
        start = text.index(README_HEADING)
        nxt = text.find("\n## ", start + len(README_HEADING))
        text = text[:start] + section + ("" if nxt < 0 else "\n" + text[nxt + 1:])
    else:
        text = text.rstrip("\n") + "\n\n" + section
    readme.write_text(text)


def render(paths: list[str], prefix: str, readme_md: str | None = None, readme: str | None = None,
           summary: str | None = None) -> dict:
    data = merge(paths)
    prefix_p = Path(prefix)
    prefix_p.parent.mkdir(parents=True, exist_ok=True)
    prefix_p.with_suffix(".json").write_text(dumps(data))
    md = markdown(data)
    if summary:
        md = f"{summary.strip()}\n\n{md}"
    prefix_p.with_suffix(".md").write_text(f"# End-to-end benchmark\n\n{md}")
    try:
        figure(data, prefix_p.with_suffix(".html"))
    except ImportError as e:
        print(f"no figure: {e}", file=sys.stderr)
    if readme:
        update_readme(readme_md if readme_md is not None else md, Path(readme))
    return data


# ================================================================================================ CLI
def command_line(args) -> str:
    """The benchmark command equivalent to ``args``: every option that differs from its default."""
    defaults = vars(build_parser().parse_args([]))
    parts = ["python benchmarks/e2e.py"]
    for key, value in vars(args).items():
        if key.startswith("_") or key not in defaults or key in ("func", "command"):
            continue
        default = defaults[key]
        if value == default or (key == "steps" and value == (2 if args.smoke else 50)):
            continue
        if key == "fbc_thresholds" and value == ([0.1] if args.smoke else list(FBC_THRESHOLDS)):
            continue
        if key == "device" and args.smoke and value == "cpu":
            continue
        if key == "out" and value == os.environ.get("OUT"):
            value = "$OUT"
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            parts.append(f"{flag} {','.join(format(v, 'g') if isinstance(v, float) else str(v) for v in value)}")
        else:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--smoke", action="store_true", help="CPU code-path check on tiny:wan (pipeline) and "
                   "tiny:cogvideox (transformer), 2 steps")
    p.add_argument("--out", default=None, help="output folder (default $OUT or artifacts/e2e); with --render: the "
                   "path prefix of the .json/.md/.html")
    p.add_argument("--workloads", default=None, help="comma-separated specs/names to run (default: all)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per video (default 50; --smoke 2)")
    p.add_argument("--steps-timed", type=int, default=None, help="transformer workloads: consecutive steps timed "
                   "(default: --steps)")
    p.add_argument("--prompts", type=int, default=2, help="reference workload: prompts (timed + quality)")
    p.add_argument("--budget-s", type=float, default=500.0, help="wall-clock budget of the whole run")
    p.add_argument("--fbc-thresholds", default=None, help="FirstBlockCache thresholds (comma-separated)")
    p.add_argument("--policy", default=None, help="policy JSON(s) for the pipeline workload, comma-separated "
                   "(default: newest fitting one in policies/)")
    p.add_argument("--replay-from", default=None, help="results JSON whose reference skip maps the transformer "
                   "workloads replay (when the reference workload is not in this run)")
    p.add_argument("--no-compile", action="store_true", help="measure everything eager")
    p.add_argument("--torchao-compile", action="store_true", help="compile torchao's blocks on the transformer "
                   "workloads too (default: only on the pipeline workload)")
    p.add_argument("--policy-name", default="ours-chosen", help="contender name(s) of --policy, comma-separated, "
                   "one per policy")
    p.add_argument("--no-compile-stats", action="store_true", help="keep the runtime's per-block statistics eager "
                   "(default: fused with torch.compile wherever the blocks are compiled)")
    p.add_argument("--repeat-baseline", action="store_true", help="measure the compiled bf16 baseline again at the "
                   "end of each workload (a drift check; ratios stay against the first)")
    p.add_argument("--eager-variants", action="store_true", help="also measure our policies with blocks not "
                   "compiled")
    p.add_argument("--contenders", default=None, help="comma-separated name prefixes to run (the compiled bf16 "
                   "baseline always runs; the bf16 eager run too on a pipeline workload: it makes the quality "
                   "references)")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="model dtype (default: bfloat16 on "
                   "CUDA, float32 on the CPU)")
    p.add_argument("--shape-size", default=None, help="frames,height,width of the shape: workloads (default: the "
                   "published sizes; smaller ones are for checking the code path)")
    p.add_argument("--render", nargs="+", default=None, metavar="JSON", help="merge result files and write "
                   "<out>.json/.md/.html instead of running")
    p.add_argument("--readme", default=None, help="with --render: README whose results section to rewrite")
    p.add_argument("--summary", default=None, help="with --render: markdown file put above the tables")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_args(args)


def run_args(args) -> int:
    if args.render:
        summary = Path(args.summary).read_text() if args.summary else None
        render(args.render, args.out or "benchmarks/results/e2e-h200", readme=args.readme, summary=summary)
        return 0
    if args.steps is None:
        args.steps = 2 if args.smoke else 50
    args.fbc_thresholds = [float(x) for x in args.fbc_thresholds.split(",")] if args.fbc_thresholds else \
        ([0.1] if args.smoke else list(FBC_THRESHOLDS))
    args.out = args.out or os.environ.get("OUT") or str(ROOT / "artifacts" / "e2e")
    if isinstance(args.contenders, str):
        args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if args.smoke and args.device is None:
        args.device = "cpu"
    if args.policy:
        policy_args(args)  # bad --policy / --policy-name fail here, before anything runs
    bench = Bench(args)
    import torch

    # Compiled regions are recompiled per input layout (the first block sees other strides) and per quantized-layer
    # fragment: raise dynamo's limits so that nothing silently falls back to eager.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = 4096
    wls = workloads_for(args)
    log(f"device {bench.device} {bench.meta.get('gpu')}; workloads {[w.name for w in wls]}; out {bench.out}")
    bench.run(wls)
    print(markdown(merge([str(bench.out / "e2e.json")])), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
