"""Typed configs of the training engine: the loop, the optimizer and the learning-rate schedule.

Recipes compose these with their model and data configs into one run config (see llmlab/recipes/).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class TrainConfig:
    """The loop. `batch_size` is the GLOBAL batch of one optimizer step: summed over processes and
    micro-batches, so a run gives the same updates under 1 or N processes (per process: batch_size / N,
    split into grad_accum micro-batches)."""

    batch_size: int = 128
    # What batch_size counts: samples, or tokens (padded source/target slots, as fairseq's --max-tokens) for
    # recipes that batch variable-length pairs by length; each recipe says which it supports.
    batch_unit: Literal["samples", "tokens"] = "samples"
    grad_accum: int = 1
    max_epochs: float | None = 1.0
    max_steps: int | None = None  # when set, wins over max_epochs
    max_time_s: float | None = (
        None  # stop early after this much training time (the schedule is not shortened)
    )
    grad_clip: float | None = None  # max global L2 norm of the gradients
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 (or fp16) on CUDA, fp32 on CPU
    eval_every: int = 0  # steps between evaluations; 0 = at the end of each epoch
    eval_batch_size: int | None = None  # default: batch_size (same unit)
    log_every: int = 50  # steps between train-metric log lines
    checkpoint_every: int = 0  # steps between checkpoints; 0 = at the end of each epoch; <0 = never
    keep_checkpoints: int = 2
    deterministic: bool = False  # torch.use_deterministic_algorithms + no cuDNN autotuning
    compile: bool = False  # torch.compile the training forward (checkpoints keep the plain module's names)
    # Recompute each block's activations in backward instead of storing them (models that support it: GPT)
    activation_checkpointing: bool = False
    # How processes share the work (llmlab/train/strategy.py): ddp; our ZeRO stage 1/2/3 (llmlab/parallel);
    # PyTorch's FSDP2 (fully_shard per block); DeepSpeed (stage `ds_stage`, offload `offload`)
    strategy: Literal["ddp", "zero1", "zero2", "zero3", "fsdp2", "deepspeed", "accelerate"] = "ddp"
    ds_stage: int = 2  # strategy=deepspeed: ZeRO stage 0 (plain data parallel), 1, 2 or 3
    # strategy=deepspeed: move optimizer states (and, at stage 3, parameters too: "all") to CPU memory
    offload: Literal["none", "optimizer", "all"] = "none"
    # Seconds a collective waits for the other processes before the run fails with a clear error (a peer
    # that died or hangs); must exceed the longest stretch one process works alone (rank 0 writing a
    # checkpoint). torch's own default is 30 min (gloo) / 10 min (NCCL).
    dist_timeout_s: float = 600.0
    # Model selection (llmlab/train/best.py): end the run with the weights of the evaluation with the best
    # value of this validation metric ("val/accuracy", "val/loss", "val/bleu"), kept in
    # checkpoints/best.safetensors; the test split is evaluated on them and they are the saved model.
    # None: the last weights.
    best_metric: str | None = None
    best_mode: Literal["auto", "max", "min"] = "auto"  # auto: min for losses and perplexities, else max
    # Weight averaging (llmlab/train/averaging.py): end the run with an exponential moving average ("ema") or
    # the plain mean ("swa") of the weights after every `average_every`-th step from `average_start` (a
    # fraction of the run's steps) on; the val splits are evaluated again on it, the test split on it only,
    # and it is the saved model. "none": the last weights.
    weight_average: Literal["none", "ema", "swa"] = "none"
    ema_decay: float = 0.999
    average_start: float = 0.0
    average_every: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")
        if self.batch_unit == "samples" and self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}")
        if self.max_steps is None and self.max_epochs is None:
            raise ValueError("set max_steps or max_epochs")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        if self.max_epochs is not None and self.max_epochs <= 0:
            raise ValueError("max_epochs must be > 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError("grad_clip must be > 0 (or none)")
        if self.log_every < 1:
            raise ValueError("log_every must be >= 1")
        if self.eval_every < 0:
            raise ValueError("eval_every must be >= 0")
        if self.keep_checkpoints < 1:
            raise ValueError("keep_checkpoints must be >= 1")
        if not self.dist_timeout_s > 0:
            raise ValueError(f"dist_timeout_s={self.dist_timeout_s}: must be > 0 seconds")
        if self.best_mode not in ("auto", "max", "min"):
            raise ValueError(f"best_mode={self.best_mode!r}: auto, max or min")
        if self.weight_average not in ("none", "ema", "swa"):
            raise ValueError(f"weight_average={self.weight_average!r}: none, ema or swa")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay}: must be in (0, 1), e.g. 0.999")
        if not 0.0 <= self.average_start < 1.0:
            raise ValueError(f"average_start={self.average_start}: a fraction of the run's steps in [0, 1)")
        if self.average_every < 1:
            raise ValueError(f"average_every={self.average_every}: must be >= 1")
        if self.weight_average != "none" and self.best_metric is not None:
            raise ValueError(
                f"weight_average={self.weight_average} and best_metric={self.best_metric}: choose one way to "
                "pick the final weights (an average of many steps, or the best evaluated step)"
            )
        if self.best_metric is not None:
            split, _, name = self.best_metric.partition("/")
            if not split or not name or "/" in name:
                raise ValueError(
                    f"best_metric={self.best_metric!r}: a validation metric as split/name, e.g. val/accuracy"
                )
            if split in ("train", "test"):
                raise ValueError(
                    f"best_metric={self.best_metric!r}: select on a validation split (e.g. val/{name}); "
                    + (
                        "the test split is evaluated once, on the selected model"
                        if split == "test"
                        else "training metrics are not evaluations"
                    )
                )
        if self.ds_stage not in (0, 1, 2, 3):
            raise ValueError(f"ds_stage={self.ds_stage}: DeepSpeed ZeRO stages are 0, 1, 2 and 3")


@dataclass
class OptimConfig:
    """`manual_sgd` is the hand-written SGD of llmlab.nn.manual (same update as `sgd`)."""

    name: Literal["sgd", "manual_sgd", "adamw", "adam"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    decay_norm_and_bias: bool = False  # False: no weight decay on 1-D parameters (biases, norm scales)
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    betas: tuple[float, float] = (0.9, 0.999)  # adam(w)
    eps: float = 1e-8  # adam(w)
    # adam(w): torch's implementation. auto = fused (one kernel per tensor; on this CPU 3.7x faster than the
    # for-loop torch picks by default off CUDA) where every parameter allows it, else torch's default
    impl: Literal["auto", "for-loop", "foreach", "fused"] = "auto"

    def __post_init__(self) -> None:
        if self.impl not in ("auto", "for-loop", "foreach", "fused"):
            raise ValueError(f"impl={self.impl!r}: auto, for-loop, foreach or fused")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if self.weight_decay < 0:
            raise ValueError("weight_decay must be >= 0")
        if not 0 <= self.momentum < 1:
            raise ValueError("momentum must be in [0, 1)")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")


@dataclass
class ScheduleConfig:
    """Learning-rate multiplier over the run's optimizer steps.

    constant / cosine / linear: linear warmup from `start_ratio` to 1, then hold / cosine / linear decay to
    `min_lr_ratio`. onecycle: Smith & Topin (2017) as torch.optim.lr_scheduler.OneCycleLR with cosine
    annealing: cosine ramp from `start_ratio` to 1 over the warmup, cosine down to `min_lr_ratio`.
    noam: the Transformer paper's schedule (Vaswani et al. 2017, §5.3), lr = d_model^-0.5 · min(s^-0.5,
    s · warmup^-1.5) at step s = 1, 2, ...: a linear rise for `warmup` steps, then decay ∝ 1/√s. As a
    multiplier of optim.lr that peaks at 1, min(s / warmup, √(warmup / s)), so optim.lr is the peak rate:
    optim.lr = d_model^-0.5 · warmup^-0.5 reproduces the paper exactly (7.0e-4 for d 512, warmup 4000).
    Warmup length: max(warmup_steps, warmup_frac * total steps)."""

    name: Literal["constant", "cosine", "linear", "onecycle", "noam"] = "cosine"
    warmup_steps: int = 0
    warmup_frac: float = 0.0
    start_ratio: float = 0.0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or not 0 <= self.warmup_frac < 1:
            raise ValueError("warmup_steps must be >= 0 and warmup_frac in [0, 1)")
        if self.start_ratio < 0 or self.min_lr_ratio < 0:
            raise ValueError("start_ratio and min_lr_ratio must be >= 0")
