"""Stage 2 recipes: ResNets from scratch on CIFAR-10 — `cifar10-resnet18` (GPU target 94%) and the CPU-sized
`cifar10-resnet20` (He et al. 2016, §4.2; the curriculum's >85% on a laptop CPU).

The data path never decodes images during training: CIFAR-10 is decoded once into a uint8 tensor cache,
kept on the training device, and augmented per batch on that device (random crop with 4-pixel zero padding
and horizontal flip, then normalisation). 5,000 training images are held out as the validation split; the
test set is evaluated once, at the end (optionally with flip test-time augmentation). Training: SGD with
Nesterov momentum, weight decay on conv/linear weights only, label smoothing, one-cycle schedule;
channels_last memory format; bf16 autocast on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from llmlab.config import ConfigError
from llmlab.data.loader import TensorLoader
from llmlab.models.resnet import ResNetConfig, build_resnet
from llmlab.recipes.base import BuildContext, Experiment, Recipe, Target
from llmlab.train.callbacks import AugmentedImages
from llmlab.train.config import OptimConfig, ScheduleConfig, TrainConfig
from llmlab.train.optim import build_optimizer
from llmlab.train.tasks import ClassificationTask

SPLIT_SEED = 1234  # fixed validation split, whatever the run's seed


@dataclass
class CifarDataConfig:
    source: Literal["cifar10", "synthetic"] = "cifar10"
    val_size: int = 5000  # held out of the 50,000 training images, for model selection
    train_limit: int | None = None  # train on the first N of the remaining images (class-balanced shuffle)
    augment: bool = True  # random crop (padding 4) + horizontal flip
    crop_padding: int = 4
    synthetic_train: int = 512
    synthetic_eval: int = 256

    def __post_init__(self) -> None:
        if self.val_size < 1:
            raise ValueError("val_size must be >= 1")
        if self.train_limit is not None and self.train_limit < 1:
            raise ValueError("train_limit must be >= 1 (or none)")
        if self.crop_padding < 0:
            raise ValueError("crop_padding must be >= 0")


@dataclass
class CifarResNetConfig:
    seed: int = 0
    label_smoothing: float = 0.1
    tta_hflip: bool = True  # average the logits of each test image and its mirror image
    channels_last: bool = True
    model: ResNetConfig = field(default_factory=ResNetConfig)
    data: CifarDataConfig = field(default_factory=CifarDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="sgd"))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="onecycle"))

    def __post_init__(self) -> None:
        if not 0 <= self.label_smoothing < 1:
            raise ValueError("label_smoothing must be in [0, 1)")


def _sgd(lr: float, weight_decay: float = 5e-4) -> OptimConfig:
    return OptimConfig(name="sgd", lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)


def _onecycle(warmup_frac: float = 0.25) -> ScheduleConfig:
    return ScheduleConfig(name="onecycle", warmup_frac=warmup_frac, start_ratio=0.1, min_lr_ratio=0.002)


# ------------------------------------------------------------------------------------------- presets
def resnet18_default() -> CifarResNetConfig:
    """The GPU recipe (target ≥94%): ResNet-18 (CIFAR stem), batch 512, 40 epochs, one-cycle, bf16."""
    return CifarResNetConfig(
        model=ResNetConfig(arch="resnet18", stem="cifar"),
        train=TrainConfig(batch_size=512, max_epochs=40, eval_every=0, log_every=20),
        optim=_sgd(lr=0.4),
        schedule=_onecycle(0.2),
    )


def resnet18_cpu() -> CifarResNetConfig:
    """Real data on a 2-core CPU in ≤15 minutes: an 8,000-image subset, 3 epochs — shows learning, not 94%.
    (ResNet-18 trains at ~53 images/s on 2 cores; evaluation without flip TTA to save time.)"""
    cfg = resnet18_default()
    cfg.tta_hflip = False
    cfg.data = CifarDataConfig(train_limit=8_000)
    cfg.train = TrainConfig(batch_size=128, max_epochs=3, eval_every=0, log_every=10, precision="fp32")
    cfg.optim = _sgd(lr=0.1)
    return cfg


def resnet18_smoke() -> CifarResNetConfig:
    cfg = resnet18_default()
    cfg.data = CifarDataConfig(source="synthetic", val_size=64, synthetic_train=96, synthetic_eval=64)
    cfg.train = TrainConfig(batch_size=32, max_epochs=2, eval_every=0, log_every=1, precision="fp32")
    cfg.optim = _sgd(lr=0.05)
    return cfg


def resnet20_default() -> CifarResNetConfig:
    """The paper's schedule on a GPU: ResNet-20 (option A shortcuts), 160 epochs (He et al.: 91.25%)."""
    return CifarResNetConfig(
        model=ResNetConfig(arch="resnet20", stem="cifar", shortcut="A"),
        train=TrainConfig(batch_size=128, max_epochs=160, eval_every=0, log_every=50),
        optim=_sgd(lr=0.2, weight_decay=1e-4),
        schedule=_onecycle(0.15),
    )


def resnet20_cpu() -> CifarResNetConfig:
    """The curriculum's >85% on a 2-core CPU: ResNet-20, 45,000 images, 30 epochs (~85 s each here)."""
    cfg = resnet20_default()
    cfg.train = TrainConfig(batch_size=128, max_epochs=30, eval_every=0, log_every=50, precision="fp32")
    cfg.optim = _sgd(lr=0.2, weight_decay=5e-4)
    cfg.schedule = _onecycle(0.25)
    return cfg


def resnet20_smoke() -> CifarResNetConfig:
    cfg = resnet20_default()
    cfg.data = CifarDataConfig(source="synthetic", val_size=128, synthetic_train=512, synthetic_eval=256)
    cfg.train = TrainConfig(batch_size=64, max_epochs=5, eval_every=0, log_every=4, precision="fp32")
    cfg.optim = _sgd(lr=0.1)
    cfg.schedule = _onecycle(0.3)
    return cfg


# ------------------------------------------------------------------------------------------- data
def _synthetic_images(n: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable uint8 'images': a coarse 4x4 colour pattern per class plus noise, upsampled to 32x32 so the
    class survives random crops and flips (pixel-level white-noise prototypes would not)."""
    import torch.nn.functional as F

    from llmlab.data.synthetic import synthetic_classification

    x, y = synthetic_classification(n, (3, 4, 4), 10, seed=SPLIT_SEED, noise=0.8, split=split)  # [n, 3, 4, 4]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)  # [n, 3, 32, 32]
    return (128 + 50 * x).clamp(0, 255).to(torch.uint8), y


def load_splits(cfg: CifarDataConfig, ctx: BuildContext) -> tuple[dict, str, bool]:
    """{"train", "val", "test"} → (uint8 images [N, 3, 32, 32], labels [N]); a description; lossy?"""
    if cfg.source == "synthetic":
        splits = {
            "train": _synthetic_images(cfg.synthetic_train, "train"),
            "val": _synthetic_images(cfg.synthetic_eval, "val"),
            "test": _synthetic_images(cfg.synthetic_eval, "test"),
        }
        return splits, f"synthetic 3x32x32 images, 10 classes ({cfg.synthetic_train} train)", False
    from llmlab.data.cifar10 import load_cifar10
    from llmlab.data.store import data_root

    data = load_cifar10(data_root(ctx.data_dir))
    images, labels = data.train_images, data.train_labels
    if cfg.val_size >= len(labels):
        raise ConfigError(f"data.val_size={cfg.val_size} leaves no training data ({len(labels)} images)")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    val_idx, train_idx = order[: cfg.val_size], order[cfg.val_size :]
    if cfg.train_limit is not None:
        train_idx = train_idx[: cfg.train_limit]  # a random (so roughly class-balanced) subset
    splits = {
        "train": (images[train_idx], labels[train_idx]),
        "val": (images[val_idx], labels[val_idx]),
        "test": (data.test_images, data.test_labels),
    }
    sizes = " / ".join(f"{len(splits[s][1])} {s}" for s in ("train", "val", "test"))
    return splits, f"CIFAR-10 from {data.source} ({sizes})", data.lossy


class _CifarRecipe(Recipe):
    dataset = "cifar10"
    config_cls = CifarResNetConfig

    def build(self, cfg: CifarResNetConfig, ctx: BuildContext) -> Experiment:
        from llmlab.data.augment import CifarAugment, CifarEval
        from llmlab.data.cifar10 import CIFAR10_MEAN, CIFAR10_STD

        splits, description, lossy = load_splits(cfg.data, ctx)
        model = build_resnet(cfg.model)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, cfg.optim)
        device, d = ctx.device, ctx.dist
        on_device = {k: (x.to(device), y.to(device)) for k, (x, y) in splits.items()}  # uint8 on the device
        if cfg.data.augment:
            train_tf = CifarAugment(
                CIFAR10_MEAN, CIFAR10_STD, padding=cfg.data.crop_padding, channels_last=cfg.channels_last
            )
        else:
            train_tf = CifarEval(CIFAR10_MEAN, CIFAR10_STD, channels_last=cfg.channels_last)
        eval_tf = CifarEval(CIFAR10_MEAN, CIFAR10_STD, channels_last=cfg.channels_last)
        train = TensorLoader(
            on_device["train"],
            cfg.train.batch_size,
            shuffle=True,
            drop_last=True,
            seed=cfg.seed,
            rank=d.rank,
            world_size=d.world_size,
            transform=train_tf,
        )
        eval_bs = cfg.train.eval_batch_size or max(cfg.train.batch_size, 500)

        def evaluation(split: str) -> TensorLoader:
            return TensorLoader(
                on_device[split], eval_bs, rank=d.rank, world_size=d.world_size, transform=eval_tf
            )

        notes = []
        if lossy:
            notes.append(
                "Data: this CIFAR-10 copy is JPEG-compressed (lossy), not the original pixels; "
                "accuracies may differ slightly from published figures."
            )
        if cfg.label_smoothing > 0:
            notes.append(
                f"The train loss includes label smoothing {cfg.label_smoothing}; validation and test "
                "losses are plain cross-entropy."
            )
        if cfg.tta_hflip:
            notes.append("Evaluation averages the logits of each image and its mirror image (flip TTA).")
        return Experiment(
            model=model,
            task=ClassificationTask(label_smoothing=cfg.label_smoothing, tta_hflip=cfg.tta_hflip),
            optimizer=optimizer,
            train_loader=train,
            eval_loaders={"val": evaluation("val")},
            final_loaders={"test": evaluation("test")},
            data_description=description,
            notes=notes,
            callbacks=[AugmentedImages(CIFAR10_MEAN, CIFAR10_STD)],
        )


class Cifar10ResNet18(_CifarRecipe):
    name = "cifar10-resnet18"
    description = "Stage 2: ResNet-18 (CIFAR stem) from scratch on CIFAR-10, batch augmentation on the device"
    presets = {"default": resnet18_default, "cpu": resnet18_cpu, "smoke": resnet18_smoke}
    preset_help = {
        "default": "full data, 40 epochs, bf16 on a GPU",
        "cpu": "real data, 8k-image subset, 3 epochs: <=15 min on 2 CPU cores (shows learning)",
        "smoke": "synthetic images, 6 steps (the test suite)",
    }
    targets = {"default": Target("test/accuracy", 0.94), "cpu": Target("test/accuracy", 0.4)}


class Cifar10ResNet20(_CifarRecipe):
    name = "cifar10-resnet20"
    description = "Stage 2 (CPU-sized): ResNet-20 of He et al. §4.2 on CIFAR-10"
    presets = {"default": resnet20_default, "cpu": resnet20_cpu, "smoke": resnet20_smoke}
    preset_help = {
        "default": "the paper's 160 epochs, on a GPU",
        "cpu": "real data, 30 epochs: >85% on 2 CPU cores in under an hour",
        "smoke": "synthetic images, 5 epochs (the test suite)",
    }
    targets = {
        "default": Target("test/accuracy", 0.91),
        "cpu": Target("test/accuracy", 0.85),
        "smoke": Target("test/accuracy", 0.75),
    }


__all__ = ["CifarDataConfig", "CifarResNetConfig", "Cifar10ResNet18", "Cifar10ResNet20"]
