"""Stage 1 recipe `mnist-mlp`: an MLP on MNIST, trained by autograd or by the hand-derived backward.

Both implementations share the architecture, the initialisation and the SGD update (torch.optim.SGD for the
autograd MLP, the hand-written ManualSGD for the hand-derived one), so their runs differ only in how the
gradients are computed. 5,000 training images are held out as the validation split for choices; the test
set is evaluated once, at the end (LeCun et al. 1998 for the data; the 784-1024-1024-10 ReLU MLP with dropout
is in the spirit of Srivastava et al. 2014, §6.1.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from llmlab.config import ConfigError
from llmlab.data.loader import TensorLoader
from llmlab.models.mlp import MLPConfig, build_mlp
from llmlab.recipes.base import BuildContext, Experiment, Recipe, Target
from llmlab.train.config import OptimConfig, ScheduleConfig, TrainConfig
from llmlab.train.optim import build_optimizer
from llmlab.train.tasks import ClassificationTask

SPLIT_SEED = 1234  # the validation split is fixed, whatever the run's seed, so runs compare on one split


@dataclass
class MnistDataConfig:
    source: Literal["mnist", "digits", "synthetic"] = "mnist"  # digits: scikit-learn's bundled 8x8 set
    val_size: int = 5000  # held out of the training set for model selection
    train_limit: int | None = None  # train on the first N remaining images only (quick runs)
    synthetic_train: int = 2048
    synthetic_eval: int = 512
    synthetic_noise: float = 6.0  # per-feature noise around the class prototypes: learnable, not trivial

    def __post_init__(self) -> None:
        if self.val_size < 1:
            raise ValueError("val_size must be >= 1")
        if self.train_limit is not None and self.train_limit < 1:
            raise ValueError("train_limit must be >= 1 (or none)")


@dataclass
class MnistMLPConfig:
    seed: int = 0
    label_smoothing: float = 0.1
    model: MLPConfig = field(default_factory=MLPConfig)
    data: MnistDataConfig = field(default_factory=MnistDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="sgd"))
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.label_smoothing < 1:
            raise ValueError("label_smoothing must be in [0, 1)")
        if self.model.impl == "manual" and self.optim.name not in ("sgd", "manual_sgd"):
            raise ValueError(
                f"model.impl=manual trains with the hand-written SGD; optim.name={self.optim.name}"
                " is not available to it (use optim.name=sgd)"
            )


def default() -> MnistMLPConfig:
    """Real MNIST: 784-1024-1024-10, dropout 0.2, label smoothing 0.1, Nesterov SGD, cosine, 8 epochs."""
    return MnistMLPConfig(
        model=MLPConfig(in_features=784, hidden=1024, depth=2, dropout=0.2),
        train=TrainConfig(batch_size=128, max_epochs=8, eval_every=0, log_every=50, precision="fp32"),
        optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
        schedule=ScheduleConfig(name="cosine", warmup_frac=0.05),
    )


def manual() -> MnistMLPConfig:
    cfg = default()
    cfg.model.impl = "manual"
    return cfg


def digits() -> MnistMLPConfig:
    """scikit-learn's bundled 8x8 digits: no download, seconds on a CPU (the offline demo)."""
    return MnistMLPConfig(
        model=MLPConfig(in_features=64, hidden=256, depth=2, dropout=0.1),
        data=MnistDataConfig(source="digits", val_size=144),
        train=TrainConfig(batch_size=64, max_epochs=40, eval_every=100, log_every=20, precision="fp32"),
        optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
        schedule=ScheduleConfig(name="cosine", warmup_frac=0.05),
    )


def smoke() -> MnistMLPConfig:
    """Synthetic data, a small MLP, 3 epochs: seconds; used by the test suite."""
    return MnistMLPConfig(
        model=MLPConfig(in_features=784, hidden=64, depth=2, dropout=0.1),
        data=MnistDataConfig(source="synthetic", val_size=256),
        train=TrainConfig(batch_size=64, max_epochs=3, eval_every=0, log_every=8, precision="fp32"),
        optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
        schedule=ScheduleConfig(name="cosine", warmup_frac=0.05),
    )


def _normalise_mnist(images: torch.Tensor) -> torch.Tensor:
    from llmlab.data.mnist import MNIST_MEAN, MNIST_STD

    return images.float().div_(255).sub_(MNIST_MEAN).div_(MNIST_STD).reshape(images.shape[0], -1)  # [N, 784]


def load_splits(
    cfg: MnistDataConfig, ctx: BuildContext
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], str]:
    """{"train", "val", "test"} → (features [N, D] float32, labels [N] int64), and a one-line description."""
    if cfg.source == "synthetic":
        from llmlab.data.synthetic import synthetic_classification

        shape, k = (784,), 10
        splits = {
            split: synthetic_classification(
                cfg.synthetic_train if split == "train" else cfg.synthetic_eval,
                shape,
                k,
                seed=SPLIT_SEED,
                noise=cfg.synthetic_noise,
                split=split,
            )
            for split in ("train", "val", "test")
        }
        return (
            splits,
            f"synthetic 784-d, 10 classes ({cfg.synthetic_train} train / {cfg.synthetic_eval} val / "
            f"{cfg.synthetic_eval} test)",
        )
    if cfg.source == "mnist":
        from llmlab.data.mnist import load_mnist
        from llmlab.data.store import data_root

        raw = load_mnist(data_root(ctx.data_dir))
        train_x, train_y = _normalise_mnist(raw["train"][0]), raw["train"][1]
        test = (_normalise_mnist(raw["test"][0]), raw["test"][1])
        name = "MNIST"
    else:
        from llmlab.data.digits import load_digits_splits

        raw = load_digits_splits()
        train_x, train_y = raw["train"][0].reshape(raw["train"][0].shape[0], -1), raw["train"][1]
        test = (raw["test"][0].reshape(raw["test"][0].shape[0], -1), raw["test"][1])
        name = "scikit-learn digits 8x8 (offline stand-in for MNIST)"
    if cfg.val_size >= train_x.shape[0]:
        raise ConfigError(f"data.val_size={cfg.val_size} leaves no training data ({train_x.shape[0]} images)")
    order = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))
    val_idx, train_idx = order[: cfg.val_size], order[cfg.val_size :]
    if cfg.train_limit is not None:
        train_idx = train_idx[: cfg.train_limit]
    splits = {
        "train": (train_x[train_idx], train_y[train_idx]),
        "val": (train_x[val_idx], train_y[val_idx]),
        "test": test,
    }
    sizes = " / ".join(f"{len(splits[s][1])} {s}" for s in ("train", "val", "test"))
    return splits, f"{name} ({sizes})"


class MnistMLP(Recipe):
    name = "mnist-mlp"
    description = "Stage 1: MLP with hand-derived backprop (model.impl=manual) or autograd, on MNIST"
    dataset = "mnist"
    config_cls = MnistMLPConfig
    presets = {"default": default, "manual": manual, "digits": digits, "smoke": smoke}
    preset_help = {
        "default": "real MNIST, autograd MLP 784-1024-1024-10, 8 epochs (~1 min on 2 CPU cores)",
        "manual": "the same with the hand-derived forward/backward and hand-written SGD",
        "digits": "scikit-learn's bundled 8x8 digits, no download (seconds)",
        "smoke": "synthetic data, tiny MLP, seconds (the test suite)",
    }
    targets = {
        "default": Target("test/accuracy", 0.98),
        "manual": Target("test/accuracy", 0.98),
        "digits": Target("test/accuracy", 0.95),
        "smoke": Target("test/accuracy", 0.9),
    }

    def build(self, cfg: MnistMLPConfig, ctx: BuildContext) -> Experiment:
        splits, description = load_splits(cfg.data, ctx)
        features = splits["train"][0].shape[1]
        if cfg.model.in_features != features:
            raise ConfigError(
                f"model.in_features={cfg.model.in_features} but the {cfg.data.source} data has "
                f"{features} features per image; set model.in_features={features}"
            )
        model = build_mlp(cfg.model)
        optim = cfg.optim
        if cfg.model.impl == "manual":
            from dataclasses import replace

            optim = replace(optim, name="manual_sgd")  # the hand-written update, same algorithm as SGD
        optimizer = build_optimizer(model, optim)
        device, d = ctx.device, ctx.dist
        on_device = {k: (x.to(device), y.to(device)) for k, (x, y) in splits.items()}
        train = TensorLoader(
            on_device["train"],
            cfg.train.batch_size,
            shuffle=True,
            drop_last=True,
            seed=cfg.seed,
            rank=d.rank,
            world_size=d.world_size,
        )
        eval_bs = cfg.train.eval_batch_size or max(cfg.train.batch_size, 1000)

        def evaluation(split: str) -> TensorLoader:
            return TensorLoader(on_device[split], eval_bs, rank=d.rank, world_size=d.world_size)

        notes = []
        if cfg.label_smoothing > 0:
            notes.append(
                f"The train loss includes label smoothing {cfg.label_smoothing}; validation and test "
                "losses are plain cross-entropy."
            )
        if cfg.model.impl == "manual":
            notes.append(
                "Gradients computed by the hand-derived backward (llmlab.nn.manual); parameters "
                "updated by the hand-written ManualSGD. No autograd."
            )
        if cfg.data.source == "digits":
            notes.append(
                "Data: scikit-learn's 8x8 digits, an offline stand-in for MNIST; not comparable to "
                "MNIST figures."
            )
        return Experiment(
            model=model,
            task=ClassificationTask(label_smoothing=cfg.label_smoothing),
            optimizer=optimizer,
            train_loader=train,
            eval_loaders={"val": evaluation("val")},
            final_loaders={"test": evaluation("test")},
            data_description=description,
            notes=notes,
        )
