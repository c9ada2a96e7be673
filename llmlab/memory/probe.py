"""The hook a training loop calls to record, for one step of one rank, the measured memory beside the
prediction (llmlab/memory/predict.py, measure.py): `memory.json` and the report section
"Memory: predicted vs measured".

The loop's side is three calls (how llmlab's Trainer wires them):

    probe = MemoryProbe.for_trainer(trainer, step=0)    # or MemoryProbe(model, precision=..., ...)
    for i, micro in enumerate(micro_batches):            # train_step: the measured step's first micro-batch
        measure = i == 0 and probe.due(step)
        with no_sync(last), probe.activation_context(micro) if measure else nullcontext():
            out = task.step(model, micro)                # under autocast
            backward(out.loss * scale)
    strategy.step(...)                                   # the optimizer step
    if probe.due(step):
        probe.record_states(raw_model, strategy.optimizer)   # before the next zero_grad
    ...
    probe.finish(run_dir)                                # after training, before the report is written
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmlab.memory.measure import (
    MEMORY_FILE,
    SavedTensorMeter,
    cuda_peak_bytes,
    rss_peak_bytes,
    state_bytes,
    write_memory_record,
)
from llmlab.memory.predict import MemoryPrediction, StateLayout, layout_for, optimizer_kind, predict_for_model

__all__ = ["MemoryProbe"]


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)):
        for b in batch:
            t = _first_tensor(b)
            if t is not None:
                return t
    if isinstance(batch, dict):
        return _first_tensor(list(batch.values()))
    return None


class MemoryProbe:
    """Measures step `step` (0-based, the Trainer's `self.step` before it is incremented) of one rank."""

    def __init__(
        self,
        model: nn.Module,
        *,
        precision: str,
        device: torch.device | str = "cpu",
        strategy: str | StateLayout = "ddp",
        world_size: int = 1,
        rank: int = 0,
        step: int = 0,
    ) -> None:
        self.model = model
        self.precision = precision
        self.device = torch.device(device)
        self.strategy, self.world_size, self.rank, self.step = strategy, world_size, rank, step
        self.meter: SavedTensorMeter | None = None
        self.batch_shape: tuple[int, ...] | None = None
        self.states: dict[str, int] | None = None
        self.optimizer: Any = None
        self.cuda_peak: int | None = None

    @classmethod
    def for_trainer(cls, trainer: Any, step: int = 0) -> MemoryProbe:
        """A probe with everything read off a built llmlab Trainer (its raw model, resolved precision,
        device, train.strategy / ds_stage / offload, and process group)."""
        cfg = trainer.cfg
        layout = layout_for(cfg.strategy, getattr(cfg, "ds_stage", 2), getattr(cfg, "offload", "none"))
        return cls(
            trainer.raw_model, precision=trainer.precision, device=trainer.device, strategy=layout,
            world_size=trainer.dist.world_size, rank=trainer.dist.rank, step=step,
        )  # fmt: skip

    def due(self, step: int) -> bool:
        return step == self.step

    def activation_context(self, micro_batch: Any = None) -> SavedTensorMeter:
        """A context to wrap the forward and backward of the measured micro-batch; `micro_batch` (its first
        tensor is [b, s]) gives the shape the prediction uses."""
        t = _first_tensor(micro_batch)
        if t is not None:
            self.batch_shape = tuple(t.shape)
        self.meter = SavedTensorMeter(self.model.parameters())
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self.meter

    def record_states(
        self, model: nn.Module | None = None, optimizer: Any = None, states: dict[str, int] | None = None
    ) -> dict[str, int]:
        """Parameter, gradient and optimizer-state bytes now (call it after the optimizer step). `states`:
        counts an engine gives itself (DeepSpeed keeps its partitions outside the model and optimizer)."""
        self.optimizer = optimizer
        self.cuda_peak = cuda_peak_bytes(self.device)  # the measured step's peak (reset at its start)
        if states is None:
            sb = state_bytes(model if model is not None else self.model, optimizer)
            states = {"params": sb.params, "grads": sb.grads, "optimizer": sb.optimizer}
        self.states = dict(states)
        return self.states

    def measured(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.states or {})
        if self.meter is not None:
            out["activations"] = self.meter.peak_activations
            out["param_copies"] = self.meter.peak_param_copies
        out["rss_peak"] = rss_peak_bytes()
        recorded = self.states is not None
        out["cuda_max_allocated"] = self.cuda_peak if recorded else cuda_peak_bytes(self.device)
        if self.batch_shape is not None:
            out["micro_batch_shape"] = list(self.batch_shape)
        return out

    def predict(self) -> MemoryPrediction:
        """The prediction for this run, from the live model, the measured micro-batch's shape and the
        optimizer given to `record_states` (AdamW when none was)."""
        kind, momentum = optimizer_kind(self.optimizer) if self.optimizer is not None else ("adamw", 0.0)
        shape = self.batch_shape or (1, 1)
        b, s = (shape[0], shape[1]) if len(shape) >= 2 else (shape[0], 1)  # [b, s] token ids
        return predict_for_model(
            self.model, micro_batch=b, seq_len=s, precision=self.precision, device=str(self.device),
            strategy=self.strategy, ranks=self.world_size, rank=self.rank, optimizer=kind, momentum=momentum,
        )  # fmt: skip

    def finish(
        self, run_dir: Path | str, prediction: MemoryPrediction | None = None
    ) -> dict[str, Any] | None:
        """Write memory.json (rank 0; `memory-rank{r}.json` on the others, without a report section) and
        return its record; None, writing nothing, when the step was never measured (e.g. a resumed run)."""
        if self.states is None and self.meter is None:
            return None
        name = MEMORY_FILE if self.rank == 0 else f"memory-rank{self.rank}.json"
        return write_memory_record(
            run_dir, prediction or self.predict(), self.measured(), step=self.step, name=name,
            section=self.rank == 0,
        )  # fmt: skip
