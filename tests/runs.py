"""Helpers for tests that launch llmlab runs under torchrun and compare their records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from llmlab.train.callbacks import Callback


def torchrun(nproc: int = 2) -> list[str]:
    """The launcher's prefix: `python -m torch.distributed.run --standalone --nproc_per_node N`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def torchrun_llmlab(args: list[str], nproc: int = 2, timeout: float = 900) -> None:
    """`torchrun --standalone --nproc_per_node N -m llmlab ARGS` on gloo; fails the test with its stderr."""
    env = {**os.environ, "LLMLAB_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    cmd = [*torchrun(nproc), "-m", "llmlab", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]


def gpt_smoke_one_and_fsdp2(tmp_path: Path, args: list[str]) -> tuple[dict, dict, dict, dict, dict]:
    """`shakespeare-gpt --preset smoke ARGS` in this process and under FSDP2 on 2 processes (torchrun, gloo):
    (1-process result, 2-process result, their model.safetensors, the 2-process checkpoint of step 12)."""
    from llmlab.runner import run
    from llmlab.train.checkpoint import load_weights

    plain, out = tmp_path / "plain", tmp_path / "fsdp2"
    one = run("shakespeare-gpt", "smoke", args, out=plain, device="cpu")
    torchrun_llmlab(["run", "shakespeare-gpt", "--preset", "smoke", "--device", "cpu", *args,
                     "train.strategy=fsdp2", "--out", str(out)])  # fmt: skip
    two = json.loads((out / "result.json").read_text())
    a, b = load_weights(plain / "model.safetensors"), load_weights(out / "model.safetensors")
    return one, two, a, b, load_weights(out / "checkpoints" / "step_00000012" / "model.safetensors")


def train_rows(run_dir: Path) -> list[dict]:
    """The run's train-split rows of metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def relative_diff(a: dict, b: dict) -> float:
    """‖a − b‖ / ‖a‖ over all tensors of two state dicts with the same keys."""
    diff = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5
    return diff / sum(float((a[k] ** 2).sum()) for k in a) ** 0.5


class ScaleGradients(Callback):
    """Injects the bug a "2 processes == 1" test must catch: every gradient is `factor` x the global batch's
    mean when the optimizer steps (before clipping) — where an all-reduce that sums instead of averaging, or
    a missing 1/grad_accum, leaves it. A guard test shows the comparison fails on such a run."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def on_train_start(self, trainer) -> None:
        step = trainer.strategy.step

        def scaled_step(scaler, max_norm):
            with torch.no_grad():
                for p in trainer.raw_model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(self.factor)
            return step(scaler, max_norm)

        trainer.strategy.step = scaled_step
