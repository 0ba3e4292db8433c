"""Model and group CPU offload on a CUDA GPU, in both orders with apply_policy: every pipeline call skips and routes
as without offload, stats() describes the last call, and after remove() the offloaded pipeline gives the plain
output. The CPU tests (test_runtime_offload.py) run the same hooks with the CPU as onload device; here the weights
really move between the CPU and the GPU."""

from __future__ import annotations

import pytest
import torch
from rt_helpers import run_pipe
from test_runtime_offload import FAMILY, _policy, _summary

from sixbit_tune.models.tiny import tiny_pipeline
from sixbit_tune.runtime import apply_policy

pytestmark = pytest.mark.gpu


def _components_to(pipe, device, *, but=()):
    for name, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module) and name not in but:
            comp.to(device)


def _enable(pipe, kind):
    if kind == "model":
        _components_to(pipe, "cpu")
        pipe.enable_model_cpu_offload(device="cuda")
    else:
        _components_to(pipe, "cuda", but=("transformer",))
        pipe.transformer.to("cpu")
        pipe.transformer.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                                              offload_type="block_level", num_blocks_per_group=1)


@pytest.mark.parametrize("kind", ["model", "group"])
@pytest.mark.parametrize("order", ["apply_then_offload", "offload_then_apply"])
def test_offload_on_the_gpu_follows_the_policy_every_call(order, kind):
    pipe = tiny_pipeline(FAMILY)
    _components_to(pipe, "cuda")
    policy = _policy(pipe)
    plain = [run_pipe(pipe, FAMILY, steps=s, seed=s) for s in (5, 6)]
    with apply_policy(pipe, policy) as h:
        ref_out, ref_stats = [], []
        for s in (5, 6):
            ref_out.append(run_pipe(pipe, FAMILY, steps=s, seed=s))
            ref_stats.append(_summary(h.stats()))
    assert ref_stats[0][2] > 0

    if order == "offload_then_apply":
        _enable(pipe, kind)
    handle = apply_policy(pipe, policy)
    if order == "apply_then_offload":
        _enable(pipe, kind)
    for _ in range(2):
        for k, s in enumerate((5, 6)):
            out = run_pipe(pipe, FAMILY, steps=s, seed=s)
            assert out.device.type == "cuda"
            torch.testing.assert_close(out, ref_out[k], rtol=1e-4, atol=1e-5)
            assert _summary(handle.stats()) == ref_stats[k], (order, kind, s)
    handle.remove()
    for k, s in enumerate((5, 6)):
        torch.testing.assert_close(run_pipe(pipe, FAMILY, steps=s, seed=s), plain[k], rtol=1e-4, atol=1e-5)
