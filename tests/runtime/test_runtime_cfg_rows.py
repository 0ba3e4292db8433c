"""tdc.cfg_rows "per_row": batched-CFG calls decide the Temporal Delta Cache per batch row, run a block on the rows
that need it only, and fall back to the joint rule (with a note) where a call's arguments cannot be split by rows.

Run as a script for the CPU measurement of joint against per_row (skip share, PSNR against the unquantized run):
``python tests/runtime/test_runtime_cfg_rows.py [family] [steps] [tolerances]``.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from rt_helpers import get_pipe, run_pipe

from sixbit_tune.formats import fp8
from sixbit_tune.models.adapters import get_adapter
from sixbit_tune.runtime import apply_policy, make_static_policy
from sixbit_tune.runtime.rows import RowSplitRefused, row_runs, split_call

CTX = "cond_uncond"
#: The block arguments each family passes per batch row (diffusers 0.42 block signatures), for slicing by hand.
ROW_ARGS = {
    "cogvideox": {"hidden_states", "encoder_hidden_states", "temb"},
    "ltx": {"hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb", "encoder_attention_mask"},
}


def with_cfg_rows(policy, mode: str):
    """``policy`` with ``tdc.cfg_rows = mode``."""
    return dataclasses.replace(policy, tdc=dataclasses.replace(policy.tdc, cfg_rows=mode))


class CallRecorder:
    """Every block call: its arguments (tensors cloned), its output streams, and the batch the block's body saw
    (the rows reaching its first linear; 0 when the body did not run)."""

    def __init__(self, model):
        self.adapter = get_adapter(model)
        self.calls: list[dict] = []
        self._handles = []
        for ref in self.adapter.blocks():
            self._handles.append(ref.module.register_forward_pre_hook(self._pre(ref), with_kwargs=True))
            self._handles.append(ref.module.register_forward_hook(self._post(ref), with_kwargs=True))
            first = next(m for n, m in ref.module.named_modules() if n and type(m).__name__ in
                         ("Linear", "MixedPrecisionLinear"))
            self._handles.append(first.register_forward_pre_hook(self._body()))

    def _pre(self, ref):
        def hook(module, args, kwargs):
            clone = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else (  # noqa: E731
                type(v)(clone(x) for x in v) if isinstance(v, tuple) else v)
            self.calls.append({"block": ref.index, "args": tuple(clone(a) for a in args),
                               "kwargs": {k: clone(v) for k, v in kwargs.items()}, "body_rows": 0,
                               "xs": tuple(x.detach().clone() for x in self.adapter.streams_in(ref, args, kwargs))})

        return hook

    def _body(self):
        def hook(module, args):
            self.calls[-1]["body_rows"] = int(args[0].shape[0])

        return hook

    def _post(self, ref):
        def hook(module, args, kwargs, output):
            self.calls[-1]["ys"] = tuple(y.detach().clone() for y in self.adapter.streams_out(ref, output))

        return hook

    def remove(self):
        for h in self._handles:
            h.remove()


def _rows_of(kwargs: dict, names: set[str], a: int, b: int) -> dict:
    """The call's keyword arguments with those in ``names`` cut to rows ``a:b`` (tuples element-wise)."""
    def cut(v):
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v[a:b] if isinstance(v, torch.Tensor) else v

    return {k: cut(v) if k in names else v for k, v in kwargs.items()}


def _stored(d: torch.Tensor, cache_dtype: str) -> torch.Tensor:
    if cache_dtype == "float8_e4m3fn":
        q, s = fp8.quantize(d, -1)
        return fp8.dequantize(q, s, -1, torch.float32)
    return d


# Forced per-row plan: per step, [row 0 skips, row 1 skips] for every block (step 0 has no cache: nothing skips).
PLAN = [[False, False], [True, False], [False, False], [True, False], [False, True], [True, True],
        [False, False], [False, False]]


@pytest.mark.parametrize("family", ["cogvideox", "ltx"])
@pytest.mark.parametrize("cache_dtype,extrapolate", [("float32", 0), ("float32", 1), ("float8_e4m3fn", 1)])
def test_forced_row_split_computes_the_other_row_alone_and_answers_the_skipped_row_from_its_cache(
        family, cache_dtype, extrapolate):
    """Where one row skips and the other computes, the block's body sees the computing row only, that row's output
    is bit-identical to the block run on that row alone, and the skipped row's output is X + its own cached Δ (or
    its own extrapolation, from the steps that row was computed at)."""
    pipe = get_pipe(family)
    n_blocks = len(get_adapter(pipe).blocks())
    steps = len(PLAN)
    policy = with_cfg_rows(make_static_policy(pipe, "int8", 1e-12, warmup=0, cooldown=0, max_skips=3,
                                              cache_dtype=cache_dtype, extrapolate=extrapolate), "per_row")
    with apply_policy(pipe, policy) as h:
        h.force_skips({CTX: [[list(row)] * n_blocks for row in PLAN]})
        h.record_row_skips()
        rec = CallRecorder(pipe)
        run_pipe(pipe, family, steps=steps)
        rec.remove()
        stats = h.stats()
        record = h.controller.skip_record_rows
        assert record == {CTX: {t: [list(PLAN[t])] * n_blocks for t in range(steps)}}
        assert not stats.notes
        assert stats.skipped_blocks == n_blocks  # step 5: both rows skip
        history: dict[tuple[int, int], list[tuple[int, tuple]]] = {}
        checked = {"alone": 0, "cached": 0, "extrapolated": 0}
        for k, c in enumerate(rec.calls):
            t, block = k // n_blocks, c["block"]
            plan = PLAN[t]
            assert c["body_rows"] == plan.count(False)
            for r in range(2):
                xs, ys = tuple(x[r : r + 1] for x in c["xs"]), tuple(y[r : r + 1] for y in c["ys"])
                if not plan[r]:
                    if any(plan):  # the other row skipped: this row ran alone
                        module = get_adapter(pipe).blocks()[block].module
                        alone = get_adapter(pipe).streams_out(block, module(**_rows_of(c["kwargs"], ROW_ARGS[family],
                                                                                         r, r + 1)))
                        for y, a in zip(ys, alone):
                            assert torch.equal(y, a), (t, block, r)
                        checked["alone"] += 1
                    history.setdefault((block, r), []).append(
                        (t, tuple(_stored(y - x, cache_dtype) for x, y in zip(xs, ys))))
                    continue
                past = history[(block, r)]
                s, d_s = past[-1]
                if extrapolate and len(past) > 1:
                    p, d_p = past[-2]
                    expected = [x + (a + (a - b) * ((t - s) / (s - p))) for x, a, b in zip(xs, d_s, d_p)]
                    checked["extrapolated"] += 1
                else:
                    expected = [x + a for x, a in zip(xs, d_s)]
                    checked["cached"] += 1
                for y, e in zip(ys, expected):
                    assert torch.equal(y, e), (t, block, r)
    assert checked["alone"] == 3 * n_blocks  # steps 1 and 3 (row 1 alone), step 4 (row 0 alone)
    assert checked["cached" if not extrapolate else "extrapolated"] > 0


def _per_row_replay(rec: CallRecorder, n_blocks: int, steps: int, tol: float, warmup: int, cooldown: int,
                    max_skips: int):
    """The per-row TDC rule replayed on the recorded run (float64, computed here), each row on its own: the
    measured per-step change of the row's Δ between its last two computations, accumulated over its skipped steps.
    Returns the expected [step][block][row] skips and the smallest |accumulated − δ| met in a decision."""
    state: dict = {}
    expected, margin = [], float("inf")
    for k in range(0, len(rec.calls), n_blocks):
        t = k // n_blocks
        per_block = []
        for c in rec.calls[k : k + n_blocks]:
            rows = c["xs"][0].shape[0]
            per_row = []
            for r in range(rows):
                s = state.setdefault((c["block"], r), {"deltas": [], "acc": 0.0, "run": 0})
                skip = False
                if warmup <= t < steps - cooldown and len(s["deltas"]) >= 2 and s["run"] < max_skips:
                    (t0, d0), (t1, d1) = s["deltas"][-2:]
                    rate = float(torch.linalg.vector_norm(d1 - d0) / torch.linalg.vector_norm(d0)) / (t1 - t0)
                    acc = s["acc"] + rate
                    margin = min(margin, abs(acc - tol))
                    skip = acc <= tol
                    if skip:
                        s["acc"], s["run"] = acc, s["run"] + 1
                if not skip:
                    s["acc"], s["run"] = 0.0, 0
                    d = torch.cat([(y[r].double() - x[r].double()).reshape(-1) for x, y in zip(c["xs"], c["ys"])])
                    s["deltas"].append((t, d))
                per_row.append(skip)
            per_block.append(per_row)
        expected.append(per_block)
    return expected, margin


@pytest.mark.parametrize("family,tol", [("cogvideox", 0.35), ("ltx", 0.06)])
def test_per_row_follows_the_rule_row_by_row_and_skips_more_than_joint(family, tol):
    """On a real generation whose guidance rows drift apart, per_row skips exactly what the rule replayed row by
    row says, runs the block's body on the computing rows only, and skips strictly more (block, row) pairs than the
    joint rule on the same policy."""
    pipe = get_pipe(family)
    n_blocks = len(get_adapter(pipe).blocks())
    steps, warmup, cooldown, max_skips = 14, 2, 1, 2
    counts, records = {}, {}
    for mode in ("joint", "per_row"):
        policy = with_cfg_rows(make_static_policy(pipe, "int8", tol, warmup=warmup, cooldown=cooldown,
                                                  max_skips=max_skips, cache_dtype="float32"), mode)
        with apply_policy(pipe, policy) as h:
            h.record_row_skips()
            rec = CallRecorder(pipe)
            run_pipe(pipe, family, steps=steps)
            rec.remove()
            records[mode] = h.controller.skip_record_rows[CTX]
            stats = h.stats()
        assert not stats.notes
        got = [records[mode][t] for t in range(steps)]
        assert [c["body_rows"] for c in rec.calls] == [blocks.count(False) for row in got for blocks in row]
        counts[mode] = sum(r for row in got for blocks in row for r in blocks)
        if mode == "per_row":
            expected, margin = _per_row_replay(rec, n_blocks, steps, tol, warmup, cooldown, max_skips)
            assert margin > 1e-4, f"δ={tol} is too close to an accumulated change ({margin}); pick another δ"
            assert got == expected
            assert any(len(set(blocks)) == 2 for row in got for blocks in row), "no call with rows deciding apart"
            assert stats.skipped_blocks == sum(all(blocks) for row in got for blocks in row)
        else:
            assert all(len(set(blocks)) == 1 for row in got for blocks in row)
    assert counts["per_row"] > counts["joint"] > 0


def test_split_falls_back_to_the_joint_rule_where_rotary_rows_and_tokens_look_alike():
    """Tiny Mochi: 2 rows and 2 video tokens, and its per-token rotary embedding (2, 2, 24) could be taken by rows
    or not. per_row then runs the block on every row (the joint rule, same output bit for bit) and notes why."""
    pipe = get_pipe("mochi")
    tol, steps = 0.5, 12
    out, stats = {}, {}
    for mode in ("joint", "per_row"):
        policy = with_cfg_rows(make_static_policy(pipe, "int8", tol, warmup=2, cooldown=1, max_skips=2,
                                                  cache_dtype="float32"), mode)
        with apply_policy(pipe, policy) as h:
            h.record_row_skips()
            out[mode] = run_pipe(pipe, "mochi", steps=steps)
            stats[mode] = h.stats()
            record = h.controller.skip_record_rows[CTX]
        assert all(len(set(blocks)) == 1 for row in record.values() for blocks in row)
    assert torch.equal(out["per_row"], out["joint"])
    assert stats["per_row"].steps == stats["joint"].steps and stats["joint"].skipped_blocks > 0
    assert not stats["joint"].notes
    note = [n for n in stats["per_row"].notes if "fell back to the joint rule" in n]
    assert len(note) == 1 and "image_rotary_emb" in note[0] and "(2, 2, 24)" in note[0], stats["per_row"].notes


def test_split_call_takes_rows_of_batched_arguments_and_refuses_streams_of_another_batch():
    """The row split of a real LTX block call: streams, temb, the mask and the per-row rotary embedding are cut to
    the rows; a stream whose batch is not the call's refuses the split with the reason."""
    pipe = get_pipe("ltx")
    adapter = get_adapter(pipe)
    rec = CallRecorder(pipe)
    try:
        run_pipe(pipe, "ltx", steps=1)
    finally:
        rec.remove()
    call = rec.calls[0]
    names = ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb", "encoder_attention_mask")
    streams = ("hidden_states", "encoder_hidden_states")
    args, kwargs = split_call(names, streams, (), call["kwargs"], 2, row_runs([1]))
    assert args == ()
    assert kwargs.keys() == call["kwargs"].keys()
    for k, v in call["kwargs"].items():
        got = kwargs[k]
        if isinstance(v, tuple):
            assert all(torch.equal(g, x[1:2]) for g, x in zip(got, v))
        else:
            assert torch.equal(got, v[1:2]), k
    bad = dict(call["kwargs"], encoder_hidden_states=call["kwargs"]["encoder_hidden_states"][:1])
    with pytest.raises(RowSplitRefused, match=r"stream encoder_hidden_states is \(1, 16, 32\), not \[2 rows"):
        split_call(names, streams, (), bad, 2, row_runs([1]))
    assert adapter.family.cfg_mode == "batched"


def test_cfg_rows_from_a_policy_file_reaches_the_runtime(tmp_path):
    """A policy saved with tdc.cfg_rows "per_row" and loaded from its file splits rows; the same file with
    "joint" does not."""
    from sixbit_tune import policy as _policy

    pipe = get_pipe("cogvideox")
    n_blocks = len(get_adapter(pipe).blocks())
    mixed = {}
    for mode in ("joint", "per_row"):
        path = _policy.save(with_cfg_rows(make_static_policy(pipe, "int8", 1e-12, warmup=0, cooldown=0,
                                                             max_skips=3, cache_dtype="float32"), mode),
                            tmp_path / f"{mode}.json")
        with apply_policy(pipe, str(path)) as h:
            h.force_skips({CTX: [[list(row)] * n_blocks for row in PLAN]})
            rec = CallRecorder(pipe)
            run_pipe(pipe, "cogvideox", steps=len(PLAN))
            rec.remove()
        mixed[mode] = sorted({c["body_rows"] for c in rec.calls})
    assert mixed == {"joint": [0, 2], "per_row": [0, 1, 2]}  # 0: both rows skipped, 1: one row ran


def test_compiled_blocks_split_rows_as_eager_blocks_do():
    """With ``block.compile()`` (dynamo, eager backend) a forced row split gives the eager split's output bit for
    bit, and dynamo breaks its graphs only at the runtime's bookkeeping."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pipe = get_pipe("cogvideox")
    refs = get_adapter(pipe).blocks()
    n_blocks = len(refs)
    policy = with_cfg_rows(make_static_policy(pipe, "int8", 1e-12, warmup=0, cooldown=0, max_skips=3,
                                              cache_dtype="float32", extrapolate=1), "per_row")
    try:
        with apply_policy(pipe, policy) as h:
            h.force_skips({CTX: [[list(row)] * n_blocks for row in PLAN]})
            eager = run_pipe(pipe, "cogvideox", steps=len(PLAN))
            eager_stats = h.stats()
            for ref in refs:
                ref.module.compile(backend="eager")
            compiled = run_pipe(pipe, "cogvideox", steps=len(PLAN))
            compiled_stats = h.stats()
    finally:
        for ref in refs:
            ref.module.__dict__.pop("_compiled_call_impl", None)
    assert counters["stats"]["unique_graphs"] > 0, "dynamo compiled nothing"
    assert torch.equal(compiled, eager)
    assert compiled_stats.steps == eager_stats.steps and compiled_stats.skipped_blocks == n_blocks
    allowed = ("Controller.block_begin", "Controller.block_end", "Tensor.item()")
    reasons = list(counters["graph_break"])
    assert all(any(a in r for a in allowed) for r in reasons), reasons


def measure(family: str = "cogvideox", steps: int = 20, tolerances=(0.3, 0.4, 0.5, 0.6),
            prompts=("a cat runs", "a red car drives at night", "waves on a beach")) -> list[dict]:
    """Skip share ((block, row) pairs) and PSNR against the unquantized pipeline (decoded video, data range 1) of
    joint and per_row, static INT8 with TDC (warmup 2, cooldown 1, max_skips 2, float32 cache), per tolerance,
    mean over ``prompts`` (one prompt per call: 2 CFG rows)."""
    pipe = get_pipe(family)
    refs = {p: run_pipe(pipe, family, steps=steps, prompts=p, output_type="pt") for p in prompts}
    rows = []
    for tol in tolerances:
        for mode in ("joint", "per_row"):
            policy = with_cfg_rows(make_static_policy(pipe, "int8", tol, warmup=2, cooldown=1, max_skips=2,
                                                      cache_dtype="float32"), mode)
            skipped = total = full = 0
            psnrs = []
            with apply_policy(pipe, policy) as h:
                for p in prompts:
                    h.record_row_skips()
                    video = run_pipe(pipe, family, steps=steps, prompts=p, output_type="pt")
                    flags = [r for per in h.controller.skip_record_rows.values() for blocks in per.values()
                             for b in blocks for r in b]
                    skipped, total = skipped + sum(flags), total + len(flags)
                    full += h.stats().skipped_blocks
                    mse = float(((video.double() - refs[p].double()) ** 2).mean())
                    psnrs.append(10 * math.log10(1.0 / mse) if mse > 0 else float("inf"))
            rows.append({"tol": tol, "mode": mode, "row_skip_share": skipped / total, "psnr_db": sum(psnrs) / len(psnrs),
                         "skipped_blocks": full})
    return rows


if __name__ == "__main__":
    import sys

    fam = sys.argv[1] if len(sys.argv) > 1 else "cogvideox"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    tols = tuple(float(x) for x in sys.argv[3].split(",")) if len(sys.argv) > 3 else (0.3, 0.4, 0.5, 0.6)
    for row in measure(fam, n, tols):
        print(f"{fam} steps={n} tol={row['tol']:<5} {row['mode']:<8} (block,row) skip share "
              f"{row['row_skip_share']:.3f}  PSNR {row['psnr_db']:.2f} dB  fully skipped calls {row['skipped_blocks']}")
