"""The contenders: each a small declared unit — its name, its kind (``baseline``, ``peer`` or ``ours``), how its
model is compiled, what it needs (CUDA, torchao, cache-dit), and the parts it installs on the model, in order
(each part returns how to take it out again).

Compilation (``compile``): ``"blocks"`` — every transformer block's ``forward`` under ``torch.compile`` (the
baseline's setting; hooks installed afterwards stay outside the compiled region); ``"graphs"`` — the whole
transformer under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs); ``"eager"``.

Which contenders a workload runs, in priority order (a contender that no longer fits the time budget is skipped
with that reason), is :func:`pipeline_contenders` / :func:`transformer_contenders`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .skipmaps import (
    REPLAY_RULE,
    map_share,
    record_fbc_skips,
    scale_map,
    skip_fraction_map,
    step_pattern_map,
    step_skip_share,
)

BASELINE = "bf16-compiled"
#: cache families recorded on the pipeline workload and replayed on the transformer workloads
CACHE_FAMILIES = ("fbc", "dbcache", "dbcache-taylorseer")
#: blocks that cache-dit's DBCache always computes first (Fn) and last (Bn) in this benchmark; with Fn=1, Bn=0 it
#: skips the same blocks FirstBlockCache does, so the two differ only in their step decisions
DBCACHE_FN, DBCACHE_BN = 1, 0


@dataclass
class Context:
    """What a part sees while it installs: the workload, its runner, the run's options and its replay store."""

    wl: Any
    runner: Any
    device: Any
    args: Any
    replay: dict
    deadline: float
    mode: str = "eager"  # how the current contender's model is compiled: "blocks" | "graphs" | "eager"


@dataclass
class Installed:
    """What installing a part left on the model."""

    remove: Callable[[], None] = lambda: None
    handle: Any = None  # a PolicyHandle: its run statistics fill the row after measuring
    on_generation: Callable[[int], None] | None = None  # pipeline: after the warm-up (-1) and each timed video
    finish: Callable[[dict], None] | None = None  # fills the row after measuring


@dataclass(frozen=True)
class Part:
    name: str
    install: Callable[[Context, dict], Installed]
    needs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # "baseline" | "peer" | "ours"
    parts: tuple[Part, ...] = ()
    compile: str = "blocks"  # "blocks" | "graphs" | "eager"
    #: how many parts are installed before the blocks are compiled: weight quantization (torchao) goes before,
    #: hooks (our runtime, the caches) after, so that they wrap the compiled block forward and stay outside it
    compile_after: int = 0
    needs: tuple[str, ...] = ()
    replay: bool = False  # replays a skip map: all steps timed
    fields: dict = field(default_factory=dict)  # extra row fields

    def requirements(self) -> tuple[str, ...]:
        out = list(self.needs)
        for p in self.parts:
            out += [n for n in p.needs if n not in out]
        return tuple(dict.fromkeys(out))


# ------------------------------------------------------------------------------------------------ requirements
def _import_reason(module: str, names: tuple[str, ...] = ()) -> str | None:
    try:
        mod = __import__(module, fromlist=list(names) or None)
        for n in names:
            getattr(mod, n)
    except (ImportError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def missing(needs: tuple[str, ...], device) -> str | None:
    """Why a contender with these needs cannot run here, or None."""
    import torch

    reasons = []
    for need in needs:
        if need == "cuda" and torch.device(device).type != "cuda":
            reasons.append(f"needs CUDA (this run is on {torch.device(device).type})")
        elif need == "fp8" and torch.device(device).type == "cuda" and \
                torch.cuda.get_device_capability(device) < (8, 9):
            cc = ".".join(map(str, torch.cuda.get_device_capability(device)))
            reasons.append(f"needs FP8 tensor cores (compute capability 8.9 or later; this GPU has {cc})")
        elif need == "torchao":
            why = _import_reason("torchao.quantization", ("Float8DynamicActivationFloat8WeightConfig", "PerRow",
                                                          "quantize_"))
            if why:
                reasons.append(f"needs torchao, which is not importable here ({why})")
        elif need == "cache_dit":
            why = _import_reason("cache_dit", ("enable_cache", "disable_cache", "summary", "BlockAdapter",
                                               "ForwardPattern", "DBCacheConfig", "TaylorSeerCalibratorConfig"))
            if why:
                reasons.append(f"needs cache-dit (PyPI 'cache-dit'), which is not importable here ({why})")
    return "; ".join(reasons) or None


# ------------------------------------------------------------------------------------------------ parts
def policy_part(make_policy: Callable[[Context, dict], Any], record: str | None = None,
                replay_map: dict | None = None) -> Part:
    """Apply one of our policies (``make_policy(ctx, row)``). ``record``: name under which the skip map of the first
    timed video is kept (pipeline); ``replay_map``: the skip map forced on every step (transformer workloads)."""

    def install(ctx: Context, row: dict) -> Installed:
        from sixbit_tune.runtime import apply_policy

        policy = make_policy(ctx, row)
        # the runtime's per-block statistics fused with torch.compile wherever the blocks are compiled
        fuse = ctx.mode == "blocks" and not ctx.args.no_compile_stats
        row["compile_stats"] = fuse  # a failed compile shows in runtime_notes
        if ctx.runner.kind == "pipeline":
            h = apply_policy(ctx.runner.target, policy, compile_stats=fuse)
        else:
            steps = ctx.wl.steps if replay_map is not None else ctx.wl.steps_timed  # the steps measure() runs
            h = apply_policy(ctx.runner.target, policy, num_inference_steps=steps, compile_stats=fuse)
        on_gen = None
        if replay_map is not None:
            h.force_skips(replay_map)
        if record is not None:
            rec = h.record_skips()

            def on_gen(i: int) -> None:
                if i == 0:
                    ctx.replay.setdefault("_maps", {})[record] = skip_fraction_map(rec)
                rec.clear()

        return Installed(remove=h.remove, handle=h, on_generation=on_gen)

    return Part("policy", install)


def _fp8_install(ctx: Context, row: dict) -> Installed:
    """torchao's dynamic FP8 (row-wise scales) on the in-block linears, in place: the bf16 weights wait on the host
    and are put back on removal."""
    import torch
    import torchao
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    row["torchao"] = torchao.__version__
    linears = ctx.runner.adapter.all_linears()
    saved = {name: lin.weight.detach().to("cpu") for name, lin in linears.items()}
    names = set(linears)
    quantize_(ctx.runner.transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda m, fqn: fqn in names)
    row["notes"].append("torchao FP8 dynamic row-wise on the in-block linears (the layers our policies replace)")

    def remove() -> None:
        for name, lin in linears.items():
            if name in saved:
                lin.weight = torch.nn.Parameter(saved.pop(name).to(ctx.device), requires_grad=False)

    return Installed(remove=remove)


FP8 = Part("torchao-fp8", _fp8_install, needs=("cuda", "fp8", "torchao"))


def _keep_pattern(ctx: Context, family: str, threshold: float, row: dict, skipped: dict, head: int,
                  tail: int) -> None:
    """Row fields and the replay store entry of a step cache measured on the pipeline workload."""
    blocks = len(ctx.runner.adapter.blocks())
    calls = sum(len(v) for v in skipped.values())
    row["skip_share"] = step_skip_share(skipped, blocks, head, tail)
    row["skipped_steps_share"] = sum(map(sum, skipped.values())) / calls if calls else None
    row["notes"].append(f"skip share = calls whose blocks {head}..L-{tail + 1} were answered from the cache x "
                        f"(L-{head + tail})/L")
    if row.get("error") is None and "torchao" not in row:  # the replayed patterns are the bf16 caches'
        entries = ctx.replay.setdefault("caches", {}).setdefault(family, [])
        entries[:] = [e for e in entries if e["threshold"] != threshold]
        entries.append({"threshold": threshold, "map": step_pattern_map(skipped, blocks, head, tail),
                        "head": head, "tail": tail, "psnr_db": row.get("psnr_db"), "latency_s": row.get("latency_s"),
                        "skip_share": row["skip_share"], "source": f"{ctx.wl.name} / {row['contender']}"})


def fbc_part(threshold: float | Callable[[Context, dict], float]) -> Part:
    """diffusers' FirstBlockCache at ``threshold`` (or the threshold ``threshold(ctx, row)`` resolves at install)."""

    def install(ctx: Context, row: dict) -> Installed:
        from diffusers import FirstBlockCacheConfig

        thr = threshold(ctx, row) if callable(threshold) else threshold
        row["threshold"] = thr
        tr = ctx.runner.transformer
        tr.enable_cache(FirstBlockCacheConfig(threshold=thr))
        rec, hook = record_fbc_skips(ctx.runner.adapter.blocks()[0].module)
        first: dict[str, list[bool]] = {}

        def on_gen(i: int) -> None:
            if i == 0:
                first.update({k: list(v) for k, v in rec.items()})
            rec.clear()

        def remove() -> None:
            hook.remove()
            tr.disable_cache()

        return Installed(remove=remove, on_generation=on_gen,
                         finish=lambda r: _keep_pattern(ctx, "fbc", thr, r, first, 1, 0))

    return Part("fbc", install)


#: cache-dit's forward pattern of each model family's blocks (Wan: hidden and text states in, hidden states out)
_CACHE_DIT_PATTERN = {"wan": "Pattern_2", "cogvideox": "Pattern_0"}


def cache_dit_part(threshold: float, taylorseer: bool) -> Part:
    """cache-dit's DBCache (F1B0: block 0 always computed, the rest from the cache when the residual difference of
    block 0 stays under ``threshold``; separate CFG, as the pipeline calls it), optionally with its TaylorSeer
    calibrator (first order)."""

    def install(ctx: Context, row: dict) -> Installed:
        import cache_dit
        from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern, TaylorSeerCalibratorConfig

        pipe = ctx.runner.target
        family = ctx.runner.adapter.family.name
        if family not in _CACHE_DIT_PATTERN:
            raise RuntimeError(f"no cache-dit forward pattern declared for the {family!r} family")
        row["threshold"] = threshold
        row["cache_dit"] = cache_dit.__version__
        config = DBCacheConfig(Fn_compute_blocks=DBCACHE_FN, Bn_compute_blocks=DBCACHE_BN,
                               residual_diff_threshold=threshold, max_warmup_steps=1, enable_separate_cfg=True,
                               num_inference_steps=ctx.wl.steps)
        cache_dit.enable_cache(
            BlockAdapter(pipe=pipe, transformer=pipe.transformer, blocks=pipe.transformer.blocks,
                         forward_pattern=getattr(ForwardPattern, _CACHE_DIT_PATTERN[family])),
            cache_config=config,
            calibrator_config=TaylorSeerCalibratorConfig(taylorseer_order=1) if taylorseer else None)
        row["notes"].append(f"cache-dit {cache_dit.__version__} DBCache F{DBCACHE_FN}B{DBCACHE_BN}, residual diff "
                            f"threshold {threshold:g}, 1 warm-up step, separate CFG"
                            + (", TaylorSeer calibrator order 1" if taylorseer else ""))
        first: dict[str, list[bool]] = {}

        def on_gen(i: int) -> None:
            if i != 0:
                return
            stats = cache_dit.summary(pipe, logging=False)[-1]  # this video's cached steps per guidance branch
            n = ctx.wl.steps
            first["cond"] = [s in set(stats.cached_steps) for s in range(n)]
            first["uncond"] = [s in set(stats.cfg_cached_steps) for s in range(n)]

        family_name = "dbcache-taylorseer" if taylorseer else "dbcache"
        return Installed(remove=lambda: cache_dit.disable_cache(pipe), on_generation=on_gen,
                         finish=lambda r: _keep_pattern(ctx, family_name, threshold, r, first, DBCACHE_FN,
                                                        DBCACHE_BN))

    return Part("cache-dit", install, needs=("cache_dit",))


# ------------------------------------------------------------------------------------------------ policies
def _given_policies(ctx: Context) -> list[tuple[str, tuple[Any, str]]]:
    from .policies import find_policy, policy_args

    if ctx.args.policy:
        from sixbit_tune.runtime import load_policy

        return [(name, (load_policy(path), path)) for name, path in policy_args(ctx.args)]
    found = find_policy(ctx.runner.transformer, ctx.wl.spec)
    return [("ours-chosen", found)] if found is not None else []


def _exported(found):
    from .policies import policy_summary

    def make(ctx: Context, row: dict):
        pol, path = found
        row["notes"].append(f"policy {path} (study {pol.provenance.study}, trial {pol.provenance.trial}, tuned on "
                            f"{pol.target.gpu or 'CPU'}) applied as exported")
        row.update(policy_summary=policy_summary(pol), policy_path=path)
        ctx.replay.setdefault("_policies", {})[row["contender"]] = pol
        return pol

    return make


def _tuned(ctx: Context, row: dict):
    """A short tuning on this device (profile, fit, small DMPQ/TDC grid; :func:`.policies.fallback_policy`), made
    once per run and reused by the eager variant."""
    from .policies import fallback_policy, policy_summary

    made = ctx.replay.setdefault("_tuned", {})
    if not made:
        deadline = time.monotonic() + 0.25 * max(0.0, ctx.deadline - time.monotonic())
        pol, note, tried = fallback_policy(ctx.runner.pipe, ctx.wl.spec, ctx.device, ctx.runner.settings,
                                           list(ctx.wl.prompts), ctx.runner.refs, deadline)
        made.update(policy=pol, note=note, tried=tried)
    row["notes"].append(made["note"])
    row.update(policy_summary=policy_summary(made["policy"]), fallback_grid=made["tried"],
               policy_path=f"tuned in this run on {ctx.device.type}")
    ctx.replay.setdefault("_policies", {})[row["contender"]] = made["policy"]
    return made["policy"]


def _static(fmt: str, **routes: str):
    """Every in-block linear stores ``fmt`` and runs one route (``routes``: ``make_static_policy``'s ``mode``,
    ``fast``, ``robust``; e.g. ``mode="robust", robust="fp8"`` over an NVFP4 weight)."""
    def make(ctx: Context, row: dict):
        from sixbit_tune.runtime import make_static_policy

        return make_static_policy(ctx.runner.transformer, fmt, spec=ctx.wl.spec, **routes)
    return make


def _dynamic_nvfp4(ctx: Context, row: dict):
    """Every in-block linear NVFP4-stored and dynamic, fast route FP8 and robust route INT8 (both W4A8 over the one
    NVFP4 weight), with a zero error predictor: the first step runs the robust route, every later step the fast one.
    Beside ``ours-nvfp4-fp8`` (the same GEMMs, static) it measures what a dynamic layer costs in a compiled block."""
    from sixbit_tune.models.adapters import get_adapter
    from sixbit_tune.runtime import make_dynamic_policy

    names = list(get_adapter(ctx.runner.transformer).all_linears())
    row["notes"].append("dynamic NVFP4-stored layers: step 0 W4A8-INT8, later steps W4A8-FP8")
    return make_dynamic_policy(ctx.runner.transformer, {n: (0.0, 0.0, None, None) for n in names}, 1.0,
                               weight="nvfp4", fast="fp8", robust="int8", spec=ctx.wl.spec)


def _fp8_fast_accum_install(ctx: Context, row: dict) -> Installed:
    """The FP8 GEMM with ``torch._scaled_mm``'s fast accumulation (torchao's dynamic FP8 default) while installed."""
    from sixbit_tune.kernels import scaled_mm_fp8

    before = scaled_mm_fp8.fast_accum()
    scaled_mm_fp8.set_fast_accum(True)
    row["notes"].append("FP8 GEMM with fast accumulation (use_fast_accum=True, as torchao's dynamic FP8)")
    return Installed(remove=lambda: scaled_mm_fp8.set_fast_accum(before))


FP8_FAST_ACCUM = Part("fp8-fast-accum", _fp8_fast_accum_install, needs=("fp8",))


def static_contenders() -> list[Contender]:
    """Our static corners: every in-block linear stored once in one format and run on one route."""
    out = [Contender("ours-int8", "ours", (policy_part(_static("int8")),))]
    for name, make in (("ours-fp8", _static("fp8")), ("ours-nvfp4-fp8", _static("nvfp4", mode="robust", robust="fp8"))):
        out += [Contender(name, "ours", (policy_part(make),), needs=("fp8",)),
                Contender(f"{name}-fast-accum", "ours", (FP8_FAST_ACCUM, policy_part(make)))]
    return out + [
        Contender("ours-nvfp4-int8", "ours", (policy_part(_static("nvfp4", mode="robust", robust="int8")),)),
        Contender("ours-nvfp4", "ours", (policy_part(_static("nvfp4")),)),
        Contender("ours-nvfp4-dynamic-fast-accum", "ours", (FP8_FAST_ACCUM, policy_part(_dynamic_nvfp4))),
    ]


def choose_replay(ctx: Context, rows: list[dict]) -> None:
    """After our policies ran on the pipeline workload: keep every policy's skip map as a replay candidate, and the
    one with the most skipping among those at >= 30 dB (else the best PSNR) as the policy the transformer workloads
    replay."""
    maps = ctx.replay.get("_maps", {})
    pols = ctx.replay.get("_policies", {})
    cands = [r for r in rows if r.get("latency_s") and r["contender"] in maps and r["contender"] in pols]
    if not cands:
        return
    ctx.replay["candidates"] = [
        {"name": r["contender"], "policy": pols[r["contender"]].to_dict(), "map": maps[r["contender"]],
         "nvfp4_share": r.get("nvfp4_share"), "psnr_db": r.get("psnr_db"), "skip_share": r.get("skip_share"),
         "source": f"{ctx.wl.name} / {r['contender']}"} for r in cands]
    ok = [r for r in cands if (r.get("psnr_db") or 0) >= 30.0]
    pick = max(ok, key=lambda r: r.get("skip_share") or 0) if ok else max(cands, key=lambda r: r["psnr_db"] or 0)
    name = pick["contender"]
    ctx.replay.update({"policy": pols[name].to_dict(), "ours_map": maps[name], "ours_nvfp4_share":
                       pick.get("nvfp4_share"), "ours_psnr_db": pick.get("psnr_db"),
                       "ours_skip_share": pick.get("skip_share"), "source": f"{ctx.wl.name} / {name}"})


# ------------------------------------------------------------------------------------------------ matching
def matched_cache(replay: dict, family: str) -> dict | None:
    """The recorded threshold of a cache family matched to our quality on the reference: the largest threshold
    whose PSNR is at least that of our replayed policy (else the best PSNR). None when nothing was recorded."""
    entries = list(replay.get("caches", {}).get(family, []))
    if not entries and family == "fbc":
        entries = [dict(e, head=1, tail=0) for e in replay.get("fbc", [])]  # result files before cache-dit
    entries = [e for e in entries if e.get("psnr_db") is not None]
    if not entries:
        return None
    target = replay.get("ours_psnr_db")
    ok = [e for e in entries if target is None or e["psnr_db"] >= target]
    return max(ok, key=lambda e: e["threshold"]) if ok else max(entries, key=lambda e: e["psnr_db"])


def _matched_threshold(family: str):
    def resolve(ctx: Context, row: dict) -> float:
        pick = matched_cache(ctx.replay, family)
        if pick is None:
            raise RuntimeError(f"no {family} run with a quality figure was recorded before this contender")
        row["matched_to_ours_psnr_db"] = ctx.replay.get("ours_psnr_db")
        return pick["threshold"]
    return resolve


# ------------------------------------------------------------------------------------------------ the catalogue
def _bf16(name: str, compile_: str, needs: tuple[str, ...] = ()) -> Contender:
    return Contender(name, "baseline", compile=compile_, needs=needs)


def pipeline_contenders(ctx: Context) -> list[Contender]:
    """The pipeline workload's contenders in priority order. ``bf16-eager`` runs first: it makes the quality
    references."""
    args = ctx.args
    out = [_bf16("bf16-eager", "eager"), _bf16(BASELINE, "blocks"),
           _bf16("bf16-cudagraphs", "graphs", needs=("cuda",))]
    given = _given_policies(ctx)
    ours = [(name, _exported(found)) for name, found in given]
    if not any(pol.tdc.tolerance > 0 and pol.tdc.max_skips > 0 for _, (pol, _path) in given):
        ours.append(("ours-tuned", _tuned))  # no given policy skips a block: tune one here
    out += [Contender(name, "ours", (policy_part(make, record=name),)) for name, make in ours]
    out += [Contender(f"fbc-{t:g}", "peer", (fbc_part(t),), fields={"threshold": t}) for t in args.fbc_thresholds]
    out.append(Contender("torchao-fp8-dynamic", "peer", (FP8,), compile_after=1))
    out.append(Contender("fbc+torchao-fp8", "peer", (FP8, fbc_part(_matched_threshold("fbc"))),
                         compile_after=1))
    out += static_contenders()
    for t in args.dbcache_thresholds:
        out.append(Contender(f"dbcache-{t:g}", "peer", (cache_dit_part(t, False),), fields={"threshold": t}))
    for t in args.taylorseer_thresholds:
        out.append(Contender(f"dbcache-taylorseer-{t:g}", "peer", (cache_dit_part(t, True),),
                             fields={"threshold": t}))
    if args.eager_variants and not args.no_compile:
        out += [Contender(f"{name} (eager)", "ours", (policy_part(make),), compile="eager") for name, make in ours]
        out += [Contender(f"ours-{fmt} (eager)", "ours", (policy_part(_static(fmt)),), compile="eager")
                for fmt in ("int8", "nvfp4")]
    return out


def _replay_ours(replay: dict, contexts: list[str], steps: int, blocks: int):
    """(label, make_policy, skip map) of our chosen reference policy replayed on a transformer workload."""
    from sixbit_tune.runtime import load_policy

    from .policies import replay_policy

    ref_pol = load_policy(replay["policy"])
    ours_map = scale_map(replay.get("ours_map") or [], steps, blocks, contexts)
    share = map_share(ours_map)

    def make(ctx: Context, row: dict):
        pol, info = replay_policy(ctx.runner.transformer, ref_pol, replay.get("ours_nvfp4_share"), share > 0)
        row["replay"] = {"from": replay.get("source"), "reference_skip_share": replay.get("ours_skip_share"),
                         "reference_nvfp4_share": replay.get("ours_nvfp4_share"),
                         "reference_psnr_db": replay.get("ours_psnr_db"), "replayed_map_share": share,
                         "layer_modes": info["modes"], "dynamic_pinned_nvfp4": info["dynamic_pinned_nvfp4"]}
        row["notes"].append("random weights: the reference run's skip map and NVFP4 share are replayed (forced), "
                            "not decided; " + REPLAY_RULE[len(contexts) == 1])
        return pol

    label = (replay.get("source") or "ours-chosen").split(" / ")[-1]
    return label, make, ours_map


def _replay_cache(pick: dict, family: str, contexts: list[str], steps: int, blocks: int, target_q):
    """(make_policy, skip map) replaying a peer cache's step pattern through the runtime, every layer unchanged."""
    cache_map = scale_map(pick["map"], steps, blocks, contexts, head=pick.get("head", 1), tail=pick.get("tail", 0))
    share = map_share(cache_map)

    def make(ctx: Context, row: dict):
        from sixbit_tune.runtime import make_static_policy

        row["replay"] = {"family": family, "threshold": pick["threshold"], "reference_psnr_db": pick["psnr_db"],
                         "reference_skip_share": pick.get("skip_share"), "replayed_map_share": share,
                         "matched_to_ours_psnr_db": target_q, "from": pick.get("source")}
        row["notes"].append(f"{family}'s step pattern on the reference (largest threshold with PSNR >= ours) "
                            f"replayed through the sixbit runtime, its layers unchanged (blocks 0..{pick.get('head', 1) - 1}"
                            f" always run); " + REPLAY_RULE[len(contexts) == 1])
        return make_static_policy(ctx.runner.transformer, "none", 1e-30 if share > 0 else 0.0, warmup=0,
                                  cooldown=0, max_skips=10_000)

    return make, cache_map


def _fail(msg: str) -> Part:
    def install(ctx: Context, row: dict) -> Installed:
        raise RuntimeError(msg)
    return Part("missing", install)


def transformer_contenders(ctx: Context) -> list[Contender]:
    """A transformer workload's contenders in priority order: our chosen policy replayed, the peer stacks (each
    recorded cache's pattern at matched quality replayed, with torchao FP8), torchao FP8 alone, the caches' patterns
    in bf16, the static corners, bf16 with CUDA graphs, bf16 eager."""
    args, replay = ctx.args, ctx.replay
    runner = ctx.runner
    blocks, steps = len(runner.adapter.blocks()), ctx.wl.steps  # replays time every step
    out = [_bf16(BASELINE, "blocks")]
    if replay.get("policy") is None:
        why = ("no chosen reference policy was recorded in this run (reference workload missing or failed; pass "
               "--replay-from a results JSON that has one)")
        out.append(Contender("ours-chosen (replay)", "ours", (_fail(why),)))
        stacks, plain = [], []
    else:
        label, make, ours_map = _replay_ours(replay, runner.contexts, steps, blocks)
        replays = map_share(ours_map) > 0
        out.append(Contender(f"{label} (replay)", "ours", (policy_part(make, replay_map=ours_map),), replay=replays))
        if args.eager_variants and not args.no_compile:
            out.append(Contender(f"{label} (replay, eager)", "ours", (policy_part(make, replay_map=ours_map),),
                                 compile="eager", replay=replays))
        stacks, plain = [], []
        for family in CACHE_FAMILIES:
            pick = matched_cache(replay, family)
            if pick is None:
                if family == "fbc":
                    stacks.append(Contender("fbc (replay)", "peer", (_fail(
                        "no FirstBlockCache run with a quality figure was recorded"),)))
                continue
            make_c, cache_map = _replay_cache(pick, family, runner.contexts, steps, blocks,
                                              replay.get("ours_psnr_db"))
            name = f"{family}-{pick['threshold']:g}"
            rp = map_share(cache_map) > 0
            stacks.append(Contender(f"{name}+torchao-fp8 (replay)", "peer",
                                    (FP8, policy_part(make_c, replay_map=cache_map)), compile_after=1,
                                    replay=rp))
            plain.append(Contender(f"{name} (replay)", "peer", (policy_part(make_c, replay_map=cache_map),),
                                   replay=rp))
    out += stacks
    out.append(Contender("torchao-fp8-dynamic", "peer", (FP8,), compile_after=1))
    out += plain
    out += static_contenders()
    out += [_bf16("bf16-cudagraphs", "graphs", needs=("cuda",)), _bf16("bf16-eager", "eager")]
    return out


def contenders_for(ctx: Context) -> list[Contender]:
    return pipeline_contenders(ctx) if ctx.runner.kind == "pipeline" else transformer_contenders(ctx)


def repeat_baseline() -> Contender:
    """The compiled bf16 baseline again, after every other contender (a drift check)."""
    return _bf16(f"{BASELINE} (repeat)", "blocks")


__all__ = ["BASELINE", "CACHE_FAMILIES", "Context", "Contender", "Installed", "Part", "choose_replay",
           "contenders_for", "matched_cache", "missing", "pipeline_contenders", "repeat_baseline",
           "transformer_contenders"]
