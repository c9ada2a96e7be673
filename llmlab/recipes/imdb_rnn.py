"""Stage 3 recipes: sentiment on IMDB (Maas et al. 2011) with an LSTM (`imdb-lstm`) or a GRU (`imdb-gru`).

Pipeline: clean (`<br />`), lowercase, split into words; a vocabulary built on the training split only (saved
with the run as vocab.json); truncation ("head+tail" keeps the start and the end of long reviews) and
length-bucketed batches, so almost no compute goes to padding. Model: embedding → bidirectional LSTM/GRU →
max-pooling over time → linear (llmlab/models/rnn.py); the fused torch.nn layers by default, llmlab's own
from-scratch layers with `model.impl=scratch`. The LSTM preset has 192 units per direction and ends with the
mean of its weights after every step of the last 40% of the run (`train.weight_average=swa`); the GRU's has
128 and its last weights. 2,500 training reviews are held out (stratified) as the
validation split; the test set is evaluated once, at the end. Every run also reports a baseline anyone can
check: TF-IDF (word uni+bigrams) + logistic regression, its C chosen on the validation split.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Literal

import torch

from llmlab.config import ConfigError
from llmlab.data.bucket import BucketLoader
from llmlab.models.rnn import RNNClassifierConfig, build_rnn_classifier
from llmlab.recipes.base import BuildContext, Experiment, Recipe, Target
from llmlab.train.callbacks import Callback
from llmlab.train.config import OptimConfig, ScheduleConfig, TrainConfig
from llmlab.train.optim import build_optimizer
from llmlab.train.tasks import ClassificationTask

SPLIT_SEED = 1234  # fixed validation split, whatever the run's seed


@dataclass
class ImdbDataConfig:
    source: Literal["imdb", "synthetic"] = "imdb"
    val_size: int = 2500  # held out of the 25,000 training reviews (stratified)
    train_limit: int | None = None  # train on the first N remaining reviews only (quick runs)
    max_len: int = 400  # tokens kept per review
    truncation: Literal["head", "tail", "head+tail"] = "head+tail"
    min_freq: int = 2  # vocabulary: words seen at least this often in train (size capped by model.vocab_size)
    bucket_batches: int = 50  # sort by length within chunks of this many batches
    synthetic_train: int = 1024
    synthetic_eval: int = 256

    def __post_init__(self) -> None:
        if self.max_len < 1 or self.min_freq < 1 or self.bucket_batches < 1 or self.val_size < 1:
            raise ValueError("max_len, min_freq, bucket_batches and val_size must be >= 1")


@dataclass
class ImdbRNNConfig:
    seed: int = 0
    baseline: bool = True  # also fit and report TF-IDF + logistic regression
    model: RNNClassifierConfig = field(default_factory=RNNClassifierConfig)
    data: ImdbDataConfig = field(default_factory=ImdbDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


# ------------------------------------------------------------------------------------------- presets
def _default(cell: str) -> ImdbRNNConfig:
    # The LSTM: 192 units and the mean of its weights over the last 40% of the run (SWA) lift its 3-seed val
    # and test means over 128 units and the last weights (docs/results.md, "imdb-lstm's preset since
    # 2026-12-03"); the GRU meets its goal with 128 units and its last weights.
    lstm = cell == "lstm"
    return ImdbRNNConfig(
        model=RNNClassifierConfig(
            cell=cell,
            vocab_size=30_000,
            embed_dim=128,
            hidden=192 if lstm else 128,
            bidirectional=True,
            dropout=0.4,
            pooling="max",
        ),
        train=TrainConfig(
            batch_size=64,
            max_epochs=5,
            eval_every=0,
            log_every=50,
            precision="fp32",
            grad_clip=1.0,
            weight_average="swa" if lstm else "none",
            average_start=0.6 if lstm else 0.0,
        ),
        optim=OptimConfig(name="adamw", lr=4e-3, weight_decay=0.01),
        schedule=ScheduleConfig(name="cosine", warmup_frac=0.05, min_lr_ratio=0.05),
    )


def _smoke(cell: str) -> ImdbRNNConfig:
    cfg = _default(cell)
    cfg.model = RNNClassifierConfig(cell=cell, vocab_size=500, embed_dim=32, hidden=32, dropout=0.1)
    cfg.data = ImdbDataConfig(source="synthetic", val_size=128, max_len=64, min_freq=1)
    cfg.train = TrainConfig(
        batch_size=32, max_epochs=3, eval_every=0, log_every=8, precision="fp32", grad_clip=1.0
    )
    cfg.optim = OptimConfig(name="adamw", lr=5e-3, weight_decay=0.01)
    return cfg


# ------------------------------------------------------------------------------------------- data
_SYNTH_WORDS = [f"w{i}" for i in range(300)]


def _synthetic_reviews(n: int, split: str) -> tuple[list[str], list[int]]:
    """Two 'sentiments' that differ in how often 20 marker words appear among 300 filler words."""
    rng = random.Random(f"{SPLIT_SEED}-{split}")
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        markers = _SYNTH_WORDS[:10] if label else _SYNTH_WORDS[10:20]
        words = [
            rng.choice(markers) if rng.random() < 0.15 else rng.choice(_SYNTH_WORDS[20:])
            for _ in range(rng.randint(8, 60))
        ]
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def load_texts(cfg: ImdbDataConfig, ctx: BuildContext) -> tuple[dict[str, tuple[list[str], list[int]]], str]:
    """{"train", "val", "test"} → (texts, labels), and a one-line description."""
    if cfg.source == "synthetic":
        splits = {
            "train": _synthetic_reviews(cfg.synthetic_train, "train"),
            "val": _synthetic_reviews(cfg.synthetic_eval, "val"),
            "test": _synthetic_reviews(cfg.synthetic_eval, "test"),
        }
        return splits, f"synthetic two-class word sequences ({cfg.synthetic_train} train)"
    from llmlab.data.imdb import load_imdb, train_val_split
    from llmlab.data.store import data_root

    data = load_imdb(data_root(ctx.data_dir))
    if cfg.val_size >= len(data.train):
        raise ConfigError(f"data.val_size={cfg.val_size} leaves no training data ({len(data.train)} reviews)")
    train, val = train_val_split(data.train, cfg.val_size, SPLIT_SEED)
    if cfg.train_limit is not None:
        train = train[:: max(1, len(train) // cfg.train_limit)][: cfg.train_limit]  # both classes, evenly
    splits = {
        name: ([r.text for r in rs], [r.label for r in rs])
        for name, rs in (("train", train), ("val", val), ("test", data.test))
    }
    sizes = " / ".join(f"{len(splits[s][1])} {s}" for s in ("train", "val", "test"))
    return splits, f"IMDB from {data.source} ({sizes})"


# ------------------------------------------------------------------------------------------- baseline
class TfidfBaseline(Callback):
    """TF-IDF (uni+bigrams, sublinear tf) + logistic regression; C picked on validation, test scored once.
    Added to the run's final metrics as `baseline_tfidf/...`. Cached by the data it was fit on."""

    C_GRID = (1.0, 4.0, 16.0, 64.0, 256.0)

    def __init__(self, splits: dict[str, tuple[list[str], list[int]]]) -> None:
        self.splits = splits

    def on_train_end(self, trainer) -> None:
        if "test/accuracy" not in trainer.final_metrics:  # the run did not finish: nothing to compare with
            return
        trainer.final_metrics.update(self.fit())

    def _key(self) -> str:
        h = hashlib.sha256(repr(self.C_GRID).encode())
        for name in ("train", "val", "test"):
            texts, labels = self.splits[name]
            h.update(name.encode())
            for t, y in zip(texts, labels, strict=True):
                h.update(f"{y}\x00{t}\x01".encode())
        return h.hexdigest()[:32]

    def fit(self) -> dict[str, float]:
        from llmlab.data.store import cache_dir
        from llmlab.fileio import atomic_write_text

        path = cache_dir() / "baselines" / f"tfidf-lr-{self._key()}.json"
        if path.exists():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:
                pass
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        from llmlab.data.text import clean_text, tokenize

        vec = TfidfVectorizer(
            preprocessor=clean_text,
            tokenizer=tokenize,
            token_pattern=None,
            lowercase=False,
            ngram_range=(1, 2),
            min_df=2,
            max_df=0.95,
            sublinear_tf=True,
        )
        x_train = vec.fit_transform(self.splits["train"][0])
        x_val, x_test = vec.transform(self.splits["val"][0]), vec.transform(self.splits["test"][0])
        y_train, y_val, y_test = (self.splits[s][1] for s in ("train", "val", "test"))
        best = None
        for c in self.C_GRID:
            clf = LogisticRegression(C=c, max_iter=2000).fit(x_train, y_train)
            acc = clf.score(x_val, y_val)
            if best is None or acc > best[0]:
                best = (acc, c, clf)
        val_acc, c, clf = best
        result = {
            "baseline_tfidf/val_accuracy": float(val_acc),
            "baseline_tfidf/test_accuracy": float(clf.score(x_test, y_test)),
            "baseline_tfidf/C": float(c),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(result))
        return result


# ------------------------------------------------------------------------------------------- recipes
class _ImdbRecipe(Recipe):
    dataset = "imdb"
    config_cls = ImdbRNNConfig
    cell: str

    def build(self, cfg: ImdbRNNConfig, ctx: BuildContext) -> Experiment:
        from llmlab.data.text import Vocab, encode_corpus, tokenize

        splits, description = load_texts(cfg.data, ctx)
        train_tokens = [tokenize(t) for t in splits["train"][0]]
        vocab = Vocab.build(train_tokens, min_freq=cfg.data.min_freq, max_size=cfg.model.vocab_size)
        d, device = ctx.dist, ctx.device

        def tensors(name: str) -> tuple[torch.Tensor, ...]:
            texts = train_tokens if name == "train" else splits[name][0]
            tokens, lengths = encode_corpus(
                texts, vocab, cfg.data.max_len, cfg.data.truncation, cache=cfg.data.source == "imdb"
            )
            keep = lengths > 0  # an empty review cannot be packed; IMDB has none
            labels = torch.tensor(splits[name][1], dtype=torch.int64)
            return tokens[keep].to(device), lengths[keep].to(device), labels[keep].to(device)

        train = BucketLoader(
            tensors("train"),
            cfg.train.batch_size,
            shuffle=True,
            drop_last=True,
            seed=cfg.seed,
            rank=d.rank,
            world_size=d.world_size,
            bucket_batches=cfg.data.bucket_batches,
        )
        eval_bs = cfg.train.eval_batch_size or 256

        def evaluation(name: str) -> BucketLoader:
            return BucketLoader(tensors(name), eval_bs, rank=d.rank, world_size=d.world_size)

        model = build_rnn_classifier(cfg.model)
        stats = vocab.stats()
        notes = [
            f"Vocabulary: {len(vocab):,} entries built on the training split (min frequency "
            f"{cfg.data.min_freq}), covering {100 * stats['train_coverage']:.2f}% of its "
            f"{stats['train_tokens']:,} tokens; saved as vocab.json.",
            f"Reviews truncated to {cfg.data.max_len} tokens ({cfg.data.truncation}); batches bucketed by "
            "length.",
        ]
        if cfg.model.impl == "scratch":
            notes.append("Recurrent layer: llmlab.nn.rnn (from scratch, proven equal to torch.nn in tests).")
        callbacks: list[Callback] = [TfidfBaseline(splits)] if cfg.baseline else []
        return Experiment(
            model=model,
            task=ClassificationTask(),
            optimizer=build_optimizer(model, cfg.optim),
            train_loader=train,
            eval_loaders={"val": evaluation("val")},
            final_loaders={"test": evaluation("test")},
            data_description=description,
            notes=notes,
            callbacks=callbacks,
            artifacts={"vocab.json": vocab.to_json},
        )


class ImdbLSTM(_ImdbRecipe):
    name = "imdb-lstm"
    cell = "lstm"
    description = "Stage 3: bidirectional LSTM sentiment classifier on IMDB (+ TF-IDF baseline)"
    presets = {"default": lambda: _default("lstm"), "smoke": lambda: _smoke("lstm")}
    preset_help = {
        "default": "real IMDB, BiLSTM 192, 5 epochs, SWA of the last 40%, on 2 CPU cores (~12 min)",
        "smoke": "synthetic word sequences, seconds (the test suite)",
    }
    targets = {"default": Target("test/accuracy", 0.88), "smoke": Target("test/accuracy", 0.85)}


class ImdbGRU(_ImdbRecipe):
    name = "imdb-gru"
    cell = "gru"
    description = "Stage 3: bidirectional GRU sentiment classifier on IMDB (+ TF-IDF baseline)"
    presets = {"default": lambda: _default("gru"), "smoke": lambda: _smoke("gru")}
    preset_help = {
        "default": "real IMDB, BiGRU 128, 5 epochs on 2 CPU cores (~19 min)",
        "smoke": "synthetic word sequences, seconds (the test suite)",
    }
    targets = {"default": Target("test/accuracy", 0.88), "smoke": Target("test/accuracy", 0.85)}
