"""parallel.png: where the time of a tensor-parallel training step goes — compute, TP collectives, DP
all-reduce — per logged interval, stacked, beside the communication share; from the train lines of
metrics.jsonl (llmlab/train/strategy_tp.py). Matplotlib's object API on an Agg canvas, as curves.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_comm_compute(rows: Sequence[dict[str, Any]], out: Path) -> Path:
    """Stacked ms per step (compute, TP, DP) against the step, and the communication share."""
    steps = [r["step"] for r in rows]
    compute = [1e3 * r.get("compute_s", 0.0) for r in rows]  # ms
    tp = [1e3 * r.get("comm_tp_s", 0.0) for r in rows]
    dp = [1e3 * r.get("comm_dp_s", 0.0) for r in rows]
    fig = Figure(figsize=(10, 3.8))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    left.stackplot(steps, compute, tp, dp, labels=["compute", "TP collectives", "DP all-reduce"],
                   colors=["#4c72b0", "#dd8452", "#55a868"])  # fmt: skip
    left.set_xlabel("step")
    left.set_ylabel("ms per step")
    left.set_title("time per training step")
    left.legend(loc="best", fontsize=8, framealpha=0.8)
    right.plot(steps, [100 * r.get("comm_share", 0.0) for r in rows], marker="o", color="#c44e52")
    right.set_ylim(0, 100)
    right.set_xlabel("step")
    right.set_ylabel("% of the step")
    right.set_title("communication share")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    return out
