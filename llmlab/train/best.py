"""Model selection on a validation metric: keep the weights of the best evaluation, end the run with them.

`train.best_metric=val/accuracy` makes the Trainer remember, at every evaluation, whether this is the best
value of that metric so far (strictly better: on a tie the earlier weights stay). The best weights are written
to `checkpoints/best.safetensors` (atomically, with the step, the value and every evaluated split's metrics
in its metadata), and at the end of training the model is set back to them: the test split is evaluated on
them, once, and they are the run's saved model. Selecting on a validation split leaves the test split
untouched (the test split cannot be selected on).

This is early stopping in the sense of Prechelt (1998) and Goodfellow et al. (2016, §7.8) without cutting the
schedule short: Keras' `EarlyStopping(restore_best_weights=True)` and Hugging Face's
`TrainingArguments(load_best_model_at_end=True, metric_for_best_model=...)` do the same. A resumed run keeps
the best weights of the part of the run its checkpoint covers; a record from a later step (written after that
checkpoint, by a process that was then killed) is dropped, since those steps are trained again.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import torch

from llmlab.train.checkpoint import CheckpointError, load_weights, save_weights

# Metric names that are better when lower; any other metric (accuracy, bleu, token_accuracy) is maximised.
LOWER_IS_BETTER = ("loss", "ppl", "perplexity", "error", "loss_per_char")
FILE = "best.safetensors"


def metric_mode(metric: str, mode: Literal["auto", "max", "min"] = "auto") -> Literal["max", "min"]:
    """The direction in which `metric` ("split/name") improves: `mode`, or under "auto" min for losses and
    perplexities, max for everything else."""
    if mode in ("max", "min"):
        return mode
    if mode != "auto":
        raise ValueError(f"best_mode={mode!r}: auto, max or min")
    name = metric.partition("/")[2]
    return "min" if name in LOWER_IS_BETTER or name.endswith("loss") else "max"


class BestWeights:
    """The best evaluation so far of one metric and its weights (a file under `directory`, else in memory)."""

    def __init__(self, metric: str, mode: Literal["auto", "max", "min"], directory: Path | None) -> None:
        self.metric = metric
        self.split = metric.partition("/")[0]
        self.mode = metric_mode(metric, mode)
        self.path = directory / FILE if directory is not None else None
        self.step: int | None = None
        self.epoch: float | None = None
        self.value: float | None = None
        self.metrics: dict[str, float] = {}  # every evaluated split's metrics at that step ("split/name")
        self._state: dict[str, torch.Tensor] | None = None  # without a directory

    def value_of(self, metrics: dict[str, float]) -> float:
        """The selected metric among one evaluation's metrics ("split/name"); a clear error when absent."""
        if self.metric not in metrics:
            names = ", ".join(sorted(k for k in metrics if k.startswith(f"{self.split}/")))
            raise ValueError(f"train.best_metric={self.metric}: the {self.split} evaluation reports {names}")
        return float(metrics[self.metric])

    def improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.value is None:
            return True
        return value > self.value if self.mode == "max" else value < self.value

    def record(
        self,
        step: int,
        epoch: float,
        value: float,
        metrics: dict[str, float],
        weights: dict[str, torch.Tensor],
        write: bool,
    ) -> None:
        """Remember a new best. `write`: this process writes the file (rank 0; the others only remember)."""
        self.step, self.epoch, self.value, self.metrics = step, epoch, value, dict(metrics)
        if self.path is None:
            self._state = {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}
        elif write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            save_weights(self.path, weights, metadata=self._metadata())

    def _metadata(self) -> dict[str, str]:
        return {
            "metric": self.metric,
            "mode": self.mode,
            "step": str(self.step),
            "epoch": repr(self.epoch),
            "value": repr(self.value),
            "metrics": json.dumps(self.metrics),
        }

    def resume(self, step: int) -> None:
        """After a checkpoint of `step` was restored: take up the best record written up to that step."""
        self.step = self.epoch = self.value = None
        self.metrics = {}
        if self.path is None or not self.path.exists():
            return
        meta = _read_metadata(self.path)
        if meta.get("metric") != self.metric or meta.get("mode") != self.mode:
            return  # selected on another metric: start afresh (the file is replaced at the next best)
        try:
            best_step = int(meta["step"])
            if best_step > step:  # written after the checkpoint: those steps are trained again
                return
            self.step, self.epoch, self.value = best_step, float(meta["epoch"]), float(meta["value"])
            self.metrics = {k: float(v) for k, v in json.loads(meta["metrics"]).items()}
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise CheckpointError(
                f"{self.path} has unreadable metadata ({err}); delete it to select afresh from the resumed "
                "step"
            ) from err

    def weights(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The best weights on `device` (a CheckpointError if their file is gone or corrupt)."""
        if self.path is None:
            if self._state is None:
                raise RuntimeError("no best weights recorded")
            return {k: v.to(device) for k, v in self._state.items()}
        return load_weights(self.path, map_location=str(device))

    def final_metrics(self) -> dict[str, float]:
        """The selected model's metrics: every split evaluated at its step, and where it was."""
        return {**self.metrics, "best/step": float(self.step), "best/epoch": float(self.epoch)}


def _read_metadata(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{path} is corrupt or truncated ({err}); delete it to select afresh from the resumed step"
        ) from err
