"""Fixtures for the serving tests: a tiny random BERT and a tiny GPT run saved to disk once per session,
loaded as users do."""

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


@pytest.fixture(scope="session")
def lm_run_dir(tmp_path_factory) -> Path:
    """A language-model run directory (shakespeare-gpt's layout) with a tiny char-level GPT, context 16."""
    from tests.serve.helpers import save_tiny_lm_run

    return save_tiny_lm_run(tmp_path_factory.mktemp("runs") / "shakespeare-gpt-tiny")


@pytest.fixture(scope="session")
def language_model(lm_run_dir):
    from llmlab.serve.lm import load_language_model

    return load_language_model(lm_run_dir)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one intra-op thread while a module's tests run (restored after): on a busy 2-core machine
    token-by-token generation with spinning idle threads is 10-20x slower (see serve's --torch-threads)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
