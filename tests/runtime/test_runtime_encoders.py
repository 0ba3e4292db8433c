"""The policy's NVFP4 weight encoder is the one the runtime applies (``dmpq.nvfp4_weight_encoder``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sixbit_tune.errors import PolicyError
from sixbit_tune.formats import nvfp4
from sixbit_tune.models.tiny import tiny_transformer
from sixbit_tune.runtime import apply_policy
from sixbit_tune.runtime.build import make_static_policy
from sixbit_tune.runtime.linear import MixedPrecisionLinear


def _with_encoder(policy, encoder: str):
    return dataclasses.replace(policy, dmpq=dataclasses.replace(policy.dmpq, nvfp4_weight_encoder=encoder))


def _swapped(model) -> dict[str, MixedPrecisionLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MixedPrecisionLinear)}


def _same(a: nvfp4.NVFP4Tensor, b: nvfp4.NVFP4Tensor) -> bool:
    return all(torch.equal(x, y) for x, y in zip(dataclasses.astuple(a), dataclasses.astuple(b))
               if isinstance(x, torch.Tensor))


@pytest.mark.parametrize("encoder", ["standard", "scale-search"])
def test_applied_nvfp4_weights_come_from_the_policys_encoder(encoder):
    model = tiny_transformer("wan")
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    policy = _with_encoder(make_static_policy(model, "nvfp4"), encoder)
    handle = apply_policy(model, policy, kernel_preference="reference")
    try:
        layers = _swapped(model)
        assert layers
        differs = False
        for name, layer in layers.items():
            w = originals[name]
            assert _same(layer.qweights["nvfp4"], nvfp4.quantize_weight(w, encoder)), name
            differs |= not _same(layer.qweights["nvfp4"], nvfp4.quantize_weight(w, "standard"))
        assert differs == (encoder != "standard")
    finally:
        handle.remove()


def test_gptq_needs_a_hessian_per_nvfp4_layer_and_uses_it():
    model = tiny_transformer("wan")
    policy = _with_encoder(make_static_policy(model, "nvfp4"), "gptq")
    with pytest.raises(PolicyError, match="dmpq.nvfp4_weight_encoder: the gptq NVFP4 weight encoder needs"):
        apply_policy(model, policy, kernel_preference="reference")
    assert not _swapped(model), "a refused policy leaves the model as it was"
    hessians = {name: torch.eye(lin.in_features, dtype=torch.float64) * 4.0
                for name, lin in ((n, model.get_submodule(n)) for n in policy.dmpq.layers)}
    handle = apply_policy(model, policy, kernel_preference="reference", nvfp4_hessians=hessians)
    try:
        for name, layer in _swapped(model).items():
            expected = nvfp4.quantize_weight(layer.original.weight.detach(), "gptq", hessian=hessians[name])
            assert _same(layer.qweights["nvfp4"], expected), name
    finally:
        handle.remove()
