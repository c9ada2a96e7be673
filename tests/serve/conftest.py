"""Fixtures for the serving tests: a tiny random BERT saved to disk once per session, loaded as users do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.serve.helpers import bert_vocab_file, save_tiny_bert


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """An HF model directory (config.json, model.safetensors, tokenizer files)."""
    tmp = tmp_path_factory.mktemp("tiny-bert")
    return save_tiny_bert(tmp / "tiny-bert-agnews", bert_vocab_file(tmp))


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, model_dir) -> Path:
    """An llmlab run directory as the agnews-bert recipe writes it: the model in RUN/model/, plus records."""
    import shutil

    run = tmp_path_factory.mktemp("runs") / "agnews-bert-smoke"
    shutil.copytree(model_dir, run / "model")
    (run / "config.json").write_text(json.dumps({"recipe": "agnews-bert", "preset": "smoke"}))
    (run / "result.json").write_text(json.dumps({"metrics": {"test/accuracy": 0.25}}))
    return run


@pytest.fixture(scope="session")
def classifier(model_dir):
    from llmlab.serve.model import TextClassifier

    return TextClassifier.from_path(model_dir)
