"""Per-module dtypes exactly as ``from_pretrained(torch_dtype=...)`` gives them, for models built in memory.

diffusers' ``ModelMixin.from_pretrained(torch_dtype=d)`` casts every floating-point entry of the checkpoint's state
dict (parameters and persistent buffers) to ``d``, except entries whose dotted name contains one of the class's
``_keep_in_fp32_modules`` as a whole component (``"time_embedder"`` matches ``condition_embedder.time_embedder.
linear_1.weight``), which it loads in float32. Non-persistent buffers are not in the checkpoint: they keep the
dtype the constructor gave them. A plain ``module.to(d)`` instead casts everything, e.g. Wan's time embedder,
``scale_shift_table`` and block norms become bfloat16, and the model differs from the one users load.

transformers models (the pipelines' text encoders) follow transformers' own rules (``_keep_in_fp32_modules`` for
float16 only, ``_keep_in_fp32_modules_strict`` for float16 and bfloat16, matched by its own patterns); they are
converted by a real ``save_pretrained`` / ``from_pretrained`` round trip, so no rule is copied.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from torch import nn


def keep_in_fp32_modules(model: nn.Module | type) -> tuple[str, ...]:
    """The module names a diffusers model class keeps in float32 when loaded in another dtype (may be empty)."""
    cls = model if isinstance(model, type) else type(model)
    keep = getattr(cls, "_keep_in_fp32_modules", None) or ()
    return (keep,) if isinstance(keep, str) else tuple(keep)


def loaded_dtype(name: str, dtype: torch.dtype, keep_fp32: tuple[str, ...]) -> torch.dtype:
    """The dtype diffusers' ``from_pretrained(torch_dtype=dtype)`` gives the floating-point state-dict entry
    ``name`` (a dotted name inside the model) of a class keeping ``keep_fp32`` in float32."""
    parts = name.split(".")
    return torch.float32 if any(k in parts for k in keep_fp32) else dtype


def _is_transformers_model(module: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel" for c in type(module).__mro__)


@torch.no_grad()
def cast_as_loaded(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module`` with the dtypes ``from_pretrained(torch_dtype=dtype)`` of its class would give it, values cast
    from the current ones (as loading a checkpoint holding them would).

    A diffusers model (or any other ``nn.Module``) is converted in place by the rule of :func:`loaded_dtype` and
    returned; a transformers model is saved to a temporary folder and loaded back with its class's
    ``from_pretrained(dtype=dtype)``, and the loaded copy (in eval mode, on the module's device) is returned.
    """
    if _is_transformers_model(module):
        tensors = [*module.parameters(), *module.buffers()]
        if dtype == torch.float32 and all(t.dtype == torch.float32 for t in tensors if torch.is_floating_point(t)):
            return module  # built in float32 already: loading in float32 keeps every tensor float32
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        training = module.training
        with tempfile.TemporaryDirectory(prefix="sixbit-cast-") as folder:
            module.save_pretrained(folder)
            loaded = type(module).from_pretrained(folder, dtype=dtype)
        loaded.train(training)
        return loaded.to(device)
    keep = keep_in_fp32_modules(module)
    state = set(module.state_dict(keep_vars=True))
    done: dict[int, nn.Parameter] = {}  # a parameter shared by two modules stays shared
    for mod_name, sub in module.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for pname, param in list(sub._parameters.items()):
            full = prefix + pname
            if param is None or full not in state or not torch.is_floating_point(param):
                continue
            if id(param) in done:
                sub._parameters[pname] = done[id(param)]
                continue
            target = loaded_dtype(full, dtype, keep)
            new = param
            if param.dtype != target:
                new = nn.Parameter(param.detach().to(target), requires_grad=param.requires_grad)
                sub._parameters[pname] = new
            done[id(param)] = new
        for bname, buf in list(sub._buffers.items()):
            full = prefix + bname
            if buf is None or full not in state or not torch.is_floating_point(buf):
                continue  # non-persistent buffers are not in a checkpoint: from_pretrained leaves them alone
            target = loaded_dtype(full, dtype, keep)
            if buf.dtype != target:
                sub._buffers[bname] = buf.to(target)
    return module


def pipeline_as_loaded(pipe: Any, dtype: torch.dtype) -> Any:
    """Every ``nn.Module`` component of a diffusers pipeline through :func:`cast_as_loaded` (in place; returns the
    pipeline), as ``DiffusionPipeline.from_pretrained(torch_dtype=dtype)`` would load each component."""
    replaced = {}
    for name, component in pipe.components.items():
        if isinstance(component, nn.Module):
            new = cast_as_loaded(component, dtype)
            if new is not component:
                replaced[name] = new
    if replaced:
        pipe.register_modules(**replaced)
    return pipe
