"""Shared fixtures: where the real data lives, and whether its absence is a failure.

Real-data tests take the `shared_data` fixture. It yields `$LLMLAB_DATA` when that folder exists; otherwise
the test is skipped, unless `LLMLAB_REQUIRE_DATA=1` (as in CI), where a missing data root fails the test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _require_data() -> bool:
    return os.environ.get("LLMLAB_REQUIRE_DATA", "") not in ("", "0", "false", "no")


@pytest.fixture
def shared_data() -> Path:
    root = os.environ.get("LLMLAB_DATA")
    if root and Path(root).is_dir():
        return Path(root)
    msg = f"real data not available (LLMLAB_DATA={root!r})"
    if _require_data():
        pytest.fail(msg + " but LLMLAB_REQUIRE_DATA=1")
    pytest.skip(msg)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Derived caches go to a per-session temp folder, never to the user's ~/.cache."""
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path_factory.getbasetemp() / "llmlab-cache"))
