"""Callbacks: the few events of the Trainer, and the loggers every run uses.

Events: on_train_start, on_step_end (after each optimizer step), on_log (a train or eval record),
on_checkpoint, on_train_end. A callback may set `trainer.should_stop = True`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from llmlab.progress import progress_enabled


class Trainer(Protocol):
    """What a callback sees of the Trainer (llmlab/train/trainer.py). Callbacks sit below the Trainer that
    calls them, so they name this protocol, not the class: every import points down."""

    name: str
    step: int
    total_steps: int
    should_stop: bool
    task: Any
    train_loader: Any
    tensorboard: Any


class Callback:
    def on_train_start(self, trainer: Trainer) -> None: ...
    def on_step_end(self, trainer: Trainer, loss: float) -> None: ...
    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None: ...
    def on_checkpoint(self, trainer: Trainer, path: Path) -> None: ...
    def on_train_end(self, trainer: Trainer) -> None: ...


class MetricsFile(Callback):
    """metrics.jsonl: one JSON line per record. On resume, lines after the checkpoint's step (written by the
    killed process after its last checkpoint) are dropped, so the file reads as one uninterrupted run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = None

    def on_train_start(self, trainer: Trainer) -> None:
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if rec.get("step", 0) <= trainer.step:
                    kept.append(line)
            self.path.write_text("".join(k + "\n" for k in kept))
        self._file = open(self.path, "a")

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def on_train_end(self, trainer: Trainer) -> None:
        if self._file:
            self._file.close()
            self._file = None


class TensorBoard(Callback):
    """Scalars under tb/ as `split/metric`; a resumed run purges events after its checkpoint's step."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.writer = None

    def on_train_start(self, trainer: Trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.log_dir), purge_step=trainer.step + 1 if trainer.step else None)
        trainer.tensorboard = self.writer  # for callbacks that log more than scalars (images, histograms)

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        split = record["split"]
        for key, value in record.items():
            if key in ("step", "split") or not isinstance(value, (int, float)):
                continue
            self.writer.add_scalar(f"{split}/{key}", value, record["step"])
        self.writer.flush()

    def on_train_end(self, trainer: Trainer) -> None:
        if self.writer:
            self.writer.close()
            self.writer = None


class ProgressBar(Callback):
    """A tqdm bar (on a terminal; LLMLAB_PROGRESS=1/0 forces it) and one printed line per evaluation. Without
    the bar (logs, CI), a train line is printed at most every `quiet_interval_s` so long epochs show life."""

    def __init__(self, quiet_interval_s: float = 30.0) -> None:
        self.bar = None
        self.last_train: dict[str, Any] = {}
        self.quiet_interval_s = quiet_interval_s
        self._last_print = time.monotonic()

    def on_train_start(self, trainer: Trainer) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=trainer.total_steps,
            initial=trainer.step,
            unit="step",
            dynamic_ncols=True,
            disable=not progress_enabled(),
            desc=trainer.name,
        )

    def on_step_end(self, trainer: Trainer, loss: float) -> None:
        self.bar.update(1)

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if record["split"] == "train":
            self.last_train = record
            unit = trainer.task.unit
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", **{f"{unit}/s": f"{record['throughput']:.0f}"})
            if self.bar.disable and time.monotonic() - self._last_print >= self.quiet_interval_s:
                self._print(
                    f"step {record['step']}/{trainer.total_steps} | epoch {record['epoch']:.2f} | train "
                    f"{_fmt(record)} | {record['throughput']:.0f} {unit}/s"
                )
            return
        parts = [f"step {record['step']}/{trainer.total_steps}", f"epoch {record['epoch']:.2f}"]
        if self.last_train:
            parts.append("train " + _fmt(self.last_train))
        parts.append(f"{record['split']} " + _fmt(record))
        self._print(" | ".join(parts))

    def _print(self, line: str) -> None:
        self.bar.write(line, file=sys.stderr)
        self._last_print = time.monotonic()

    def on_train_end(self, trainer: Trainer) -> None:
        if self.bar:
            self.bar.close()


def _fmt(record: dict[str, Any]) -> str:
    skip = {"step", "epoch", "split", "time_s", "lr", "throughput"}
    out = []
    for key, value in record.items():
        if key in skip or not isinstance(value, float):
            continue
        out.append(f"{key} {value:.2%}" if key == "accuracy" else f"{key} {value:.4f}")
    return " ".join(out)


class AugmentedImages(Callback):
    """TensorBoard image grid of the first training batch, as the model sees it after augmentation (so one
    can check crops and flips by eye). `mean`/`std` undo the normalisation for display. Needs the
    TensorBoard callback earlier in the list."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], count: int = 32) -> None:
        self.mean, self.std, self.count = mean, std, count

    def on_train_start(self, trainer: Trainer) -> None:
        writer = getattr(trainer, "tensorboard", None)
        if writer is None or trainer.step > 0:
            return
        import torch

        trainer.train_loader.set_epoch(0)
        images = next(iter(trainer.train_loader))[0][: self.count].detach().float().cpu()  # [N, C, H, W]
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        writer.add_images("train/augmented_batch", (images * std + mean).clamp(0, 1), 0)
        writer.flush()
