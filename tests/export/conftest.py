"""Shared runs for the export tests: each recipe's smoke preset trained for a couple of steps on tiny data,
once per session (several test modules read the same run), and exported once per run."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.export.helpers import NEEDS_DATA, RUNS


@pytest.fixture(scope="session")
def train(tmp_path_factory) -> Callable[[str], Path]:
    """train(recipe) -> the folder of a finished smoke run of `recipe` (see helpers.RUNS)."""
    from llmlab.runner import run

    root = tmp_path_factory.mktemp("runs")
    done: dict[str, Path] = {}

    def get(recipe: str) -> Path:
        if recipe in done:
            return done[recipe]
        if recipe in NEEDS_DATA:
            data = os.environ.get("LLMLAB_DATA")
            if not (data and Path(data).is_dir()):
                if os.environ.get("LLMLAB_REQUIRE_DATA", "") not in ("", "0", "false", "no"):
                    pytest.fail(f"{recipe} needs LLMLAB_DATA (LLMLAB_REQUIRE_DATA=1)")
                pytest.skip(f"{recipe} needs the real data (LLMLAB_DATA={data!r})")
        overrides = [o.format(llama=get("llama-pretrain")) if "{" in o else o for o in RUNS[recipe]]
        out = root / recipe
        with pytest.MonkeyPatch.context() as mp:  # as tests/conftest.py's per-test cache, for the session
            mp.setenv("LLMLAB_CACHE", str(tmp_path_factory.getbasetemp() / "llmlab-cache"))
            mp.setenv("LLMLAB_PROGRESS", "0")
            result = run(recipe, "smoke", overrides, out=out, device="cpu")
        assert result["status"] == "completed", result
        done[recipe] = out
        return out

    return get


@pytest.fixture(scope="session")
def export(train, tmp_path_factory) -> Callable[..., Path]:
    """export(recipe, **options) -> the folder `llmlab export` wrote for that recipe's run (cached)."""
    from llmlab.export import export_run

    root = tmp_path_factory.mktemp("exports")
    done: dict[tuple, Path] = {}

    def get(recipe: str, **options) -> Path:
        key = (recipe, *sorted(options.items()))
        if key not in done:
            out = root / "-".join([recipe, *(f"{k}" for k, _ in sorted(options.items()))])
            export_run(train(recipe), out, **options)
            done[key] = out
        return done[key]

    return get
