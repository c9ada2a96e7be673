"""The notebooks (notebooks/*.ipynb, one per stage): each runs top to bottom, and each is stored stripped.

test_notebook_runs executes one notebook with nbclient in the `python3` kernel of this environment (the
venv's ipykernel), in a temporary working directory, so the runs it trains land there and not in the
repository. The kernel inherits the environment: LLMLAB_DATA (real data where a notebook finds it, the
recipes' synthetic data otherwise) and the suite's LLMLAB_CACHE; plus one intra-op thread per process
(OMP_NUM_THREADS=1: on 2 shared cores more threads only contend, as in the suite's subprocess tests) and no
progress bars. A cell that raises fails the test with that cell's source and traceback. Every training in
the notebooks is at smoke size: seconds each, about 10-35 s per notebook with the kernel's start and imports.

test_notebooks_are_stripped keeps outputs, execution counts and widget state out of git; after editing a
notebook, strip it with `python -m notebooks.strip_outputs`.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from notebooks.strip_outputs import is_stripped

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # IPython colours its tracebacks
CELL_TIMEOUT_S = 300


def test_one_notebook_per_stage():
    assert [p.name[:3] for p in NOTEBOOKS] == [f"{stage:02d}-" for stage in range(1, 9)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_are_stripped(path):
    assert is_stripped(nbformat.read(path, as_version=4)), (
        f"{path.name} holds outputs or run metadata: python -m notebooks.strip_outputs"
    )


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LLMLAB_PROGRESS", "0")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, kernel_name="python3", timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(tmp_path)}}
    )
    try:
        client.execute()
    except CellExecutionError as err:
        pytest.fail(f"{path.name}: a cell raised\n{ANSI.sub('', str(err))}", pytrace=False)
