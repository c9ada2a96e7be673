"""sweep.png: a metric's mean ± std over seeds against the one numeric axis of a sweep (e.g. val loss vs LoRA
rank), with each run's value as a faint dot; a horizontal reference line per extra metric asked for (e.g.
the loss before fine-tuning, the same in every run). Matplotlib's object API on an Agg canvas, as curves.py.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from llmlab.report.run import RunRecord, as_run, is_finite_number

SWEEP_PLOT = "sweep.png"


def _number(value: object) -> float | None:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def write_sweep_plot(
    runs: Sequence[RunRecord | str | Path],
    axis: str,
    metric: str,
    out: Path,
    references: Sequence[str] = (),
    title: str = "",
    lines: dict[str, float] | None = None,
) -> Path | None:
    """Draw `metric` against config key `axis` over `runs` into `out`; None (no file) when fewer than two
    axis values carry the metric, or an axis value is not a number. `references`: metrics of the same runs
    drawn as horizontal lines (their mean); `lines`: more horizontal lines, {label: value} (e.g. another
    method's result)."""
    points: dict[float, list[float]] = {}
    refs: dict[str, list[float]] = {r: [] for r in references}
    for run in runs:
        record = as_run(run)
        x = _number(record.flat_config().get(axis))
        metrics = record.final_metrics()
        y = metrics.get(metric)
        if x is None:
            return None
        if is_finite_number(y):
            points.setdefault(x, []).append(float(y))
        for r in references:
            if is_finite_number(metrics.get(r)):
                refs[r].append(float(metrics[r]))
    if len(points) < 2:
        return None
    xs = sorted(points)
    means = [statistics.fmean(points[x]) for x in xs]
    stds = [statistics.stdev(points[x]) if len(points[x]) > 1 else 0.0 for x in xs]
    fig = Figure(figsize=(6.0, 4.0), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for x in xs:
        ax.scatter([x] * len(points[x]), points[x], color="tab:blue", alpha=0.3, s=12)
    ax.errorbar(xs, means, yerr=stds, color="tab:blue", marker="o", capsize=3, label=f"{metric} (mean ± std)")
    levels = {name: statistics.fmean(values) for name, values in refs.items() if values} | (lines or {})
    colors = ("tab:gray", "tab:red", "tab:green", "tab:purple", "tab:brown")
    for (name, value), color in zip(levels.items(), colors, strict=False):
        ax.axhline(value, color=color, linestyle="--", label=name)
    if xs[0] > 0 and xs[-1] / xs[0] >= 8:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel(axis)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.savefig(out)
    return out
