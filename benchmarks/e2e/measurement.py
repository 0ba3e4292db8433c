"""How a contender is timed and weighed: clocks, peak memory, weight bytes, compilation, the run's environment.

Nothing here knows which contender it measures.
"""

from __future__ import annotations

import datetime as _dt
import sys
import time
from typing import Any


def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Clock:
    """CUDA events on a GPU, ``perf_counter`` on the CPU."""

    def __init__(self, device):
        import torch

        self.cuda = torch.device(device).type == "cuda"

    def start(self):
        import torch

        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def stop(self, start) -> Any:
        import torch

        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return (start, e)
        return (start, time.perf_counter())

    def seconds(self, pair) -> float:
        import torch

        a, b = pair
        if self.cuda:
            torch.cuda.synchronize()
            return a.elapsed_time(b) / 1000.0
        return b - a


def reset_peak(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device) -> int | None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    return None


def gpu_name(device) -> str:
    """``torch.cuda.get_device_name`` of ``device``, or ``"cpu"``."""
    import torch

    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _tensor_bytes(t) -> int:
    """Storage bytes of a tensor, looking inside tensor subclasses (torchao's quantized weights)."""
    import torch

    if t is None:
        return 0
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = flatten()
        return sum(_tensor_bytes(getattr(t, n, None)) for n in names)
    return t.numel() * t.element_size()


def weight_bytes(transformer, adapter) -> tuple[int, int]:
    """(all transformer parameters, in-block linears only) in bytes; quantized encodings counted as stored by the
    runtime's accounting (both encodings for dynamic layers), torchao's subclasses through their inner tensors."""
    from sixbit_tune.runtime import MixedPrecisionLinear

    total = sum(_tensor_bytes(p) for p in transformer.parameters())
    linear = 0
    for mod in transformer.modules():
        if isinstance(mod, MixedPrecisionLinear):
            enc = sum(mod.weight_bytes().values())
            total += enc
            linear += enc + (_tensor_bytes(mod.bias) if mod.bias is not None else 0)
    for lin in adapter.all_linears().values():  # original or torchao-quantized nn.Linear still in place
        linear += sum(_tensor_bytes(p) for p in lin.parameters())
    return int(total), int(linear)


# ------------------------------------------------------------------------------------------------ compilation
def compile_blocks(adapter) -> None:
    """Regional compilation: each block's own ``forward`` is replaced by ``torch.compile`` of it (one compiled graph
    shared by all blocks of a class). Hooks installed afterwards (the sixbit runtime, FirstBlockCache, cache-dit)
    wrap the compiled forward and stay eager; so no block hook object ends up in a guard (which would recompile per
    block)."""
    import torch

    torch._dynamo.reset()
    for ref in adapter.blocks():
        m = ref.module
        m.forward = torch.compile(type(m).forward.__get__(m))
        m._e2e_compiled = True


def compile_whole(transformer, mode: str | None = "reduce-overhead", backend: str = "inductor") -> None:
    """The whole transformer's ``forward`` under one ``torch.compile`` (``mode="reduce-overhead"``: CUDA graphs).

    A CUDA graph replays into the same output buffers, and a pipeline calls the transformer twice per step (one call
    per guidance branch) before it combines the two outputs: each call therefore starts a new graph step
    (``torch.compiler.cudagraph_mark_step_begin``) and returns a clone of its outputs. (``backend``: another
    ``torch.compile`` backend, for checking the wrapper on the CPU.)"""
    import torch
    from torch.utils._pytree import tree_map_only

    torch._dynamo.reset()
    compiled = torch.compile(type(transformer).forward.__get__(transformer), mode=mode, backend=backend)

    def forward(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return tree_map_only(torch.Tensor, torch.Tensor.clone, compiled(*args, **kwargs))

    transformer.forward = forward
    transformer._e2e_compiled = True


def uncompile(adapter) -> None:
    """Undo :func:`compile_blocks` and :func:`compile_whole`."""
    import torch

    for m in [ref.module for ref in adapter.blocks()] + [adapter.transformer]:
        if m.__dict__.pop("_e2e_compiled", False):
            m.__dict__.pop("forward", None)
    torch._dynamo.reset()


def configure_dynamo() -> None:
    """Compiled regions are recompiled per input layout (the first block sees other strides) and per quantized-layer
    fragment: raise dynamo's limits so that nothing silently falls back to eager."""
    import torch

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = 4096


# ------------------------------------------------------------------------------------------------ environment
def environment(device, dtype) -> dict:
    """Versions, date, device and GPU name of this run (``gpu`` is ``"cpu"`` on the CPU)."""
    import torch

    meta: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
        "python": sys.version.split()[0], "gpu": gpu_name(device),
    }
    for mod in ("triton", "diffusers", "torchao", "torchmetrics", "cache_dit"):
        try:
            meta[mod] = __import__(mod).__version__
        except Exception:
            meta[mod] = None
    if torch.device(device).type == "cuda":
        meta["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    try:
        from sixbit_tune.kernels import kernel_path

        from sixbit_tune.routes import QUANT_FORMATS

        meta["kernel_paths"] = {f: kernel_path(f, device) for f in QUANT_FORMATS}
    except Exception as e:
        meta["kernel_paths"] = f"unknown ({e})"
    return meta
