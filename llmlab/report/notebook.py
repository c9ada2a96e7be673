"""A run's report inside a Jupyter / Colab notebook (notebooks/): report.md rendered inline with its figures.

IPython is imported when called, so llmlab does not depend on it outside notebooks.
"""

from __future__ import annotations

import re
from pathlib import Path

_FIGURE = re.compile(r"!\[[^\]]*\]\(([^)]+)\)")  # ![alt](file.png)


def report_parts(run_dir: Path | str, skip: tuple[str, ...] = ("Configuration", "Environment")) -> list:
    """report.md as [("markdown", text) | ("image", path), ...] in reading order, without the `skip`
    sections (the full configuration and environment tables stay in the file)."""
    run_dir = Path(run_dir)
    sections = (run_dir / "report.md").read_text(encoding="utf-8").split("\n## ")
    text = "\n## ".join(s for s in sections if not s.startswith(skip))
    parts = []
    for i, piece in enumerate(_FIGURE.split(text)):  # text, figure, text, figure, ...
        if i % 2:
            parts.append(("image", run_dir / piece))
        elif piece.strip():
            parts.append(("markdown", piece))
    return parts


def show_report(run_dir: Path | str) -> None:
    """Display RUN_DIR/report.md in the notebook, its figures embedded."""
    from IPython.display import Image, Markdown, display

    for kind, value in report_parts(run_dir):
        display(Image(filename=str(value)) if kind == "image" else Markdown(value))
