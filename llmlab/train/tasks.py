"""Tasks tell the one Trainer how to turn a batch into a loss and into metrics.

A task's `step` returns the mean loss of a (micro-)batch, how many units it covered (samples or tokens), and
additive statistics (e.g. the number of correct predictions); the Trainer sums those over batches and
processes and asks the task to turn the totals into metrics. A task whose unit is not the sample (tokens) also
has `units(batch)`, so the Trainer can weight micro-batches and processes by it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.nn.losses import label_smoothed_nll


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


class Seq2SeqTask:
    """Teacher-forced next-token loss of a sequence-to-sequence model (llmlab.models.transformer).

    A batch is (src [B, S], tgt [B, T], ids [B]), tgt = (BOS, y_1, ..., y_n, EOS, PAD, ...): the model reads
    tgt[:, :-1] and predicts tgt[:, 1:]. The loss is the label-smoothed cross-entropy per real target token
    (llmlab/nn/losses.py; smoothing in training only, so validation and test losses are plain NLL); the unit
    is target tokens — what the Trainer weights micro-batches and processes by, and what throughput counts.
    Metrics: loss, ppl (exp of the plain NLL per token, also in training), token_accuracy, and, in evaluation
    with a `scorer` (model, src, ids) -> BLEU statistics (llmlab/train/bleu.py), the corpus BLEU of the
    batches' translations: its statistics are sums, so they add up over batches and processes."""

    unit = "tokens"

    def __init__(
        self,
        pad_id: int,
        label_smoothing: float = 0.0,
        scorer: Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, float]] | None = None,
    ) -> None:
        if not 0 <= label_smoothing < 1:
            raise ValueError("label_smoothing must be in [0, 1)")
        self.pad_id = pad_id
        self.label_smoothing = label_smoothing
        self.scorer = scorer

    def units(self, batch: tuple[torch.Tensor, ...]) -> int:
        """Real target tokens the batch predicts (EOS included, BOS and padding not)."""
        return int(batch[1][:, 1:].ne(self.pad_id).sum())

    def step(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> StepOutput:
        src, tgt = batch[0], batch[1]
        tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]  # [B, T-1] each
        logits = model(src, tgt_in)  # [B, T-1, V]
        smoothing = self.label_smoothing if model.training else 0.0
        loss_sum, nll_sum, n = label_smoothed_nll(logits, tgt_out, smoothing, self.pad_id)
        real = tgt_out.ne(self.pad_id)  # [B, T-1]
        correct = (logits.detach().argmax(dim=-1).eq(tgt_out) & real).sum()
        count = int(n)
        sums = {"nll": nll_sum.detach(), "correct": correct.float()}
        if self.scorer is not None and not model.training:
            sums.update(
                {
                    k: torch.tensor(v, dtype=torch.float64)
                    for k, v in self.scorer(model, src, batch[2]).items()
                }
            )
        return StepOutput(loss=loss_sum / max(count, 1), n=count, sums=sums)

    def metrics(self, loss_sum: float, n: float, sums: dict[str, float]) -> dict[str, float]:
        from llmlab.train.bleu import STAT_KEYS, bleu_from_stats

        n = max(n, 1.0)
        out = {
            "loss": loss_sum / n,
            "ppl": math.exp(min(sums["nll"] / n, 50.0)),  # capped: exp(50) already says "untrained"
            "token_accuracy": sums["correct"] / n,
        }
        if all(k in sums for k in STAT_KEYS):
            out["bleu"] = bleu_from_stats(sums)
        return out


class CausalLMTask:
    """Next-token prediction for a decoder-only language model (llmlab.models.gpt): a batch is (x [B, T],
    y [B, T]) with y the next token of each position of x; the loss is the mean cross-entropy over all B·T
    positions and the unit is tokens. Metrics: loss (nats per token), ppl, token_accuracy, and, given how
    many characters a token holds on average, loss_per_char (nats per character): what compares runs with
    different tokenizers (a token of a 50k BPE holds more text than a character of a char-level model)."""

    unit = "tokens"

    def __init__(self, chars_per_token: float | None = None) -> None:
        self.chars_per_token = chars_per_token

    def units(self, batch: tuple[torch.Tensor, ...]) -> int:
        return int(batch[1].numel())

    def step(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> StepOutput:
        x, y = batch[0], batch[1]
        logits = model(x)  # [B, T, V]
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # the softmax in fp32 under autocast
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        correct = logits.detach().argmax(dim=-1).eq(y).sum().float()
        return StepOutput(loss=loss, n=y.numel(), sums={"correct": correct})

    def metrics(self, loss_sum: float, n: float, sums: dict[str, float]) -> dict[str, float]:
        loss = loss_sum / max(n, 1.0)
        out = {
            "loss": loss,
            "ppl": math.exp(min(loss, 50.0)),
            "token_accuracy": sums["correct"] / max(n, 1.0),
        }
        if self.chars_per_token:
            out["loss_per_char"] = loss / self.chars_per_token
        return out
