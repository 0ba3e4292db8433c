"""``ModelAdapter.attentions``: each block's attention modules, with their kind, for the five tiny families."""

from __future__ import annotations

import pytest
import torch

from sixbit_tune.errors import UnsupportedModelError
from sixbit_tune.models.adapters import ATTENTION_KINDS, get_adapter
from sixbit_tune.models.tiny import tiny_transformer

EXPECTED = {
    "cogvideox": [("attn1", "joint")],
    "wan": [("attn1", "self"), ("attn2", "cross")],
    "hunyuanvideo": [("attn", "joint")],
    "ltx": [("attn1", "self"), ("attn2", "cross")],
    "mochi": [("attn1", "joint")],
}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_attentions_name_every_attention_module_of_every_block(family):
    model = tiny_transformer(family)
    adapter = get_adapter(model)
    found = adapter.all_attentions()
    for ref in adapter.blocks():
        atts = adapter.attentions(ref)
        assert [(a.rel, a.kind) for a in atts] == EXPECTED[family]
        assert all(a.block == ref.index and a.name == f"{ref.name}.{a.rel}" for a in atts)
        assert all(a.module is ref.module.get_submodule(a.rel) and a.kind in ATTENTION_KINDS for a in atts)
        # No attention module of the block is left out.
        with_processor = {n for n, m in ref.module.named_modules() if n and hasattr(m, "processor")}
        assert with_processor == {a.rel for a in atts}
    assert [a.name for a in found] == [a.name for ref in adapter.blocks() for a in adapter.attentions(ref)]
    if family == "hunyuanvideo":  # the text refiner's attention is outside the transformer blocks
        assert "context_embedder.token_refiner.refiner_blocks.0.attn" not in {a.name for a in found}


def test_a_block_without_its_attention_module_is_refused():
    model = tiny_transformer("wan")
    adapter = get_adapter(model)
    del adapter.blocks()[1].module.attn2
    adapter.blocks()[1].module.add_module("attn2", torch.nn.Identity())
    with pytest.raises(UnsupportedModelError, match=r"blocks\.1 .* no attention module 'attn2'"):
        adapter.attentions(1)
    assert [a.rel for a in adapter.attentions(0)] == ["attn1", "attn2"]
