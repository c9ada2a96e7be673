"""Strip the notebooks of what running them adds, so that git holds only their cells.

What goes: every code cell's outputs and execution count; cell metadata except `tags` (Jupyter's
`execution` timings, `collapsed` / `scrolled`, Colab's ids); notebook metadata except the kernel spec and the
language name (widget state, Colab's and VS Code's settings, the Python version of the last run).

    python -m notebooks.strip_outputs                    # every notebook in notebooks/, in place
    python -m notebooks.strip_outputs A.ipynb B.ipynb    # these
    python -m notebooks.strip_outputs --check            # list those that are not stripped, exit 1 if any

(`python notebooks/strip_outputs.py ...` works too.) tests/test_notebooks.py checks every notebook with
`is_stripped`.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import nbformat

NOTEBOOKS = Path(__file__).resolve().parent
KEPT_CELL_METADATA = ("tags",)  # nbclient reads "raises-exception" / "skip-execution" tags


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Remove outputs, execution counts and run metadata from `nb`, in place; returns it."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        kept_cell = {k: v for k, v in cell.metadata.items() if k in KEPT_CELL_METADATA}
        cell.metadata = nbformat.from_dict(kept_cell)
    language = nb.metadata.get("language_info", {}).get("name", "python")
    kept = {"language_info": {"name": language}}
    if "kernelspec" in nb.metadata:
        kept["kernelspec"] = nb.metadata["kernelspec"]
    nb.metadata = nbformat.from_dict(kept)
    return nb


def is_stripped(nb: nbformat.NotebookNode) -> bool:
    return strip(copy.deepcopy(nb)) == nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: all in notebooks/)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if any is not stripped")
    args = parser.parse_args(argv)
    paths = args.paths or sorted(NOTEBOOKS.glob("*.ipynb"))
    unstripped = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if is_stripped(nb):
            continue
        unstripped.append(path)
        if not args.check:
            nbformat.write(strip(nb), path)
            print(f"stripped {path}")
    if args.check and unstripped:
        print("not stripped (run python -m notebooks.strip_outputs):", *unstripped, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
