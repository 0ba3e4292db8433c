"""Every model spec loads the model users get from ``from_pretrained(torch_dtype=...)``: the same dtype for every
parameter and buffer (Wan keeps its time embedder, scale-shift tables and norms in float32), the same values, the
same outputs bit for bit."""

from __future__ import annotations

import diffusers
import pytest
import torch
from torch import nn

from sixbit_tune.models.specs import (
    build_from_config,
    build_shape_transformer,
    load_pipeline,
    load_transformer,
)
from sixbit_tune.models.tiny import (
    TINY_TRANSFORMER_KWARGS,
    tiny_pipeline,
    tiny_pipeline_call_kwargs,
    tiny_transformer,
    tiny_transformer_inputs,
)

BF16 = torch.bfloat16
FAMILIES = sorted(TINY_TRANSFORMER_KWARGS)
# What diffusers keeps in float32 in a bfloat16 Wan transformer (the tiny one has every kind of such module).
WAN_FP32 = ("condition_embedder.time_embedder.", "scale_shift_table", ".norm2.")


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not) by name."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def assert_same_module(got: nn.Module, want: nn.Module) -> None:
    a, b = _tensors(got), _tensors(want)
    assert sorted(a) == sorted(b)
    wrong = {n: (a[n].dtype, b[n].dtype) for n in b if a[n].dtype != b[n].dtype}
    assert not wrong, f"dtypes differ from from_pretrained (got, want): {wrong}"
    differ = [n for n in b if not torch.equal(a[n], b[n])]
    assert not differ, f"values differ: {differ}"


def _forward(model: nn.Module, family: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_transformer_inputs(family, batch=2, dtype=BF16))[0]


def test_wan_pipeline_folder_loads_as_from_pretrained(tmp_path):
    tiny_pipeline("wan").save_pretrained(tmp_path)
    want = diffusers.DiffusionPipeline.from_pretrained(tmp_path, torch_dtype=BF16)
    got = load_pipeline(str(tmp_path), device="cpu", dtype=BF16)
    fp32 = [n for n, p in want.transformer.named_parameters() if p.dtype == torch.float32]
    assert all(any(k in n for n in fp32) for k in WAN_FP32), fp32  # the case this test is about
    for name, component in want.components.items():
        if isinstance(component, nn.Module):
            assert_same_module(getattr(got, name), component)
    assert torch.equal(_forward(got.transformer, "wan"), _forward(want.transformer, "wan"))
    kwargs = tiny_pipeline_call_kwargs("wan", "a red square moving left", steps=2, guidance=5.0)
    assert torch.equal(got(**kwargs).frames, want(**tiny_pipeline_call_kwargs("wan", "a red square moving left",
                                                                                  steps=2, guidance=5.0)).frames)
    # the transformer alone, from the pipeline folder and from a transformer folder
    want_t = diffusers.WanTransformer3DModel.from_pretrained(tmp_path, subfolder="transformer", torch_dtype=BF16)
    assert_same_module(load_transformer(str(tmp_path), device="cpu", dtype=BF16), want_t)
    want_t.save_pretrained(tmp_path / "bare")
    assert_same_module(load_transformer(str(tmp_path / "bare"), device="cpu", dtype=BF16), want_t)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_transformer_spec_loads_as_from_pretrained(family, tmp_path):
    tiny_transformer(family).save_pretrained(tmp_path)
    want = type(tiny_transformer(family)).from_pretrained(tmp_path, torch_dtype=BF16)
    got = load_transformer(f"tiny:{family}", device="cpu", dtype=BF16)
    assert_same_module(got, want)
    assert torch.equal(_forward(got, family), _forward(want, family))


def test_tiny_wan_pipeline_spec_loads_as_from_pretrained(tmp_path):
    tiny_pipeline("wan").save_pretrained(tmp_path)
    want = diffusers.DiffusionPipeline.from_pretrained(tmp_path, torch_dtype=BF16)
    got = load_pipeline("tiny:wan", device="cpu", dtype=BF16)
    for name, component in want.components.items():
        if isinstance(component, nn.Module):
            assert_same_module(getattr(got, name), component)
    kwargs = tiny_pipeline_call_kwargs("wan", "a blue circle", steps=2, guidance=5.0)
    assert torch.equal(got(**kwargs).frames,
                       want(**tiny_pipeline_call_kwargs("wan", "a blue circle", steps=2, guidance=5.0)).frames)


@pytest.mark.parametrize("family", FAMILIES)
def test_models_built_from_configs_take_from_pretrained_dtypes(family, tmp_path):
    """``shape:`` specs are built from configs with random weights: each tensor gets from_pretrained's dtype."""
    model = tiny_transformer(family)
    model.save_pretrained(tmp_path)
    want = type(model).from_pretrained(tmp_path, torch_dtype=BF16)
    built = build_from_config(type(model).__name__, TINY_TRANSFORMER_KWARGS[family], dtype=BF16)
    a, b = _tensors(built), _tensors(want)
    assert sorted(a) == sorted(b)
    assert {n: t.dtype for n, t in a.items()} == {n: t.dtype for n, t in b.items()}


def test_wan_shape_keeps_fp32_modules():
    model = build_shape_transformer("wan2.1-1.3b", device="meta", dtype=BF16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["condition_embedder.time_embedder.linear_1.weight"] == torch.float32
    assert dtypes["blocks.0.scale_shift_table"] == torch.float32
    assert dtypes["blocks.0.norm2.weight"] == torch.float32
    assert dtypes["blocks.0.attn1.to_q.weight"] == BF16


def test_reference_spec_loads_as_from_pretrained():
    from sixbit_tune.models.reference import WEIGHTS_DIR
    from sixbit_tune.models.reference.pipeline import ReferencePipeline

    if not (WEIGHTS_DIR / "model_index.json").is_file():
        pytest.skip("the reference model is not built")
    want = ReferencePipeline.from_pretrained(str(WEIGHTS_DIR), torch_dtype=BF16, local_files_only=True)
    got = load_pipeline("reference", device="cpu", dtype=BF16)
    for name, component in want.components.items():
        if isinstance(component, nn.Module):
            assert_same_module(getattr(got, name), component)
