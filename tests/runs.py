"""Helpers for tests that launch llmlab runs under torchrun and compare their records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def torchrun(nproc: int = 2) -> list[str]:
    """The launcher's prefix: `python -m torch.distributed.run --standalone --nproc_per_node N`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def torchrun_llmlab(args: list[str], nproc: int = 2, timeout: float = 900) -> None:
    """`torchrun --standalone --nproc_per_node N -m llmlab ARGS` on gloo; fails the test with its stderr."""
    env = {**os.environ, "LLMLAB_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    cmd = [*torchrun(nproc), "-m", "llmlab", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]


def train_rows(run_dir: Path) -> list[dict]:
    """The run's train-split rows of metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def relative_diff(a: dict, b: dict) -> float:
    """‖a − b‖ / ‖a‖ over all tensors of two state dicts with the same keys."""
    diff = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5
    return diff / sum(float((a[k] ** 2).sum()) for k in a) ** 0.5
