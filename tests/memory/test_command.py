"""`llmlab memory`: the prediction table for a recipe's resolved config, the comparison across strategies, the
files --out writes, GPT-2 124M from overrides on the meta device, and clear errors (exit 2)."""

from __future__ import annotations

import json

import pytest

from llmlab.cli import main
from llmlab.memory.predict import predict_memory
from llmlab.models.gpt import GPTConfig

GPT2 = ["model.n_layer=12", "model.n_head=12", "model.n_embd=768", "model.block_size=1024"]


def test_smoke_preset_prints_tables(capsys):
    assert main(["memory", "shakespeare-gpt", "--preset", "smoke", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for text in ("## This run (ddp)", "optimizer states", "GELU input (c_fc output)", "Across strategies",
                 "zero3 +ckpt", "deepspeed3", "micro-batch 16 × 32 tokens"):  # fmt: skip
        assert text in out


def test_out_writes_chart_tables_and_json(tmp_path, capsys):
    argv = ["memory", "shakespeare-gpt", "--preset", "smoke", "--ranks", "2", "--rank", "1", "--device",
            "cuda", "train.strategy=zero2", "train.precision=bf16", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Across strategies, 2 rank(s)" in (tmp_path / "memory.md").read_text()
    record = json.loads((tmp_path / "memory_prediction.json").read_text())
    this = record["this_run"]
    assert (this["strategy"], this["ranks"], this["rank"], this["precision"]) == ("zero2", 2, 1, "bf16")
    vocab = this["activation_shape"]["vocab"]
    cfg = GPTConfig(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=32)  # the smoke model
    p = predict_memory(cfg, micro_batch=8, precision="bf16", device="cuda", strategy="zero2", ranks=2, rank=1)
    assert this["bytes"] == p.components()
    assert {"ddp", "zero3 +ckpt", "fsdp2", "deepspeed1"} <= set(record["strategies"])


def test_gpt2_124m_from_overrides(capsys):
    argv = ["memory", "shakespeare-gpt", "--preset", "cpu", *GPT2, "model.vocab_size=50257", "--device",
            "cuda", "train.precision=bf16"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Ψ = 124,439,808 parameters" in out and "1.85 GiB" in out  # 16Ψ of fp32 states under autocast


@pytest.mark.slow
def test_gpt2_vocabulary_from_the_tokenizer(shared_data, capsys):
    argv = ["memory", "shakespeare-gpt", *GPT2, "data.tokenizer=gpt2", "--device", "cpu",
            "--data-dir", str(shared_data)]  # fmt: skip
    assert main(argv) == 0
    assert "vocab 50,257: Ψ = 124,439,808" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["shakespeare-gpt", "model.n_layr=2"], "did you mean: model.n_layer"),
        (["shakespeare-gptt"], "did you mean: shakespeare-gpt"),
        (["shakespeare-gpt", "--preset", "smok"], "did you mean: smoke"),
        (["mnist-mlp", "--preset", "smoke"], "models the language-model recipes"),
        (["shakespeare-gpt", "--preset", "smoke", "--ranks", "3"], "does not divide over --ranks 3"),
        (["shakespeare-gpt", "--preset", "smoke", "--ranks", "2", "--rank", "2"], "--rank 2"),
    ],
)
def test_bad_requests_exit_2(capsys, argv, message):
    assert main(["memory", *argv, "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err.lower()
