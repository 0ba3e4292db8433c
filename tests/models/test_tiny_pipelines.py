"""Full tiny pipelines of all five families, run offline with CFG; CFG rows as the pipelines really batch them."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from sixbit_tune.models.adapters import FAMILIES, get_adapter
from sixbit_tune.models.tiny import TINY_VIDEO, tiny_pipeline, tiny_pipeline_call_kwargs

ALL = sorted(FAMILIES)
PROMPTS = ["a cat runs on the beach", "a red car in the snow"]
NEGATIVE = "bad"
STEPS = 2


@pytest.fixture(scope="module")
def pipes():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # tests/conftest.py; nothing here may touch the network
    return {family: tiny_pipeline(family) for family in ALL}


def _run(pipe, family, prompts, guidance):
    """Run the pipeline; record (context name, batch size, encoder_hidden_states) of every transformer call."""
    transformer = pipe.transformer
    current: list[str | None] = [None]
    calls = []
    original = transformer.cache_context

    @contextlib.contextmanager
    def recording_context(name, **kwargs):
        current[0] = name
        try:
            with original(name, **kwargs):
                yield
        finally:
            current[0] = None

    def pre(mod, args, kwargs):
        ehs = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[2]
        hs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        calls.append((current[0], hs.shape[0], ehs.detach().clone()))

    transformer.cache_context = recording_context
    handle = transformer.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        kwargs = tiny_pipeline_call_kwargs(family, prompts, steps=STEPS, guidance=guidance, negative_prompt=NEGATIVE)
        frames = pipe(**kwargs).frames
    finally:
        handle.remove()
        del transformer.cache_context
    return frames, calls


@pytest.fixture(scope="module")
def cfg_runs(pipes):
    """One CFG run per family: (frames, transformer calls)."""
    return {family: _run(pipes[family], family, PROMPTS, guidance=5.0) for family in ALL}


@pytest.mark.parametrize("family", ALL)
def test_pipeline_runs_with_cfg_and_is_deterministic(pipes, cfg_runs, family):
    pipe = pipes[family]
    frames, calls = cfg_runs[family]
    video = TINY_VIDEO[family]
    assert frames.shape[0] == len(PROMPTS)
    assert tuple(frames.shape[2:]) == (3, video["height"], video["width"])
    assert torch.isfinite(frames).all()
    adapter = get_adapter(pipe)
    per_step = 1 if adapter.cfg_mode == "batched" else 2
    assert len(calls) == STEPS * per_step
    again, _ = _run(pipe, family, PROMPTS, guidance=5.0)
    assert torch.equal(frames, again)


@pytest.mark.parametrize("family", ALL)
def test_row_branches_match_real_pipeline_batches(pipes, cfg_runs, family):
    """Rows labelled "uncond" carry the negative prompt's embedding, rows labelled "cond" the prompt's."""
    pipe = pipes[family]
    adapter = get_adapter(pipe)
    n = len(PROMPTS)
    # Reference embeddings: runs without CFG, where every row is a conditional row.
    _, pos_calls = _run(pipe, family, PROMPTS, guidance=1.0)
    _, neg_calls = _run(pipe, family, [NEGATIVE] * n, guidance=1.0)
    for ctx, batch, _ in pos_calls:
        assert adapter.row_branches(batch, n, ctx) == ["cond"] * n
    pos, neg = pos_calls[0][2], neg_calls[0][2]
    assert not torch.allclose(pos, neg)

    _, calls = cfg_runs[family]
    seen = set()
    for ctx, batch, ehs in calls:
        assert ctx in adapter.family.cfg_contexts
        branches = adapter.row_branches(batch, n, ctx)
        assert len(branches) == batch == ehs.shape[0]
        for row, branch in enumerate(branches):
            expected = (neg if branch == "uncond" else pos)[row % n]
            torch.testing.assert_close(ehs[row], expected)
            seen.add(branch)
    assert seen == {"cond", "uncond"}
