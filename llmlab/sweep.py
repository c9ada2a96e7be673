"""Grid sweeps: every combination of a few config values, each over N seeds, then one comparison table.

    llmlab sweep imdb-lstm optim.lr=1e-3,3e-3 data.max_len=200,400 --seeds 3

An override whose value lists alternatives becomes an axis of the grid (alternatives are separated by `,`;
for tuple- or list-valued keys, whose values contain commas, by `;`); a plain `key=value` applies to every
run. Each run is an ordinary `llmlab run` in its own process (so its time and peak memory are its own) and
an ordinary run directory under the sweep folder, with its own record and report; runs that already completed
are skipped, so an interrupted sweep continues where it stopped. The sweep
writes `sweep.md`: mean ± std over seeds per grid point (the aggregate), then every run.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import subprocess
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from llmlab.config import ConfigError, apply_overrides
from llmlab.recipes import get_recipe


@dataclasses.dataclass
class SweepPlan:
    recipe: str
    preset: str
    axes: dict[str, list[str]]  # key -> alternative values (as typed on the command line)
    fixed: list[str]  # overrides applied to every run
    seeds: list[int]

    def runs(self) -> list[tuple[str, list[str]]]:
        """(run name, overrides) for every grid point and seed, in a stable order."""
        keys = list(self.axes)
        out = []
        for values in itertools.product(*(self.axes[k] for k in keys)):
            point = [f"{k}={v}" for k, v in zip(keys, values, strict=True)]
            for seed in self.seeds:
                overrides = [*self.fixed, *point, f"seed={seed}"]
                out.append((_run_name([*point, f"seed={seed}"]), overrides))
        return out


def _run_name(parts: list[str]) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts))


def _is_sequence_field(cfg: Any, key: str) -> bool:
    node: Any = type(cfg)
    for name in key.split("."):
        if not dataclasses.is_dataclass(node):
            return False
        hints = get_type_hints(node)
        if name not in hints:
            return False
        node = hints[name]
    origin = get_origin(node)
    if origin in (Union, types.UnionType):
        return any(get_origin(a) in (tuple, list) for a in get_args(node))
    return origin in (tuple, list)


def plan_sweep(recipe_name: str, preset: str | None, items: Sequence[str], seeds: int) -> SweepPlan:
    """Split command-line items into grid axes and fixed overrides; validate every run's config up front."""
    if seeds < 1:
        raise ConfigError("--seeds must be >= 1")
    recipe = get_recipe(recipe_name)
    preset = preset or recipe.default_preset
    base = recipe.config(preset)
    axes: dict[str, list[str]] = {}
    fixed: list[str] = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"sweep item {item!r} is not of the form key=value or key=v1,v2")
        key, text = item.split("=", 1)
        sep = ";" if _is_sequence_field(base, key) else ","
        values = [v for v in text.split(sep)]
        if key == "seed":
            raise ConfigError("use --seeds N to repeat runs over seeds 0..N-1, not a seed axis")
        if len(values) > 1:
            if any(not v for v in values):
                raise ConfigError(f"{key}: empty alternative in {text!r}")
            axes[key] = values
        else:
            fixed.append(item)
    plan = SweepPlan(recipe.name, preset, axes, fixed, list(range(seeds)))
    for _, overrides in plan.runs():  # every combination must be a valid config before anything runs
        apply_overrides(base, overrides)
    return plan


def _completed(run_dir: Path) -> bool:
    result = run_dir / "result.json"
    if not result.exists():
        return False
    try:
        return json.loads(result.read_text()).get("status") == "completed"
    except json.JSONDecodeError:
        return False


def run_sweep(
    plan: SweepPlan,
    out: Path,
    device: str = "auto",
    data_dir: Path | None = None,
    plot_metric: str | None = None,
) -> str:
    """Run every (grid point, seed) not yet completed under `out`, then write and return sweep.md (and, for
    one numeric axis, sweep.png: `plot_metric` — default the preset's target metric, else val/loss — against
    it, with the same metric before fine-tuning as a reference line where runs record `<metric>_before`)."""
    from llmlab.report import aggregate_runs, compare_runs

    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(dataclasses.asdict(plan), indent=2) + "\n")
    runs = plan.runs()
    failed = []
    for i, (name, overrides) in enumerate(runs, 1):
        run_dir = out / name
        if _completed(run_dir):
            print(f"[{i}/{len(runs)}] {name}: done already", flush=True)
            continue
        print(f"[{i}/{len(runs)}] {name}", flush=True)
        # One process per run: its peak memory and time are its own, and a crash does not end the sweep.
        cmd = [
            sys.executable,
            "-m",
            "llmlab",
            "run",
            plan.recipe,
            "--preset",
            plan.preset,
            "--out",
            str(run_dir),
            "--device",
            device,
            *overrides,
        ]
        if data_dir is not None:
            cmd += ["--data-dir", str(data_dir)]
        if (run_dir / "config.json").exists():  # a run the sweep started before: continue it
            cmd.append("--resume")
        code = subprocess.run(cmd).returncode
        if code != 0:  # e.g. diverged (recorded in its result.json): the sweep goes on
            failed.append(f"{name}: exit code {code}")
    dirs = [out / name for name, _ in runs if (out / name / "config.json").exists()]
    axes = ", ".join(f"{k} ∈ {{{', '.join(v)}}}" for k, v in plan.axes.items()) or "no axes"
    text = [
        f"# Sweep: {plan.recipe} --preset {plan.preset}",
        "",
        f"Grid: {axes}; seeds {plan.seeds}; fixed overrides: {' '.join(plan.fixed) or 'none'}.",
        "",
        "## Mean ± std over seeds",
        "",
        # grouped by the sweep's own axes: the runs of one grid point differ only in their seed, even where an
        # older run's config lacks a key added to llmlab since (a missing key would otherwise split them)
        aggregate_runs(dirs, group_by=list(plan.axes)) if len(dirs) > 1 else "(one run)",
        "",
        "## Every run",
        "",
        compare_runs(dirs),
    ]
    if len(plan.axes) == 1 and len(dirs) > 1:
        from llmlab.report.sweep_plot import SWEEP_PLOT, write_sweep_plot

        (axis,) = plan.axes
        target = get_recipe(plan.recipe).target(plan.preset)
        metric = plot_metric or (target.metric if target else "val/loss")
        title = f"{plan.recipe} --preset {plan.preset}, {len(plan.seeds)} seed(s) per point"
        png = write_sweep_plot(dirs, axis, metric, out / SWEEP_PLOT, [f"{metric}_before"], title)
        if png is not None:
            text += ["", f"![{metric} against {axis}]({SWEEP_PLOT})"]
    if failed:
        text += ["", "## Runs that failed", "", *[f"- {f}" for f in failed]]
    table = "\n".join(text) + "\n"
    (out / "sweep.md").write_text(table)
    return table
