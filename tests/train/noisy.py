"""A small classification run whose validation metrics go up and down: 3 noisy classes around random
prototypes in 12 dimensions, SGD at a high rate (tests/train/test_best.py, test_averaging.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llmlab.data.loader import TensorLoader
from llmlab.train.callbacks import Callback
from llmlab.train.config import ScheduleConfig, TrainConfig
from llmlab.train.tasks import ClassificationTask
from llmlab.train.trainer import Trainer


def noisy_classes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [n, 12], y [n]): 3 classes, prototypes at scale 2, noise at scale 2."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(3, 12, generator=g) * 2
    y = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed + 100))
    return protos[y] + 2.0 * torch.randn(n, 12, generator=g), y


def noisy_trainer(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    cfg: TrainConfig,
    checkpoint_dir: Path | None,
    callbacks: list[Callback] | tuple[Callback, ...] = (),
) -> Trainer:
    """Train on 128 samples (seed 0, shuffled); evaluate on val (96, seed 1) and at the end test (seed 2)."""
    return Trainer(
        model,
        ClassificationTask(),
        opt,
        TensorLoader(noisy_classes(128, seed=0), cfg.batch_size, shuffle=True, drop_last=True, seed=7),
        cfg,
        ScheduleConfig(name="constant"),
        eval_loaders={"val": TensorLoader(noisy_classes(96, seed=1), 32)},
        final_loaders={"test": TensorLoader(noisy_classes(96, seed=2), 32)},
        checkpoint_dir=checkpoint_dir,
        callbacks=list(callbacks),
    )
