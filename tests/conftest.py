"""Shared fixtures: where the real data lives, and whether its absence is a failure.

Real-data tests take the `shared_data` fixture. It yields `$LLMLAB_DATA` when that folder exists; otherwise
the test is skipped, unless `LLMLAB_REQUIRE_DATA=1` (as in CI), where a missing data root fails the test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def pytest_configure(config) -> None:
    """Under pytest-xdist (`make test` runs two workers), each worker and the processes it starts use one
    intra-op thread: two workers at torch's default of one thread per core would oversubscribe the cores,
    and on 2 cores that slows both 5-10x (OpenMP threads spin while they wait for each other)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


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


@pytest.fixture
def one_thread():
    """torch on one intra-op thread while a test runs, the previous count after. On 2 shared cores more
    threads only contend; the golden curves are also made on one thread (tests/recipes/test_recipes.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Derived caches go to a per-session temp folder, never to the user's ~/.cache."""
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path_factory.getbasetemp() / "llmlab-cache"))


# The longest test files (their total time per file, measured with `make test`'s two workers on 2 cores),
# collected first: pytest-xdist hands out whole files in collection order, so starting the long ones early
# keeps one worker from finishing a long file alone at the end.
LONG_FILES_FIRST = (
    "tests/train/test_strategies.py",  # ~370 s: DeepSpeed / FSDP2 under torchrun
    "tests/recipes/test_translation.py",  # ~220 s: real Multi30k
    "tests/recipes/test_llama_lm.py",  # ~210 s: real novels + LoRA
    "tests/test_notebooks.py",  # ~165 s: eight notebooks, one kernel each
    "tests/recipes/test_gpt_lm.py",  # ~150 s
    "tests/recipes/test_gpt_tp.py",  # ~110 s
    "tests/recipes/test_recipes.py",  # ~100 s: every smoke preset
)


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    root = Path(str(config.rootpath))

    def key(item) -> int:
        path = Path(str(item.path))
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        return rank.get(name, len(rank))

    items.sort(key=key)  # stable: the order within a file, and of all other files, is kept
