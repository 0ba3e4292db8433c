"""Runtime test fixtures: cached tiny pipelines, always restored after each test."""

from __future__ import annotations

import pytest
from rt_helpers import _PIPES


@pytest.fixture(autouse=True)
def _remove_left_over_policies():
    yield
    for pipe in _PIPES.values():
        handle = getattr(pipe.transformer, "_sixbit_tune_policy_handle", None)
        if handle is not None:
            handle.remove()
