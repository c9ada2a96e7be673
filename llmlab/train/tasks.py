"""Tasks tell the one Trainer how to turn a batch into a loss and into metrics.

A task's `step` returns the mean loss of a (micro-)batch, how many units it covered (samples or tokens), and
additive statistics (e.g. the number of correct predictions); the Trainer sums those over batches and
processes and asks the task to turn the totals into metrics. Later stages add language-model and seq2seq
tasks with the same three methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar: mean over this batch's units
    n: int  # units (samples or tokens) in this batch
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # additive statistics


class ClassificationTask:
    """Cross-entropy classification; `batch` is (*inputs, labels [B]) and the logits are `model(*inputs)`
    (e.g. (images, labels), or (tokens, lengths, labels) for text). Label smoothing applies in training
    only: validation and test losses are plain cross-entropy, comparable across runs. `tta_hflip` averages
    the evaluation logits of each image and its mirror image (images [B, C, H, W]; flip test-time
    augmentation, as in the fast CIFAR-10 training literature)."""

    unit = "samples"

    def __init__(self, label_smoothing: float = 0.0, tta_hflip: bool = False) -> None:
        self.label_smoothing = label_smoothing
        self.tta_hflip = tta_hflip

    def step(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> StepOutput:
        *inputs, y = batch
        logits = model(*inputs)  # [B, K]
        if self.tta_hflip and not model.training:
            (x,) = inputs  # images [B, C, H, W]
            logits = 0.5 * (logits + model(x.flip(-1)))  # [B, K]
        smoothing = self.label_smoothing if model.training else 0.0
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # the softmax in fp32 under autocast
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        return self._output(loss, logits, y)

    def manual_step(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], loss_scale: float
    ) -> StepOutput:
        """For models that compute their own gradients by hand (no autograd): forward + backward at once."""
        x, y = batch
        loss, logits = model.forward_backward(
            x, y, label_smoothing=self.label_smoothing, loss_scale=loss_scale
        )
        return self._output(loss, logits, y)

    @staticmethod
    def _output(loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> StepOutput:
        correct = (logits.detach().argmax(dim=-1) == y).sum().float()
        return StepOutput(loss=loss, n=y.shape[0], sums={"correct": correct})

    def metrics(self, loss_sum: float, n: float, sums: dict[str, float]) -> dict[str, float]:
        return {"loss": loss_sum / n, "accuracy": sums["correct"] / n}
