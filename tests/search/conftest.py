"""Fixtures of the search tests: a copy per test of the shared profiled + fitted tiny:wan store (tests/conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture
def store_copy(profiled_tiny_store, tmp_path) -> Path:
    dest = tmp_path / "store"
    shutil.copytree(profiled_tiny_store, dest)
    return dest
