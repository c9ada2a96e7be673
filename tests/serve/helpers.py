"""Shared by the serving tests: a tiny random BERT classifier saved as a user would, a tiny GPT run written as
`llmlab run shakespeare-gpt` writes one, fakes of both, and a small HTTP client.

The model is `BertForSequenceClassification` from a config (no weights are downloaded) with the four AG News
labels; its tokenizer uses the real bert-base-uncased vocab from `$LLMLAB_DATA/tokenizers/` when present and
a small vocab written here otherwise, so the tests run on any machine.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

AG_NEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]

# Enough for the test sentences to tokenize into real pieces (the rest become [UNK]).
_SMALL_VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"()-/&$%")
    + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    + (
        "the a an of to in on and for is was are with as by at from that this it be has have after over "
        "stocks market shares bank rates investors wall street oil prices team game season win won cup "
        "match coach league players world president government minister election war police people "
        "software computer internet google apple microsoft space nasa science research new says said "
        "year years first two three"
    ).split()
)


def bert_vocab_file(tmp_dir: Path) -> Path:
    """The real bert-base-uncased vocab.txt under $LLMLAB_DATA, else a small one written under tmp_dir."""
    root = os.environ.get("LLMLAB_DATA")
    if root:
        real = Path(root) / "tokenizers" / "bert-base-uncased" / "vocab.txt"
        if real.is_file():
            return real
    path = tmp_dir / "small-vocab" / "vocab.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(dict.fromkeys(_SMALL_VOCAB)) + "\n")
    return path


def save_tiny_bert(out: Path, vocab_file: Path, seed: int = 0, max_position_embeddings: int = 128) -> Path:
    """A 2-layer, 32-wide random BERT classifier and its tokenizer, written with save_pretrained to `out`."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    vocab_size = sum(1 for line in vocab_file.read_text().splitlines() if line)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_position_embeddings,
        # A wide init so that different texts get clearly different predictions (not all ~0.25).
        initializer_range=0.5,
        id2label=dict(enumerate(AG_NEWS_LABELS)),
        label2id={label: i for i, label in enumerate(AG_NEWS_LABELS)},
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    # from_pretrained on the vocab's folder works across transformers 4 and 5; in 5,
    # BertTokenizerFast(vocab_file=...) silently ignores the file and builds a 5-token vocab.
    tokenizer = BertTokenizerFast.from_pretrained(str(vocab_file.parent))
    assert len(tokenizer) == vocab_size, (
        f"tokenizer has {len(tokenizer)} tokens, {vocab_file} has {vocab_size}"
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


TEXTS = [
    "Stocks rallied on Wall Street after the bank held rates.",
    "The team won the cup in the last game of the season.",
    "NASA says the new space telescope found water.",
    "Oil prices fell.",
    "The president and the minister met after the election to talk about the war and the police.",
    "Microsoft and Google release new software for the internet",
    "win",
    "Investors sold shares of Apple, Microsoft and Google as the market fell for three years in a row, "
    "the first time since the war; the president says the government has a new plan for the bank.",
]


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error_code(self) -> str:
        return self.json()["error"]["code"]


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | str | None = None,
    content_type: str | None = "application/json",
    headers: dict[str, str] | None = None,
    timeout: float = 20.0,
) -> Reply:
    """One HTTP request to 127.0.0.1:port on a fresh connection (bounded by `timeout`)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        hdrs = dict(headers or {})
        if content_type is not None and body is not None:
            hdrs.setdefault("Content-Type", content_type)
        conn.request(method, path, body=body.encode() if isinstance(body, str) else body, headers=hdrs)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def classify(port: int, texts: Any, timeout: float = 20.0) -> Reply:
    return request(port, "POST", "/v1/classify", json.dumps({"texts": texts}), timeout=timeout)


class FakeClassifier:
    """A model stand-in: labels by text length; can block on a gate or raise, to test the server's edges."""

    name = "fake"
    labels = ["short", "long"]
    max_length = 8

    def __init__(self, gate: threading.Event | None = None, fail_on: str | None = None):
        self.gate = gate
        self.fail_on = fail_on
        self.entered = threading.Event()
        self.calls: list[list[str]] = []

    def classify(self, texts: list[str]) -> list[dict[str, Any]]:
        self.calls.append(list(texts))
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)  # bounded: a test that forgets to open the gate still ends
        if self.fail_on is not None and self.fail_on in texts:
            raise RuntimeError(f"the model failed on {self.fail_on!r}")
        out = []
        for text in texts:
            p = 0.9 if len(text) > 10 else 0.1
            out.append(
                {
                    "label": "long" if p > 0.5 else "short",
                    "score": max(p, 1 - p),
                    "scores": {"short": 1 - p, "long": p},
                }
            )
        return out


# ------------------------------------------------------------------------------------------ language models
# The characters of the tiny LM's char-level vocabulary: ASCII letters, space, some punctuation and newline.
LM_CHARS = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?'-\n"


def save_tiny_lm_run(out: Path, seed: int = 0, block_size: int = 16) -> Path:
    """A shakespeare-gpt run directory as `llmlab run` writes it (config.json, tokenizer.json,
    model.safetensors), with a 2-layer, 16-wide GPT whose weights are random but far from uniform."""
    import dataclasses

    import torch

    from llmlab.config import to_dict
    from llmlab.data.lm_tokenizers import CharTokenizer
    from llmlab.models.gpt import GPT, GPTConfig
    from llmlab.recipes.gpt_lm import LMConfig
    from llmlab.train.checkpoint import save_weights

    cfg = LMConfig(model=GPTConfig(vocab_size=0, block_size=block_size, n_layer=2, n_head=2, n_embd=16))
    tok = CharTokenizer.train(LM_CHARS)
    torch.manual_seed(seed)
    model = GPT(dataclasses.replace(cfg.model, vocab_size=tok.vocab_size))
    with torch.no_grad():
        for p in model.parameters():  # a wide init, so that different prompts give clearly different texts
            p.normal_(0.0, 0.5)
    out.mkdir(parents=True, exist_ok=True)
    stored = {"recipe": "shakespeare-gpt", "preset": "smoke", "overrides": [], "config": to_dict(cfg)}
    (out / "config.json").write_text(json.dumps(stored))
    tok.save(out / "tokenizer.json")
    save_weights(out / "model.safetensors", model.state_dict())
    return out


def generate(port: int, body: Any, timeout: float = 20.0) -> Reply:
    return request(port, "POST", "/v1/generate", json.dumps(body), timeout=timeout)


class FakeLanguageModel:
    """A language-model stand-in: ASCII only, whitespace is no token; can block on a gate (stopping when
    asked), or raise, to test the server's edges."""

    name = "fake-lm"
    tokenizer_name = "fake-ascii"
    vocab_size = 128
    context_length = 8
    eos_id = None

    def __init__(self, gate: threading.Event | None = None, fail_on: str | None = None):
        self.gate = gate
        self.fail_on = fail_on
        self.entered = threading.Event()
        self.stopped = threading.Event()
        self.calls: list[tuple[list[int], Any, int, int]] = []

    def encode(self, text: str) -> list[int]:
        if any(ord(c) >= 128 for c in text):
            raise ValueError("only ASCII characters")
        return [ord(c) for c in text if not c.isspace()]

    def generate(self, prompt_ids, cfg, n, seed, should_stop=None):
        from llmlab.serve.generate import Completion, GenerationCancelled

        self.calls.append((list(prompt_ids), cfg, n, seed))
        self.entered.set()
        if self.gate is not None:
            deadline = time.monotonic() + 10  # bounded: a test that forgets to open the gate still ends
            while not self.gate.wait(0.01) and time.monotonic() < deadline:
                if should_stop is not None and should_stop():
                    self.stopped.set()
                    raise GenerationCancelled("stopped")
        if self.fail_on is not None and "".join(map(chr, prompt_ids)) == self.fail_on:
            raise RuntimeError(f"the model failed on {self.fail_on!r}")
        text = ("ab" * cfg.max_new_tokens)[: cfg.max_new_tokens]
        return [Completion(text, cfg.max_new_tokens, "length") for _ in range(n)]
