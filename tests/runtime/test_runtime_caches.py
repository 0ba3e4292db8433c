"""diffusers' own caches (FirstBlockCache here; every diffusers cache technique is refused alike): apply_policy
refuses them with a PolicyError in either order, and removing the policy never disturbs the cache."""

from __future__ import annotations

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig
from rt_helpers import get_pipe, run_pipe

from sixbit_tune.errors import PolicyError
from sixbit_tune.runtime import MixedPrecisionLinear, apply_policy, make_static_policy

FAMILY = "wan"


def _policy(pipe):
    return make_static_policy(pipe, "int8", 1e9, warmup=1, cooldown=1, max_skips=1)


def _fbc(pipe):
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))  # skips every block after the first


@pytest.fixture
def pipe():
    p = get_pipe(FAMILY)
    yield p
    if p.transformer.is_cache_enabled:
        p.transformer.disable_cache()


def test_apply_policy_refuses_an_enabled_diffusers_cache(pipe):
    plain = run_pipe(pipe, FAMILY, steps=4)
    _fbc(pipe)
    cached = run_pipe(pipe, FAMILY, steps=4)
    assert not torch.equal(cached, plain)  # the cache acts
    with pytest.raises(PolicyError, match=r"fbc_leader_block_hook.*disable_cache\(\)"):
        apply_policy(pipe, _policy(pipe))
    assert not any(isinstance(m, MixedPrecisionLinear) for m in pipe.transformer.modules())
    assert torch.equal(run_pipe(pipe, FAMILY, steps=4), cached)  # the cache is untouched
    pipe.transformer.disable_cache()
    assert torch.equal(run_pipe(pipe, FAMILY, steps=4), plain)


def test_cache_enabled_after_the_policy_is_refused_at_the_call_and_survives_remove(pipe):
    plain = run_pipe(pipe, FAMILY, steps=4)
    _fbc(pipe)
    cached = run_pipe(pipe, FAMILY, steps=4)
    pipe.transformer.disable_cache()
    handle = apply_policy(pipe, _policy(pipe))
    with_policy = run_pipe(pipe, FAMILY, steps=4)
    _fbc(pipe)  # registered after (outside) the policy's hooks on the blocks
    with pytest.raises(PolicyError, match=r"enabled after apply_policy.*handle\.remove\(\)"):
        run_pipe(pipe, FAMILY, steps=4)
    handle.remove()
    assert pipe.transformer.is_cache_enabled
    assert torch.equal(run_pipe(pipe, FAMILY, steps=4), cached)  # the cache still works after the removal
    pipe.transformer.disable_cache()
    assert torch.equal(run_pipe(pipe, FAMILY, steps=4), plain)
    # And the other way round: disabling the cache lets the policy run again.
    handle = apply_policy(pipe, _policy(pipe))
    _fbc(pipe)
    pipe.transformer.disable_cache()
    assert torch.equal(run_pipe(pipe, FAMILY, steps=4), with_policy)
    assert handle.stats().skipped_blocks > 0
    handle.remove()
    assert torch.equal(run_pipe(pipe, FAMILY, steps=4), plain)
