"""Shared helpers of the runtime tests (tiny pipelines, an independent fake-quant reference model, recorders)."""

from __future__ import annotations

import functools

import torch

from sixbit_tune.formats import quantized_linear_reference
from sixbit_tune.models.adapters import get_adapter
from sixbit_tune.models.tiny import (
    tiny_pipeline,
    tiny_pipeline_call_kwargs,
    tiny_transformer,
    tiny_transformer_inputs,
)

FAMILIES = ("cogvideox", "wan", "hunyuanvideo", "ltx", "mochi")
_PIPES: dict[str, object] = {}


def get_pipe(family: str):
    """A cached tiny pipeline (tests must leave it as they found it: remove every handle)."""
    if family not in _PIPES:
        _PIPES[family] = tiny_pipeline(family)
    return _PIPES[family]


def call_kwargs(family: str, steps: int = 4, prompts="a cat runs", guidance: float = 5.0, seed: int = 0, **extra):
    kw = tiny_pipeline_call_kwargs(family, prompts, steps=steps, guidance=guidance, seed=seed)
    kw["output_type"] = "latent"
    kw.update(extra)
    return kw


def run_pipe(pipe, family: str, steps: int = 4, **kw) -> torch.Tensor:
    return pipe(**call_kwargs(family, steps, **kw)).frames


def fake_quant_model(model: torch.nn.Module, fmt: str) -> torch.nn.Module:
    """``model`` with every in-block Linear's forward replaced by ``formats.quantized_linear_reference``.

    Built independently of the runtime: no hooks, no MixedPrecisionLinear, the reference quantizes the weight at
    every call.
    """

    def forward(lin, x):
        return quantized_linear_reference(x, lin.weight, lin.bias, fmt).to(x.dtype)

    for lin in get_adapter(model).all_linears().values():
        lin.forward = functools.partial(forward, lin)
    return model


def transformer_and_inputs(family: str, batch: int = 2):
    return tiny_transformer(family), tiny_transformer_inputs(family, batch=batch)


class BlockRecorder:
    """Torch forward hooks on every block: the input streams and output streams of each call, and whether the
    block's body ran (a forward hook on the block's first linear)."""

    def __init__(self, model):
        self.adapter = get_adapter(model)
        self.calls: list[dict] = []  # {"block", "xs", "ys", "ran"}
        self._handles = []
        self._ran: dict[int, bool] = {}
        for ref in self.adapter.blocks():
            self._handles.append(ref.module.register_forward_pre_hook(self._pre(ref), with_kwargs=True))
            self._handles.append(ref.module.register_forward_hook(self._post(ref), with_kwargs=True))
            first = next(m for n, m in ref.module.named_modules() if n and isinstance(m, torch.nn.Module)
                         and type(m).__name__ in ("Linear", "MixedPrecisionLinear"))
            self._handles.append(first.register_forward_hook(self._body(ref)))

    def _pre(self, ref):
        def hook(module, args, kwargs):
            xs = tuple(x.detach().clone() for x in self.adapter.streams_in(ref, args, kwargs))
            self._ran[ref.index] = False
            self.calls.append({"block": ref.index, "xs": xs})

        return hook

    def _body(self, ref):
        def hook(module, args, output):
            self._ran[ref.index] = True

        return hook

    def _post(self, ref):
        def hook(module, args, kwargs, output):
            rec = self.calls[-1]
            rec["ys"] = tuple(y.detach().clone() for y in self.adapter.streams_out(ref, output))
            rec["ran"] = self._ran[ref.index]

        return hook

    def remove(self):
        for h in self._handles:
            h.remove()


def gamma_rows(xs, ys) -> list[float]:
    """Γ per row computed directly (float64): Σ|Y−X| / Σ|X| over all streams."""
    num = sum((y.double() - x.double()).abs().reshape(x.shape[0], -1).sum(1) for x, y in zip(xs, ys))
    den = sum(x.double().abs().reshape(x.shape[0], -1).sum(1) for x in xs)
    return (num / den).tolist()
