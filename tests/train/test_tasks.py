"""Tasks: label smoothing only in training, flip test-time augmentation only in evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.train.tasks import ClassificationTask


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def test_label_smoothing_in_training_only():
    model, x, y = _model(), torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,))
    task = ClassificationTask(label_smoothing=0.2)
    model.train()
    assert torch.equal(task.step(model, (x, y)).loss, F.cross_entropy(model(x), y, label_smoothing=0.2))
    model.eval()
    out = task.step(model, (x, y))
    assert torch.equal(out.loss, F.cross_entropy(model(x), y))
    assert out.n == 8 and out.sums["correct"] == (model(x).argmax(-1) == y).sum()


def test_flip_tta_averages_the_mirror_in_evaluation_only():
    model, x, y = _model(), torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,))
    task = ClassificationTask(tta_hflip=True)
    model.eval()
    expected = 0.5 * (model(x) + model(torch.flip(x, dims=[3])))
    torch.testing.assert_close(task.step(model, (x, y)).loss, F.cross_entropy(expected, y))
    model.train()
    assert torch.equal(task.step(model, (x, y)).loss, F.cross_entropy(model(x), y))
