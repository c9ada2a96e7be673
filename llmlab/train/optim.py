"""Optimizers and learning-rate schedules built from their configs.

Weight decay is not applied to 1-D parameters (biases, normalisation scales) unless asked: the usual practice
since Loshchilov & Hutter (2019), as in nanoGPT and timm. Schedules are multipliers of the base LR wrapped in
torch's LambdaLR, so their state is a plain dict (checkpointable as JSON).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from llmlab.train.config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if decay_norm_and_bias or p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "manual_sgd":
        from llmlab.nn.manual import ManualSGD

        return ManualSGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name in ("adamw", "adam"):
        # Adam's weight decay is L2 added to the gradient (coupled), unlike AdamW's decoupled decay.
        cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
        return cls(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **_adam_impl(cfg.impl, groups))
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def _adam_impl(impl: str, groups: list[dict]) -> dict[str, bool]:
    """torch's implementation switches. Off CUDA torch defaults to the per-tensor for-loop; the fused kernel
    (one pass over each tensor, on CPU since torch 2.4) computes the same update and is what "auto" picks
    where every parameter is a floating-point tensor on a device that has it."""
    if impl == "for-loop":
        return {"foreach": False}
    if impl == "foreach":
        return {"foreach": True}
    if impl == "fused":
        return {"fused": True}
    supported = ("cpu", "cuda", "xpu", "mps")
    params = [p for g in groups for p in g["params"]]
    if params and all(p.is_floating_point() and p.device.type in supported for p in params):
        return {"fused": True}
    return {}


@dataclass
class LRLambda:
    """Multiplier of the base learning rate at optimizer step `step` (0-based), for torch's LambdaLR.

    A dataclass, not a closure, so LambdaLR.state_dict() stores its fields and a resumed run continues the
    same curve."""

    name: str
    total_steps: int
    warmup_steps: int
    start_ratio: float
    min_lr_ratio: float

    def __call__(self, step: int) -> float:
        if self.name == "onecycle":
            return self._onecycle(step)
        if self.name == "noam":
            s, w = step + 1, max(self.warmup_steps, 1)  # the paper counts steps from 1
            return min(s / w, math.sqrt(w / s))
        if step < self.warmup_steps:
            return self.start_ratio + (1.0 - self.start_ratio) * step / self.warmup_steps
        if self.name == "constant":
            return 1.0
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        if self.name == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif self.name == "linear":
            shape = 1.0 - progress
        else:
            raise ValueError(f"unknown schedule {self.name!r}")
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape

    def _onecycle(self, step: int) -> float:
        # Same phase boundaries as torch's OneCycleLR: the peak is reached at step warmup_steps - 1 and the
        # minimum at the last step, total_steps - 1.
        peak = float(self.warmup_steps) - 1
        last = float(self.total_steps) - 1
        if step <= peak:
            start, end, pct = self.start_ratio, 1.0, step / peak if peak > 0 else 1.0
        else:
            start, end, pct = 1.0, self.min_lr_ratio, min(1.0, (step - peak) / max(last - peak, 1e-12))
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(cfg.warmup_steps, int(cfg.warmup_frac * total_steps))
    if cfg.name == "onecycle" and warmup == 0:
        warmup = int(0.3 * total_steps)  # OneCycleLR's default pct_start
    warmup = min(warmup, total_steps)
    fn = LRLambda(cfg.name, total_steps, warmup, cfg.start_ratio, cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=fn)


def schedule_state(scheduler: torch.optim.lr_scheduler.LambdaLR) -> dict:
    """JSON-able scheduler state (LambdaLR stores a callable object's __dict__)."""
    state = scheduler.state_dict()
    assert all(isinstance(fn, dict) for fn in state["lr_lambdas"]), "schedules must be LRLambda objects"
    return state


__all__ = ["LRLambda", "asdict", "build_optimizer", "build_scheduler", "param_groups", "schedule_state"]
