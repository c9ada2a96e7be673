"""Training curves of a run as curves.png: loss, every other logged metric, and the learning rate.

Drawn with matplotlib's object API on an Agg canvas, so it never needs a display and never touches pyplot's
global state (safe inside a training process or a notebook).
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from llmlab.report.run import RunRecord, as_run, is_fraction_metric, metric_names, series

CURVES_FILE = "curves.png"
SPLIT_STYLE = {
    "train": {"color": "tab:blue", "label": "train"},
    "val": {"color": "tab:orange", "label": "val"},
    "test": {"color": "tab:red", "label": "test"},
}
SMOOTH_ABOVE = 50  # train series longer than this also get a smoothed line over the faint raw one
PANEL_SIZE = (5.0, 3.6)  # inches per panel
DPI = 120


def write_curves(run: RunRecord | str | Path) -> Path | None:
    """Write curves.png into the run directory; None (and no file) when nothing has been logged yet."""
    record = as_run(run)
    panels = _panels(record)
    if not panels:
        return None
    ncols = 1 if len(panels) == 1 else 2 if len(panels) in (2, 4) else 3
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(PANEL_SIZE[0] * ncols, PANEL_SIZE[1] * nrows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, key in zip(axes, panels, strict=False):
        _draw_panel(ax, record, key)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(_figure_title(record), fontsize="large")
    out = record.path / CURVES_FILE
    fig.savefig(out, dpi=DPI)
    return out


def _panels(record: RunRecord) -> list[str]:
    """Panel keys in display order: loss, the other metrics as first logged, then lr; only those with data."""
    names = metric_names(record.metrics)
    ordered = (["loss"] if "loss" in names else []) + [n for n in names if n != "loss"]
    if any(_finite(series(record.metrics, "train", "lr")[1])):
        ordered.append("lr")
    return [key for key in ordered if _has_points(record, key)]


def _has_points(record: RunRecord, key: str) -> bool:
    return any(_finite(series(record.metrics, split, key)[1]) for split in SPLIT_STYLE)


def _draw_panel(ax: Axes, record: RunRecord, key: str) -> None:
    all_values: list[float] = []
    for split in SPLIT_STYLE:
        steps, values = _finite_series(record, split, key)
        if not steps:
            continue
        all_values += values
        if split == "train":
            _draw_train(ax, steps, values, smooth=key != "lr")
        elif split == "val":
            ax.plot(steps, values, marker="o", markersize=3, linewidth=1.5, **SPLIT_STYLE["val"])
        else:
            _draw_test(ax, steps, values, percent=is_fraction_metric(key, values))
    percent = key != "lr" and is_fraction_metric(key, all_values)
    if percent:
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    if key == "loss" and _spans_decades(all_values):
        ax.set_yscale("log")
    if key == "lr":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set_title("learning rate" if key == "lr" else key.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")


def _draw_train(ax: Axes, steps: list[float], values: list[float], smooth: bool) -> None:
    style = SPLIT_STYLE["train"]
    if not smooth or len(values) <= SMOOTH_ABOVE:
        ax.plot(steps, values, linewidth=1.2, **style)
        return
    ax.plot(steps, values, linewidth=0.8, alpha=0.3, color=style["color"])
    ax.plot(steps, _ema(values), linewidth=1.5, color=style["color"], label="train (smoothed)")


def _draw_test(ax: Axes, steps: list[float], values: list[float], percent: bool) -> None:
    """Test is evaluated once (or rarely): a marked point, its final value in the legend."""
    text = f"{values[-1]:.2%}" if percent else f"{values[-1]:.4g}"
    color = SPLIT_STYLE["test"]["color"]
    ax.scatter(steps, values, marker="*", s=140, zorder=5, color=color, label=f"test ({text})")


def _finite_series(record: RunRecord, split: str, key: str) -> tuple[list[float], list[float]]:
    steps, values = series(record.metrics, split, key)
    kept = [(s, v) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
    return [s for s, _ in kept], [v for _, v in kept]


def _ema(values: list[float]) -> list[float]:
    """Bias-corrected exponential moving average with a window of about 1/50 of the series."""
    beta = 1.0 - 1.0 / max(2.0, len(values) / 50)
    smoothed, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1.0 - beta) * v
        smoothed.append(avg / (1.0 - beta**i))
    return smoothed


def _spans_decades(values: list[float]) -> bool:
    """Log scale reads better once positive values span more than ~1.5 decades."""
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) > 1 and max(positive) / min(positive) > 30


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _figure_title(record: RunRecord) -> str:
    recipe = record.recipe or "run"
    preset = f" · {record.preset}" if record.preset else ""
    return f"{recipe}{preset} — {record.name}"
