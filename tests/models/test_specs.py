"""Model specs: shape:* on the meta device, from_pretrained folders, reference, errors."""

from __future__ import annotations

import json

import pytest
import torch

from sixbit_tune.errors import NotBuiltYet, UnsupportedModelError
from sixbit_tune.models import specs
from sixbit_tune.models.adapters import get_adapter
from sixbit_tune.models.specs import (
    SHAPE_CONFIGS,
    SPEC_HELP,
    build_shape_transformer,
    load_pipeline,
    load_transformer,
)
from sixbit_tune.models.tiny import TINY_TRANSFORMER_KWARGS, tiny_pipeline_call_kwargs

# (blocks, hidden width, ffn width) of the published models
SHAPES = {
    "cogvideox-2b": (30, 1920, 4 * 1920),
    "cogvideox-5b": (42, 3072, 4 * 3072),
    "wan2.1-1.3b": (30, 1536, 8960),
    "wan2.1-14b": (40, 5120, 13824),
}


# other families: (blocks, width of the first block's attention query projection)
OTHER_SHAPES = {"hunyuanvideo-13b": (20 + 40, 3072), "ltx-video-2b": (28, 2048), "mochi-1-10b": (48, 3072)}


@pytest.mark.parametrize("name", sorted(OTHER_SHAPES))
def test_other_family_shapes_on_meta(name):
    blocks, dim = OTHER_SHAPES[name]
    adapter = get_adapter(load_transformer(f"shape:{name}", device="meta"))
    refs = adapter.blocks()
    assert len(refs) == blocks
    q = next(lin for rel, lin in adapter.linears(refs[0]).items() if rel.endswith(".to_q"))
    assert (q.out_features, q.in_features) == (dim, dim)
    assert all(p.is_meta for p in adapter.transformer.parameters())


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shape_specs_on_meta(name):
    blocks, dim, ffn = SHAPES[name]
    model = load_transformer(f"shape:{name}", device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())
    adapter = get_adapter(model)
    refs = adapter.blocks()
    assert len(refs) == blocks
    expected = {"attn1.to_q": (dim, dim), "attn1.to_out.0": (dim, dim)}
    if name.startswith("wan"):
        expected |= {"attn2.to_k": (dim, dim), "ffn.net.0.proj": (ffn, dim), "ffn.net.2": (dim, ffn)}
    else:
        expected |= {"ff.net.0.proj": (ffn, dim), "ff.net.2": (dim, ffn), "norm1.linear": (6 * dim, 512)}
    for ref in (refs[0], refs[-1]):
        linears = adapter.linears(ref)
        for rel, (out_f, in_f) in expected.items():
            assert (linears[rel].out_features, linears[rel].in_features) == (out_f, in_f), (name, rel)
    assert {p.dtype for n, p in model.named_parameters() if n.startswith(refs[0].name + ".attn1")} == {torch.bfloat16}


def test_shape_build_materialises_on_device(monkeypatch):
    """The meta-then-materialise path, on the CPU with a small architecture registered as a shape."""
    import diffusers

    monkeypatch.setitem(SHAPE_CONFIGS, "test-wan", ("WanTransformer3DModel", TINY_TRANSFORMER_KWARGS["wan"]))
    model = build_shape_transformer("test-wan", device="cpu", dtype=torch.bfloat16)
    reference = diffusers.WanTransformer3DModel(**TINY_TRANSFORMER_KWARGS["wan"])
    assert not any(p.is_meta for p in model.parameters())
    keep = diffusers.WanTransformer3DModel._keep_in_fp32_modules
    for name, param in model.named_parameters():
        fp32 = any(k in name.split(".") for k in keep)
        assert param.dtype == (torch.float32 if fp32 else torch.bfloat16), name
        assert torch.isfinite(param).all(), name
        assert param.shape == reference.get_parameter(name).shape
    for name, buf in model.named_buffers():
        torch.testing.assert_close(buf, reference.get_buffer(name))
    lin = model.blocks[0].attn1.to_q.weight
    assert lin.float().std() > 0 and not torch.equal(lin, model.blocks[1].attn1.to_q.weight)
    # same seed, same weights
    again = build_shape_transformer("test-wan", device="cpu", dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_spec_errors(monkeypatch, tmp_path):
    with pytest.raises(UnsupportedModelError, match="cogvideox"):
        load_transformer("tiny:sdxl")
    with pytest.raises(UnsupportedModelError, match="wan2.1-14b"):
        load_transformer("shape:wan2.2-5b")
    with pytest.raises(UnsupportedModelError, match="transformer only"):
        load_pipeline("shape:wan2.1-1.3b")
    with pytest.raises(ValueError, match="not a model spec"):
        load_transformer("./no/such/folder")
    with pytest.raises(ValueError, match="empty"):
        load_pipeline("")
    assert "tiny:<family>" in SPEC_HELP and "reference" in SPEC_HELP
    monkeypatch.setattr(specs, "REFERENCE_DIR", tmp_path / "reference")
    with pytest.raises(NotBuiltYet, match="config.json"):
        load_pipeline("reference")
    with pytest.raises(NotBuiltYet):
        load_transformer("reference")


def test_unsupported_pretrained_folder_refused_before_loading(tmp_path):
    index = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedModelError, match="FluxTransformer2DModel"):
        load_transformer(str(tmp_path))
    with pytest.raises(UnsupportedModelError, match="FluxTransformer2DModel"):
        load_pipeline(str(tmp_path))


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_from_pretrained_folders(tmp_path, family):
    pipe = load_pipeline(f"tiny:{family}")
    pipe.save_pretrained(tmp_path / "pipe")
    pipe.transformer.save_pretrained(tmp_path / "transformer_only")

    loaded = load_pipeline(str(tmp_path / "pipe"))
    assert type(loaded) is type(pipe)
    kwargs = tiny_pipeline_call_kwargs(family, "a cat", steps=2, guidance=5.0)
    expected = pipe(**kwargs).frames
    torch.testing.assert_close(loaded(**tiny_pipeline_call_kwargs(family, "a cat", 2, 5.0)).frames, expected)

    sub = load_transformer(str(tmp_path / "pipe"))  # subfolder="transformer" of a pipeline folder
    bare = load_transformer(str(tmp_path / "transformer_only"), dtype=torch.bfloat16)
    want = get_adapter(pipe).config_hash()
    assert get_adapter(sub).config_hash() == want == get_adapter(bare).config_hash()
    assert bare.get_submodule(get_adapter(bare).blocks()[0].name).attn1.to_q.weight.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(pipe.transformer.state_dict().items(), sub.state_dict().items()):
        assert torch.equal(a, b), name
