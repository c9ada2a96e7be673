"""An attention heat-map as a PNG: rows are output tokens, columns input tokens, darker = more attention.

Drawn like curves.png, with matplotlib's object API on an Agg canvas (no display, no pyplot global state).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def write_heatmap(
    path: Path, weights: torch.Tensor, columns: Sequence[str], rows: Sequence[str], title: str = ""
) -> Path:
    """weights [len(rows), len(columns)] (each row a distribution) -> a PNG at `path`."""
    weights = weights.detach().float().cpu()
    if weights.shape != (len(rows), len(columns)):
        raise ValueError(
            f"weights {tuple(weights.shape)} do not match {len(rows)} rows x {len(columns)} columns"
        )
    cell = 0.38
    fig = Figure(figsize=(max(4.0, 1.8 + cell * len(columns)), max(3.0, 1.6 + cell * len(rows))), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(
        weights.numpy(), cmap="viridis", vmin=0.0, vmax=max(float(weights.max()), 1e-6), aspect="auto"
    )
    ax.set_xticks(
        range(len(columns)), [c.strip() or "·" for c in columns], rotation=60, ha="right", fontsize=8
    )
    ax.set_yticks(range(len(rows)), [r.strip() or "·" for r in rows], fontsize=8)
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path
