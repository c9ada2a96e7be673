"""Stage 2 recipes: the data path and model wiring, TensorBoard images, and a real-data run in CI."""

from __future__ import annotations

import pytest
import torch

from llmlab.recipes import get_recipe
from llmlab.recipes.base import BuildContext
from llmlab.runner import run


def _build(name: str, preset: str = "smoke", **ctx):
    recipe = get_recipe(name)
    cfg = recipe.config(preset)
    return cfg, recipe.build(cfg, BuildContext(device=torch.device("cpu"), **ctx))


def test_training_batches_are_augmented_normalised_channels_last():
    cfg, exp = _build("cifar10-resnet20")
    x, y = next(iter(exp.train_loader))
    assert x.dtype == torch.float32 and x.shape == (cfg.train.batch_size, 3, 32, 32)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert abs(x.mean().item()) < 1.5 and y.dtype == torch.int64
    # Same epoch and batch → the same augmentation (resumable); another epoch → different crops.
    again, _ = next(iter(exp.train_loader))
    assert torch.equal(x, again)
    exp.train_loader.set_epoch(1)
    assert not torch.equal(next(iter(exp.train_loader))[0], x)
    val, _ = next(iter(exp.eval_loaders["val"]))
    assert val.dtype == torch.float32
    assert exp.task.tta_hflip


def test_weight_decay_skips_batchnorm_and_biases():
    _, exp = _build("cifar10-resnet18")
    decayed = [p for g in exp.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    assert decayed and all(p.ndim >= 2 for p in decayed)
    assert exp.optimizer.param_groups[0]["nesterov"]


def test_tensorboard_gets_the_augmented_batch_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run("cifar10-resnet20", "smoke", ["train.max_epochs=1"], out=tmp_path / "run", device="cpu")
    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"images": 1})
    events.Reload()
    assert "train/augmented_batch" in events.Tags()["images"]
    assert {"train/loss", "train/lr", "val/accuracy"} <= set(events.Tags()["scalars"])


@pytest.mark.slow
def test_real_cifar10_subset_learns(shared_data, tmp_path):
    """ResNet-20 on 4,096 real training images for 2 epochs: twice the 10% of chance on the full test set or
    more (the full `cpu` preset reaches its >85% in docs/results.md). The figure depends on the CPU: after
    this few steps float rounding differences between CPUs (oneDNN's kernels differ by instruction set) have
    grown, and 23.4% was measured on an Intel Xeon (AVX-512) where an AMD EPYC gave over 25%."""
    result = run(
        "cifar10-resnet20",
        "cpu",
        ["data.train_limit=4096", "train.max_epochs=2", "data.val_size=1000", "tta_hflip=false"],
        out=tmp_path / "run",
        device="cpu",
        data_dir=shared_data,
    )
    assert result["metrics"]["test/accuracy"] > 0.2, result["metrics"]
    assert "JPEG" in " ".join(result["notes"]) and "10000 test" in result["data"]
