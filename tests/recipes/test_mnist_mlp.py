"""mnist-mlp on the real MNIST (both implementations), and its data split."""

from __future__ import annotations

import pytest
import torch

from llmlab.recipes.base import BuildContext
from llmlab.recipes.mnist_mlp import MnistDataConfig, load_splits
from llmlab.runner import run


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["autograd", "manual"])
def test_real_mnist_reaches_97_5_percent(shared_data, tmp_path, impl):
    # A shorter schedule than the default preset (512 wide, 3 epochs: ~12 s here; the full preset is 98%+).
    result = run(
        "mnist-mlp",
        "default",
        [f"model.impl={impl}", "model.hidden=512", "train.max_epochs=3"],
        out=tmp_path / impl,
        device="cpu",
        data_dir=shared_data,
    )
    assert result["metrics"]["test/accuracy"] >= 0.975, result["metrics"]
    assert result["data"].startswith("MNIST (55000 train / 5000 val / 10000 test)")


def test_validation_split_is_disjoint_and_fixed(shared_data):
    ctx = BuildContext(device=torch.device("cpu"), data_dir=shared_data)
    splits, _ = load_splits(MnistDataConfig(), ctx)
    assert [len(splits[s][1]) for s in ("train", "val", "test")] == [55000, 5000, 10000]
    train, val = splits["train"][0], splits["val"][0]
    # No validation image appears in the training split (compare row hashes).
    train_rows = {r.numpy().tobytes() for r in train}
    overlap = sum(r.numpy().tobytes() in train_rows for r in val)
    assert overlap <= 5  # a leaked split would give 5000
    again, _ = load_splits(MnistDataConfig(), ctx)
    assert torch.equal(again["val"][1], splits["val"][1])


def test_digits_split():
    splits, description = load_splits(
        MnistDataConfig(source="digits", val_size=144), BuildContext(device=torch.device("cpu"))
    )
    assert splits["train"][0].shape[1] == 64 and "digits" in description
    assert len(splits["val"][1]) == 144
