"""Stage 3 recipes: the text pipeline wiring, the saved vocabulary, the baseline, and real IMDB in CI."""

from __future__ import annotations

import json

import pytest
import torch

from llmlab.data.text import Vocab
from llmlab.recipes import get_recipe
from llmlab.recipes.base import BuildContext
from llmlab.runner import evaluate_run, run


def test_batches_are_bucketed_token_ids_with_lengths():
    recipe = get_recipe("imdb-gru")
    cfg = recipe.config("smoke")
    exp = recipe.build(cfg, BuildContext(device=torch.device("cpu")))
    tokens, lengths, labels = next(iter(exp.train_loader))
    assert tokens.dtype == torch.int64 and tokens.shape == (cfg.train.batch_size, int(lengths.max()))
    assert (lengths >= 1).all() and set(labels.tolist()) <= {0, 1}
    assert exp.model.cfg.cell == "gru" and "vocab.json" in exp.artifacts


def test_run_saves_its_vocab_reports_the_baseline_and_evaluates_again(tmp_path):
    out = tmp_path / "run"
    result = run("imdb-lstm", "smoke", ["train.max_epochs=1"], out=out, device="cpu")
    vocab = Vocab.from_json(out / "vocab.json")
    assert len(vocab) > 100 and vocab.itos[:2] == ["<pad>", "<unk>"]
    assert 0.5 < result["metrics"]["baseline_tfidf/test_accuracy"] <= 1.0
    assert "baseline_tfidf/test_accuracy" in (out / "report.md").read_text()
    again = evaluate_run(out, "test", device="cpu")
    assert again["accuracy"] == result["metrics"]["test/accuracy"]


def test_scratch_layers_train_in_the_recipe(tmp_path):
    result = run(
        "imdb-lstm",
        "smoke",
        ["train.max_epochs=1", "model.impl=scratch", "baseline=false"],
        out=tmp_path / "run",
        device="cpu",
    )
    assert result["status"] == "completed" and "from scratch" in " ".join(result["notes"])


@pytest.mark.slow
def test_real_imdb_subset_learns(shared_data, tmp_path):
    """A small BiGRU on 8,000 real reviews (at most 128 tokens each) for 2 epochs: clearly above chance
    on the 25,000 test reviews.

    Measured 79.7% test accuracy (seeds 1 and 2: 80.1%, 79.0%) on a 2-core CPU in about 40 s; chance is 50%,
    so 70% leaves a wide margin. (This replaced 4,000 reviews of 200 tokens for 3 epochs at batch 32, lr 5e-3:
    375 steps, about 55 s, 77.5% / 76.1% / 76.4% for seeds 0 / 1 / 2. Twice the reviews in batches of 64 at
    lr 1e-2 learn more in 250 steps of shorter reviews.)
    """
    overrides = [
        "data.train_limit=8000",
        "train.max_epochs=2",
        "train.batch_size=64",
        "optim.lr=1e-2",
        "data.max_len=128",
        "model.hidden=64",
        "model.embed_dim=64",
        "baseline=false",
    ]
    result = run("imdb-gru", "default", overrides, out=tmp_path / "run", device="cpu", data_dir=shared_data)
    assert result["metrics"]["test/accuracy"] > 0.7, result["metrics"]
    assert "25000 test" in result["data"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["config"]["data"]["train_limit"] == 8000
