"""Every registered recipe runs its smoke preset, reaches its smoke target, and follows its golden curve.

The golden curve is the first train-loss log lines of the smoke run, stored in tests/recipes/golden/. It
catches silent changes to initialisation, data order, the schedule or the loss. Regenerate after an
intended change with LLMLAB_UPDATE_GOLDEN=1. Tolerance: rtol 1e-3, far above float32 reduction-order noise
between CPUs (~1e-6 after a hundred steps) and far below what a real change moves (>1e-2).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from llmlab.recipes import RECIPES
from llmlab.runner import run

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_smoke_preset_trains_and_matches_its_golden_curve(name, tmp_path, request):
    recipe = RECIPES[name]
    assert "smoke" in recipe.presets, f"{name} has no smoke preset"
    data_dir = request.getfixturevalue("shared_data") if recipe.smoke_needs_data else None  # else skips
    result = run(name, "smoke", out=tmp_path / "run", device="cpu", data_dir=data_dir)
    assert result["status"] == "completed"
    target = recipe.target("smoke")
    if target is not None:
        assert result["target"]["met"], f"{name} smoke: {target.describe()} not met: {result['metrics']}"

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    curve = [[r["step"], r["loss"]] for r in records if r["split"] == "train"][:12]
    golden = GOLDEN / f"{name}.json"
    if os.environ.get("LLMLAB_UPDATE_GOLDEN") == "1" or not golden.exists():
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(json.dumps({"train_loss": curve}, indent=1) + "\n")
        if os.environ.get("LLMLAB_UPDATE_GOLDEN") != "1":
            pytest.fail(f"no golden curve for {name}: written {golden}; review and commit it")
    expected = json.loads(golden.read_text())["train_loss"]
    assert [s for s, _ in curve] == [s for s, _ in expected]
    assert [v for _, v in curve] == pytest.approx([v for _, v in expected], rel=1e-3)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_presets_resolve_and_describe_themselves(name):
    recipe = RECIPES[name]
    for preset in recipe.presets:
        recipe.config(preset)  # validates
        assert preset in recipe.preset_help, f"{name}:{preset} has no help line"
