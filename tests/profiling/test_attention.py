"""attn_err: recorded for every (step, branch, block) of the reference model and the tiny families, equal to the
8-bit attention of ``formats.attention`` recomputed from q, k, v captured independently (a plain wrapper of
``scaled_dot_product_attention`` and plain torch hooks), and unsupported attention calls refused by name."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sixbit_tune.formats.attention import attention_8bit_reference
from sixbit_tune.models.adapters import get_adapter
from sixbit_tune.models.tiny import tiny_pipeline, tiny_pipeline_call_kwargs, tiny_transformer
from sixbit_tune.profiling.attention import (
    AttentionCall,
    AttentionNotCaptured,
    SDPACapture,
    attention_errors,
    combine_calls,
)
from sixbit_tune.profiling.hooks import HOOK_NAME, instrument

#: the self-attention module of each family's block, as diffusers 0.42 names it
SELF_ATTN = {"reference": "attn1", "wan": "attn1", "cogvideox": "attn1", "hunyuanvideo": "attn", "ltx": "attn1",
             "mochi": "attn1"}
FORMATS = ("fp8", "int8")


class _SDPARecorder:
    """Wraps ``torch.nn.functional.scaled_dot_product_attention`` (the name every processor and diffusers' native
    backend call) and forward hooks on the self-attention modules: every call made inside one is kept with its
    block index and the flush step it belongs to."""

    def __init__(self, monkeypatch, modules: dict[int, torch.nn.Module]):
        self.calls: list[dict] = []
        self.block: int | None = None
        self.step = 0
        original = F.scaled_dot_product_attention

        def wrapper(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            q, k, v = query, key, value
            out = original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                           enable_gqa=enable_gqa)
            if self.block is not None:
                self.calls.append(dict(step=self.step, block=self.block, q=q.clone(), k=k.clone(), v=v.clone(),
                                       out=out.clone(), mask=None if attn_mask is None else attn_mask.clone(),
                                       scale=scale))
            return out

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", wrapper)
        self.hooks = []
        for index, m in modules.items():
            self.hooks.append(m.register_forward_pre_hook(lambda *_a, i=index: setattr(self, "block", i)))
            self.hooks.append(m.register_forward_hook(lambda *_a: setattr(self, "block", None)))

    def remove(self):
        for h in self.hooks:
            h.remove()


def _expected_errors(calls: list[dict], batch: int, fmt: str) -> list[float]:
    """Per batch row: ‖O_a − O‖₂ / ‖O‖₂ over every call of one self-attention module call; a call of one row per
    row (Mochi) is that row; a boolean key-padding mask keeps that row's unmasked keys."""
    num, den = [0.0] * batch, [0.0] * batch
    per_row = len(calls) == batch and all(c["q"].shape[0] == 1 for c in calls) and batch > 1
    for ci, c in enumerate(calls):
        for r in range(c["q"].shape[0]):
            row = ci if per_row else r
            q, k, v = c["q"][r : r + 1], c["k"][r : r + 1], c["v"][r : r + 1]
            if c["mask"] is not None:
                keep = c["mask"][r if c["mask"].shape[0] > 1 else 0, 0, 0]
                k, v = k[:, :, keep], v[:, :, keep]
            oa = attention_8bit_reference(q, k, v, scale=c["scale"], qk_format=fmt).double()
            o = c["out"][r : r + 1].double()
            num[row] += float((oa - o).pow(2).sum())
            den[row] += float(o.pow(2).sum())
    return [math.sqrt(n / d) for n, d in zip(num, den)]


def _pipeline(family):
    if family == "reference":
        from sixbit_tune.models.specs import load_pipeline

        pipe = load_pipeline("reference", device="cpu", dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        kwargs = dict(prompt=["a red square moving left"], num_inference_steps=2, output_type="latent",
                      generator=torch.Generator().manual_seed(0))
        return pipe, kwargs
    return tiny_pipeline(family), tiny_pipeline_call_kwargs(family, "a cat runs", steps=2, seed=1)


@pytest.mark.parametrize("family", ["reference", "cogvideox", "wan", "hunyuanvideo", "ltx", "mochi"])
def test_attn_err_for_every_step_branch_block_equals_independent_computation(family, monkeypatch):
    pipe, kwargs = _pipeline(family)
    adapter = get_adapter(pipe)
    blocks = adapter.blocks()
    modules = {b.index: getattr(b.module, SELF_ATTN[family]) for b in blocks}
    inst = instrument(pipe, layers=False, attention_formats=FORMATS)
    assert inst.attention_modules == {b.index: f"{b.name}.{SELF_ATTN[family]}" for b in blocks}
    rec = _SDPARecorder(monkeypatch, modules)
    flushed = []
    calls_per_step = []

    def cb(_p, i, t, _kw):
        flushed.append(inst.flush(i, [0], float(t)))
        calls_per_step.append(rec.step)
        rec.step += 1
        return {}

    with torch.inference_mode():
        pipe(**kwargs, callback_on_step_end=cb)
    rec.remove()
    inst.remove()
    assert len(flushed) == 2

    # every (step, branch, block, format) recorded exactly once
    keys = [(s, b, i, f) for f_ in flushed for s, b, i, f in zip(f_.attention["step"], f_.attention["branch"],
                                                                 f_.attention["block_index"], f_.attention["format"])]
    want = {(s, br, b.index, f) for s in (0, 1) for br in ("cond", "uncond") for b in blocks for f in FORMATS}
    assert len(keys) == len(want) and set(keys) == want

    # step 1 against the independent recomputation, branch by branch
    step = 1
    got = flushed[step].attention
    batched = adapter.cfg_mode == "batched"
    checked = 0
    for block in blocks:
        calls = [c for c in rec.calls if c["step"] == step and c["block"] == block.index]
        assert calls, f"no attention call captured in {block.name}"
        # separate-CFG families call the transformer once per branch, cond first: split the calls per call
        groups = {"both": calls} if batched else _split_branches(calls)
        for label, group in groups.items():
            batch = 2 if batched else 1
            for fmt in FORMATS:
                expected = _expected_errors(group, batch, fmt)
                branches = ["uncond", "cond"] if batched else [label]
                for row, branch in enumerate(branches):
                    (value,) = [e for s, br, i, f, e in zip(got["step"], got["branch"], got["block_index"],
                                                             got["format"], got["attn_err"])
                                if br == branch and i == block.index and f == fmt]
                    assert value == pytest.approx(expected[row], rel=1e-5, abs=1e-9), (block.name, branch, fmt)
                    assert 0.0 < value < 0.5
                    checked += 1
    assert checked == len(blocks) * 2 * len(FORMATS)
    if family == "hunyuanvideo":
        assert any(c["mask"] is not None for c in rec.calls)  # the key-padding path ran


def _split_branches(calls: list[dict]) -> dict[str, list[dict]]:
    """Separate CFG: the block's calls of one step come from two transformer calls (cond, then uncond) with the
    same number of attention calls each."""
    half = len(calls) // 2
    assert len(calls) == 2 * half
    return {"cond": calls[:half], "uncond": calls[half:]}


def test_no_attention_formats_means_no_attention_hooks():
    model = tiny_transformer("wan")
    with instrument(model, layers=False, attention_formats=()) as inst:
        assert inst.attention_modules == {}
        attn = get_adapter(model).blocks()[0].module.attn1
        assert not (hasattr(attn, "_diffusers_hook") and HOOK_NAME in attn._diffusers_hook.hooks)
    with pytest.raises(ValueError, match="attention formats must be a subset"):
        instrument(model, attention_formats=("nvfp4",))


def test_capture_refuses_what_the_8bit_route_does_not_compute_and_honours_key_padding():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 24, 16, generator=g) for _ in range(3))
    keep = torch.ones(2, 1, 1, 24, dtype=torch.bool)
    keep[1, ..., 17:] = False
    with SDPACapture() as cap:
        F.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(24, 24))  # additive float mask
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
        F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], enable_gqa=True)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    skips = [c.skip for c in cap.calls]
    assert "float32" in skips[0] and skips[1] == "is_causal=True" and skips[2] == "grouped-query attention"
    assert skips[3] is None and torch.equal(cap.calls[3].out, out)
    with pytest.raises(ValueError, match="not taken: is_causal"):
        attention_errors(cap.calls[1], ["fp8"])
    err = combine_calls([attention_errors(cap.calls[3], ["fp8"])], 2)
    for r in range(2):
        idx = keep[r, 0, 0]
        oa = attention_8bit_reference(q[r : r + 1], k[r : r + 1, :, idx], v[r : r + 1, :, idx], qk_format="fp8")
        expect = (oa - out[r : r + 1]).norm() / out[r : r + 1].norm()
        assert float(err[0, r]) == pytest.approx(float(expect), rel=1e-5)
    # NaN inputs give a NaN error (reported by the step's flush, naming the block), not an exception mid-forward
    qn = q.clone()
    qn[1, 0, 0, 0] = float("nan")
    nan_err = combine_calls([attention_errors(AttentionCall(qn, k, v, out), ["fp8"])], 2)
    assert torch.isnan(nan_err).all()
    with pytest.raises(ValueError, match="cannot be attributed"):
        combine_calls([attention_errors(AttentionCall(q, k, v, out), ["fp8"])] * 3, 5)


def test_a_block_whose_attention_makes_no_sdpa_call_is_warned_once_and_records_no_attn_err():
    model = tiny_transformer("wan")
    adapter = get_adapter(model)
    attn = adapter.blocks()[0].module.attn1
    proc = attn.processor

    class MathProcessor:
        """Attention written out with softmax (no scaled_dot_product_attention call), numerically the same op."""

        def __call__(self, attn, *args, **kw):
            orig = F.scaled_dot_product_attention

            def math_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                          enable_gqa=False):
                w = torch.softmax(query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1]), dim=-1)
                return w @ value

            F.scaled_dot_product_attention = math_sdpa
            try:
                return proc(attn, *args, **kw)
            finally:
                F.scaled_dot_product_attention = orig

    attn.set_processor(MathProcessor())
    from sixbit_tune.models.tiny import tiny_transformer_inputs

    with instrument(model, layers=False) as inst:
        with pytest.warns(AttentionNotCaptured, match=r"blocks\.0\.attn1: no attn_err recorded: .*no torch") as w:
            for _ in range(2):
                with torch.no_grad(), model.cache_context("cond"):
                    model(**tiny_transformer_inputs("wan", batch=1))
        recs = inst.flush(0, [0])
    assert len([x for x in w if issubclass(x.category, AttentionNotCaptured)]) == 1
    blocks = sorted(set(recs.attention["block_index"]))
    assert 0 not in blocks and blocks == [b.index for b in adapter.blocks()][1:]
