"""Weight averaging: end a run with an average of the weights it passed through, not its last step's.

`train.weight_average=ema` keeps an exponential moving average of the weights, updated after every
`train.average_every`-th optimizer step from `train.average_start` (a fraction of the run) on:

    W_avg ← W                                        at the first update
    W_avg ← decay · W_avg + (1 − decay) · W           after that (decay = train.ema_decay)

`train.weight_average=swa` keeps their plain mean instead (stochastic weight averaging, Izmailov et al. 2018;
Polyak & Juditsky 1992 for the averaged iterates of SGD; Merity et al. 2018 train AWD-LSTM with their
non-monotonically triggered variant):

    W_avg ← W_avg + (W − W_avg) / (n + 1)            n = how many weights are averaged so far

Every floating tensor of the model's state dict is averaged (parameters and floating buffers such as a
BatchNorm's running statistics, as `AveragedModel(use_buffers=True)`); integer buffers (counters) take the
last step's value. The averages are kept in float32 whatever the training precision, one full copy of the
model on every process; they come from `strategy.model_state_dict()`, so every strategy averages the same
full weights (under ZeRO-3 / FSDP2 / DeepSpeed-3 each update gathers them: prefer average_every > 1 there).

The average is part of every checkpoint (the `average` entry of its state: the settings, n and the float32
tensors), so `--resume` continues it exactly. At the end of training the model is set to the average: the
validation splits are evaluated again on it (the run's val metrics are the averaged model's), the test split
is evaluated on it, once, and it is the saved model. The twin: `torch.optim.swa_utils.AveragedModel(model,
use_buffers=True)` with `multi_avg_fn=get_ema_multi_avg_fn(decay)` for ema and the default (equal weights)
for swa — tests/train/test_averaging.py checks the two agree over a training run.
"""

from __future__ import annotations

import math
from typing import Literal

import torch


def first_update_step(start: float, total_steps: int) -> int:
    """The first step (1-based, counted after its optimizer update) that enters the average."""
    return max(1, math.ceil(start * total_steps))


class WeightAverage:
    """The running average of a model's full state dict (see the module docstring)."""

    def __init__(self, kind: Literal["ema", "swa"], decay: float, start_step: int, every: int) -> None:
        if kind not in ("ema", "swa"):
            raise ValueError(f"weight_average={kind!r}: ema or swa")
        self.kind = kind
        self.decay = decay
        self.start_step = start_step
        self.every = every
        self.n = 0  # weights averaged so far
        self.weights: dict[str, torch.Tensor] = {}  # float32 averages, integer tensors as last seen

    def due(self, step: int) -> bool:
        """Whether the weights after optimizer step `step` (1-based) enter the average."""
        return step >= self.start_step and (step - self.start_step) % self.every == 0

    @torch.no_grad()
    def update(self, state: dict[str, torch.Tensor]) -> None:
        """Fold one full state dict (the model's weights after an optimizer step) into the average."""
        if self.n == 0:
            self.weights = {
                k: v.detach().to(torch.float32, copy=True) if v.is_floating_point() else v.detach().clone()
                for k, v in state.items()
            }
        else:
            if state.keys() != self.weights.keys():
                raise ValueError("the model's state dict changed its keys during training")
            weight = 1.0 - self.decay if self.kind == "ema" else 1.0 / (self.n + 1)
            for k, v in state.items():
                avg = self.weights[k]
                if avg.is_floating_point():
                    avg.lerp_(v.detach().to(avg.device, torch.float32), weight)  # avg + w·(v − avg)
                else:
                    avg.copy_(v)
        self.n += 1

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "decay": self.decay,
            "start_step": self.start_step,
            "every": self.every,
            "n": self.n,
            "weights": dict(self.weights),
        }

    def load_state_dict(self, state: dict) -> None:
        """Take up a checkpoint's average; it must have been made with the same settings."""
        mine = (self.kind, self.decay, self.start_step, self.every)
        theirs = (state["kind"], state["decay"], state["start_step"], state["every"])
        if mine != theirs:
            raise ValueError(
                "the checkpoint's weight average was made with (weight_average, ema_decay, first step, "
                f"average_every) = {theirs}, this run's is {mine}"
            )
        self.n = int(state["n"])
        self.weights = {k: v.detach().clone() for k, v in state["weights"].items()}
