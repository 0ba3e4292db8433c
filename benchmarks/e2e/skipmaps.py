"""Skip maps: which blocks a cache skipped, per guidance context and step, and how a reference model's map is
replayed on a model of another size.

A *fraction map* is, per step and block, the share of the reference's guidance contexts in which the block was
skipped. The runtime records its own decisions (``PolicyHandle.record_skips``) and replays a map
(``PolicyHandle.force_skips``); the peers' caches are recorded from what they report.
"""

from __future__ import annotations

#: How a reference skip map (two guidance contexts) becomes the target's, by whether the target calls once per step.
REPLAY_RULE = {
    False: "two guidance contexts replayed onto two: per step and block, as many contexts skip as did on the "
           "reference (same skip share)",
    True: "one batched call for both guidance rows: a block is skipped only where both reference contexts skipped "
          "it (the runtime's joint, conservative rule for a batched call), so the share can be below the reference's",
}


def skip_fraction_map(rec: dict[str, dict[int, list[bool]]]) -> list[list[float]]:
    """Per step, per block: the share of contexts in which the block was skipped (``rec``: context -> step ->
    skip per block, as ``PolicyHandle.record_skips`` fills it)."""
    steps = sorted({s for per in rec.values() for s in per})
    out = []
    for s in steps:
        rows = [per[s] for per in rec.values() if s in per]
        out.append([sum(r[b] for r in rows) / len(rows) for b in range(len(rows[0]))])
    return out


def step_pattern_map(skipped: dict[str, list[bool]], blocks: int, head: int = 1, tail: int = 0) -> list[list[float]]:
    """Fraction map of a step cache (FirstBlockCache, cache-dit's DBCache): ``skipped[context][step]`` says whether
    that call answered blocks ``head .. blocks-tail-1`` from the cache; the first ``head`` and last ``tail`` blocks
    always run."""
    n = max((len(v) for v in skipped.values()), default=0)
    out = []
    for s in range(n):
        calls = [v[s] for v in skipped.values() if s < len(v)]
        frac = sum(calls) / len(calls) if calls else 0.0
        out.append([frac if head <= b < blocks - tail else 0.0 for b in range(blocks)])
    return out


def step_skip_share(skipped: dict[str, list[bool]], blocks: int, head: int = 1, tail: int = 0) -> float | None:
    """Share of skipped block calls of a step cache (see :func:`step_pattern_map`); None without calls."""
    calls = sum(len(v) for v in skipped.values())
    if not calls:
        return None
    return sum(map(sum, skipped.values())) * (blocks - head - tail) / (calls * blocks)


def scale_map(fractions: list[list[float]], steps: int, blocks: int, contexts: list[str],
              head: int = 0, tail: int = 0) -> dict[str, list[list[bool]]]:
    """Scale a reference skip map (steps x blocks of skip fractions over the reference's guidance contexts) to
    ``steps`` x ``blocks`` for each of the target's ``contexts``.

    Target step ``s`` covers reference steps [s*S/steps, (s+1)*S/steps) (with ``steps == S``, step for step).
    Target block ``b`` follows reference block floor(b*L/blocks); a step cache (``head``/``tail`` > 0: its first
    ``head`` and last ``tail`` blocks always run, counted in blocks on every model) instead runs those blocks and
    lets every other block follow the step's decision. With v the mean skip fraction over the covered steps,
    context ``c`` of ``n`` skips when v*n >= c+1: with the reference's two contexts replayed onto two (separate
    CFG, Wan), a block that one reference context skipped is skipped in one target context, so the skip share is
    the reference's; onto one batched call (CogVideoX, both guidance rows in one call) a block is skipped only where
    every reference context skipped it, the joint and conservative rule the runtime itself applies to a batched
    call. Nothing is skipped at step 0."""
    S = len(fractions)
    n = len(contexts)
    if S == 0:
        return {c: [[False] * blocks for _ in range(steps)] for c in contexts}
    L = len(fractions[0])
    step_cache = head > 0 or tail > 0
    out: dict[str, list[list[bool]]] = {c: [] for c in contexts}
    for s in range(steps):
        lo = int(s * S / steps)
        hi = max(lo + 1, int((s + 1) * S / steps))
        rows: list[list[bool]] = [[] for _ in contexts]
        for b in range(blocks):
            always = step_cache and not (head <= b < blocks - tail)
            rb = min(L - 1, head) if step_cache else min(L - 1, int(b * L / blocks))
            vals = [fractions[r][rb] for r in range(lo, min(hi, S))]
            v = sum(vals) / len(vals)
            runs = s == 0 or always
            for ci in range(n):
                rows[ci].append(not runs and v * n >= ci + 1 - 1e-9)
        for c, row in zip(contexts, rows):
            out[c].append(row)
    return out


def map_share(maps: dict[str, list[list[bool]]]) -> float:
    """Share of skipped block calls over every context's map."""
    n = sum(len(r) for m in maps.values() for r in m)
    return sum(sum(r) for m in maps.values() for r in m) / n if n else 0.0


# ------------------------------------------------------------------------------------------------ FirstBlockCache
def fbc_should_compute(head_block) -> tuple[str, bool]:
    """(cache context, whether the remaining blocks were computed) of diffusers' FirstBlockCache after its head
    block ran.

    diffusers has no public accessor for this decision: it lives in the state of the hook that FirstBlockCache
    registers on the head block under the name ``"fbc_leader_block_hook"``, reached through the public
    ``HookRegistry``. This function is the only place the benchmark reads it."""
    from diffusers.hooks import HookRegistry

    hook = HookRegistry.check_if_exists_or_initialize(head_block).get_hook("fbc_leader_block_hook")
    if hook is None:
        raise RuntimeError("FirstBlockCache is not enabled on this block (no 'fbc_leader_block_hook')")
    manager = hook.state_manager
    return manager.context.name, bool(manager.get_state().should_compute)


def record_fbc_skips(head_block):
    """Forward hook on FirstBlockCache's head block: per context, whether the remaining blocks were skipped.
    Returns (record, removable hook handle)."""
    rec: dict[str, list[bool]] = {}

    def hook(_module, _args, _out):
        ctx, computed = fbc_should_compute(head_block)
        rec.setdefault(ctx, []).append(not computed)

    return rec, head_block.register_forward_hook(hook)


def fbc_skip_share(rec: dict[str, list[bool]], blocks: int) -> float | None:
    """Share of skipped block calls from :func:`record_fbc_skips`' record: a call whose remaining blocks came from
    the cache skipped ``blocks - 1`` of ``blocks`` (the head block always runs). None without calls."""
    return step_skip_share(rec, blocks, head=1)
