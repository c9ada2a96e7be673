"""Tasks: label smoothing only in training, flip test-time augmentation only in evaluation; the seq2seq task
and token-weighted steps."""

from __future__ import annotations

import math

import pytest
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


# ----------------------------------------------------------------------------------------------------------
# Seq2SeqTask and token-weighted steps
# ----------------------------------------------------------------------------------------------------------


def _seq2seq_trainer(grad_accum: int, units: bool = True):
    from llmlab.data.token_batches import TokenBatchLoader
    from llmlab.models.transformer import Transformer, TransformerConfig
    from llmlab.train.config import OptimConfig, ScheduleConfig, TrainConfig
    from llmlab.train.optim import build_optimizer
    from llmlab.train.tasks import Seq2SeqTask
    from llmlab.train.trainer import Trainer

    g = torch.Generator().manual_seed(0)
    n, vocab = 48, 20
    src_len = torch.randint(2, 9, (n,), generator=g)
    tgt_len = torch.randint(3, 12, (n,), generator=g)  # very different target lengths within a batch
    src = torch.zeros(n, 9, dtype=torch.long)
    tgt = torch.zeros(n, 12, dtype=torch.long)
    for i in range(n):
        src[i, : src_len[i]] = torch.randint(3, vocab, (int(src_len[i]),), generator=g)
        tgt[i, : tgt_len[i]] = torch.randint(3, vocab, (int(tgt_len[i]),), generator=g)
        tgt[i, 0] = 1
    torch.manual_seed(0)
    cfg = TransformerConfig(d_model=16, n_heads=2, encoder_layers=1, decoder_layers=1, d_ff=32, dropout=0.0)
    model = Transformer(cfg, vocab, 0).double()
    task = Seq2SeqTask(0, label_smoothing=0.1)
    if not units:
        task.units = None  # what the Trainer did before tokens were a unit: weigh micro-batches by rows
    loader = TokenBatchLoader(src, tgt, src_len, tgt_len, 120, shuffle=True, row_multiple=4)
    train = TrainConfig(
        batch_size=120, batch_unit="tokens", grad_accum=grad_accum, max_steps=6, precision="fp32"
    )
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=0.5))  # SGD: rounding is not amplified as in Adam
    return Trainer(model, task, opt, loader, train, ScheduleConfig(name="constant"))


def test_token_weighted_accumulation_equals_the_full_batch():
    """With targets of different lengths, the mean loss per token of a batch is NOT the mean of its
    micro-batches' means: micro-batches are weighted by their token counts (float64: ~1e-12 apart)."""
    full = _seq2seq_trainer(1)
    full.fit()
    accum = _seq2seq_trainer(4)
    accum.fit()
    by_rows = _seq2seq_trainer(4, units=False)
    by_rows.fit()
    ref = full.raw_model.state_dict()
    worst = max((accum.raw_model.state_dict()[k] - v).abs().max().item() for k, v in ref.items())
    assert worst <= 1e-12
    wrong = max((by_rows.raw_model.state_dict()[k] - v).abs().max().item() for k, v in ref.items())
    assert wrong > 1e-6  # the test can fail: weighting by rows gives other updates


def test_seq2seq_metrics_and_empty_batches():
    from llmlab.models.transformer import Transformer, TransformerConfig
    from llmlab.train.tasks import Seq2SeqTask

    torch.manual_seed(0)
    model = Transformer(
        TransformerConfig(d_model=8, n_heads=2, encoder_layers=1, decoder_layers=1, d_ff=8), 12, 0
    )
    task = Seq2SeqTask(0, label_smoothing=0.1)
    src = torch.tensor([[5, 6, 2], [7, 2, 0]])
    tgt = torch.tensor([[1, 4, 5, 2], [1, 6, 2, 0]])
    out = task.step(model.eval(), (src, tgt, torch.arange(2)))
    assert out.n == 5 == task.units((src, tgt))
    m = task.metrics(out.loss.item() * out.n, out.n, {k: float(v) for k, v in out.sums.items()})
    assert m["ppl"] == pytest.approx(math.exp(m["loss"]))  # evaluation: no smoothing, loss = NLL
    assert 0 <= m["token_accuracy"] <= 1 and "bleu" not in m
    empty = task.step(model, (src[:0], tgt[:0], torch.arange(0)))
    assert empty.n == 0 and empty.loss.item() == 0.0
