"""Synthetic classification: deterministic, balanced, and learnable from train to test."""

from __future__ import annotations

import pytest
import torch
from sklearn.linear_model import LogisticRegression

from llmlab.data.synthetic import synthetic_classification


def test_deterministic_shapes_dtypes():
    x, y = synthetic_classification(100, (1, 6, 6), num_classes=5, seed=3)
    assert x.shape == (100, 1, 6, 6) and x.dtype == torch.float32
    assert y.shape == (100,) and y.dtype == torch.int64
    x2, y2 = synthetic_classification(100, (1, 6, 6), num_classes=5, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = synthetic_classification(100, (1, 6, 6), num_classes=5, seed=4)
    assert not torch.equal(x, x3)
    x4, _ = synthetic_classification(100, (1, 6, 6), num_classes=5, seed=3, split="test")
    assert not torch.equal(x, x4)


def test_balanced_and_shuffled():
    _, y = synthetic_classification(1003, (4,), num_classes=10, seed=0)
    counts = torch.bincount(y, minlength=10)
    assert int(counts.max() - counts.min()) <= 1 and int(counts.sum()) == 1003
    assert not torch.equal(y[:20], torch.arange(20) % 10)  # shuffled, not cyclic


def test_does_not_touch_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    synthetic_classification(50, (8,), num_classes=3, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        synthetic_classification(10, (2,), num_classes=2, seed=0, split="holdout")
    with pytest.raises(ValueError):
        synthetic_classification(10, (2,), num_classes=0, seed=0)


def test_train_generalises_to_test():
    shape, classes, seed = (20,), 4, 7
    x_tr, y_tr = synthetic_classification(400, shape, classes, seed=seed, noise=2.0, split="train")
    x_te, y_te = synthetic_classification(400, shape, classes, seed=seed, noise=2.0, split="test")
    clf = LogisticRegression(max_iter=500).fit(x_tr.numpy(), y_tr.numpy())
    acc = clf.score(x_te.numpy(), y_te.numpy())
    assert acc > 0.7  # chance is 0.25
    # a different seed is a different task: the trained model is near chance there
    x_other, y_other = synthetic_classification(400, shape, classes, seed=seed + 1, noise=2.0, split="test")
    assert clf.score(x_other.numpy(), y_other.numpy()) < 0.5
