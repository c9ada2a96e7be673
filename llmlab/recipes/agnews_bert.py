"""Stage 4 recipe `agnews-bert`: fine-tune BERT on AG News with the Hugging Face stack, on the one Trainer.

The BERT fine-tuning recipe of Devlin et al. (2019, §4 and appendix A.3): the pretrained encoder plus a linear
head on the pooled [CLS] vector, AdamW at 2e-5 with weight decay 0.01 except on biases and LayerNorm, linear
warmup over the first 10% of the steps then linear decay to zero, a few epochs; AG News as in Sun et al.
(2019, "How to Fine-Tune BERT for Text Classification?"), whose bert-base figure is ~94.5-94.8% test accuracy.

This stage is about the Hugging Face ecosystem itself: the model is a plain `transformers` model
(AutoTokenizer + AutoModelForSequenceClassification), the engine HF Accelerate (`train.strategy=accelerate`,
the presets' default: llmlab/train/strategy_accelerate.py owns `prepare`, `backward`, `no_sync` and
`clip_grad_norm_`) inside the project's one Trainer loop, and the result a standard HF model directory
(`RUN_DIR/model/`) that `transformers.pipeline("text-classification", model=RUN_DIR/"model")` and `llmlab
serve` load as they are. Every other strategy works too (`train.strategy=ddp` takes the same steps).

Data parallelism (torchrun or `accelerate launch --multi_gpu`): `train.batch_size` is the GLOBAL batch of one
optimizer step, whatever the number of processes. A seeded sampler draws each global micro-batch
(`batch_size / grad_accum` rows) identically on every process and each process takes its contiguous share of
it, so N processes see what one process would, and the equality is tested (tests/recipes/). `accelerate
launch --cpu --num_processes N`, which starts one process, is refused (LaunchError).

Checkpoints (`--resume`) are the Trainer's: full weights, optimizer, schedule and every process's RNG state;
`checkpoints/latest` names the newest one `step-NNNNNNN`, as this recipe's runs always have."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.config import ConfigError
from llmlab.data.store import DataMissingError
from llmlab.recipes.base import BuildContext, Experiment, Recipe, Target
from llmlab.train.callbacks import Callback
from llmlab.train.checkpoint import CheckpointError
from llmlab.train.config import OptimConfig, ScheduleConfig, TrainConfig
from llmlab.train.optim import build_optimizer
from llmlab.train.strategy_accelerate import LaunchError as LaunchError  # the launch guards (re-exported)
from llmlab.train.strategy_accelerate import check_world_size
from llmlab.train.tasks import StepOutput

VOCAB_DIR = Path("tokenizers") / "bert-base-uncased"  # under the data root: vocab.txt (+ tokenizer config)
CARVED_NOTE = "trained on part of the official test split; not comparable to published figures"


class ModelUnavailableError(DataMissingError):
    """The model or tokenizer cannot be loaded (not on disk, and the Hub cannot be reached)."""


# ------------------------------------------------------------------------------------------- configs
@dataclass
class TinyBertConfig:
    """Shape of the tiny random BERT (`model.tiny_random=true`): no pretraining, bert-base-uncased's vocab."""

    hidden: int = 64
    layers: int = 2
    heads: int = 2
    intermediate: int = 256
    init_seed: int = 0  # its random weights are a function of this and the shape (cached, shared by all runs)

    def __post_init__(self) -> None:
        if min(self.hidden, self.layers, self.heads, self.intermediate) < 1:
            raise ValueError("model.tiny sizes must be >= 1")
        if self.hidden % self.heads:
            raise ValueError(f"model.tiny.hidden={self.hidden} is not divisible by heads={self.heads}")


@dataclass
class BertModelConfig:
    name_or_path: str = "bert-base-uncased"  # a Hub id or a local HF model directory
    tiny_random: bool = False  # ignore name_or_path: a tiny randomly initialised BERT (offline, tests, CPU)
    max_length: int = 128  # tokens kept per article ([CLS] and [SEP] included)
    dropout: float | None = None  # None: the model's own (0.1 for BERT); 0: off (exact multi-process tests)
    tiny: TinyBertConfig = field(default_factory=TinyBertConfig)

    def __post_init__(self) -> None:
        if self.max_length < 8:
            raise ValueError("model.max_length must be >= 8")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError("model.dropout must be in [0, 1) (or none)")


@dataclass
class AgNewsDataConfig:
    """`full`: the official train split less `val_size` articles (stratified) for validation, the official
    test split as test. `carve-from-test`: disjoint stratified train / val / test parts of the 7,600 official
    test articles (what the lab's shared data allows; not comparable to published figures)."""

    source: Literal["full", "carve-from-test"] = "full"
    train_size: int | None = None  # None: all that is left
    val_size: int = 5000
    test_size: int | None = None  # carve-from-test only (None: all that is left); full: the official 7,600
    split_seed: int = 1234  # the parts are fixed whatever the run's seed, so runs compare on one split

    def __post_init__(self) -> None:
        if self.val_size < 1:
            raise ValueError("data.val_size must be >= 1")
        for name in ("train_size", "test_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"data.{name} must be >= 1 (or none)")


@dataclass
class AgNewsBertConfig:
    seed: int = 0
    model: BertModelConfig = field(default_factory=BertModelConfig)
    data: AgNewsDataConfig = field(default_factory=AgNewsDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(strategy="accelerate"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adamw", lr=2e-5, weight_decay=0.01))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="linear", warmup_frac=0.1))


# ------------------------------------------------------------------------------------------- presets
def default() -> AgNewsBertConfig:
    """bert-base-uncased from the Hub on the full AG News, on a GPU (bf16): the published recipe."""
    return AgNewsBertConfig(
        model=BertModelConfig(name_or_path="bert-base-uncased", max_length=128),
        data=AgNewsDataConfig(source="full", val_size=5000),
        train=TrainConfig(
            batch_size=32,
            max_epochs=3,
            eval_every=1000,
            log_every=50,
            precision="auto",
            grad_clip=1.0,
            strategy="accelerate",
        ),
        optim=OptimConfig(name="adamw", lr=2e-5, weight_decay=0.01),
        schedule=ScheduleConfig(name="linear", warmup_frac=0.1),
    )


def cpu() -> AgNewsBertConfig:
    """A tiny random BERT on the 7,600 official test articles carved 6,000 / 800 / 800: minutes on 2 cores."""
    return AgNewsBertConfig(
        model=BertModelConfig(
            tiny_random=True,
            max_length=96,
            tiny=TinyBertConfig(hidden=128, layers=2, heads=4, intermediate=512),
        ),
        data=AgNewsDataConfig(source="carve-from-test", train_size=6000, val_size=800, test_size=800),
        train=TrainConfig(
            batch_size=32,
            max_epochs=4,
            eval_every=0,
            log_every=25,
            precision="fp32",
            grad_clip=1.0,
            strategy="accelerate",
        ),
        optim=OptimConfig(name="adamw", lr=1e-3, weight_decay=0.01),
        schedule=ScheduleConfig(name="linear", warmup_frac=0.1),
    )


def smoke() -> AgNewsBertConfig:
    """A tiny random BERT on 640 carved articles (512 train), 3 short epochs: seconds, no Hub (for tests)."""
    return AgNewsBertConfig(
        model=BertModelConfig(
            tiny_random=True,
            max_length=48,
            tiny=TinyBertConfig(hidden=64, layers=2, heads=2, intermediate=256),
        ),
        data=AgNewsDataConfig(source="carve-from-test", train_size=512, val_size=64, test_size=64),
        train=TrainConfig(
            batch_size=8,
            max_epochs=3,
            eval_every=64,
            log_every=8,
            precision="fp32",
            grad_clip=1.0,
            strategy="accelerate",
        ),
        optim=OptimConfig(name="adamw", lr=2e-3, weight_decay=0.01),
        schedule=ScheduleConfig(name="linear", warmup_frac=0.1),
    )


# ------------------------------------------------------------------------------------------- data
def load_splits(
    cfg: AgNewsDataConfig, data_dir: Path | None
) -> tuple[dict[str, list], tuple[str, ...], str, list]:
    """{"train", "val", "test"} → Examples, the class names, a one-line description and notes."""
    from llmlab.data.agnews import MIRROR, label_counts, load_agnews, stratified_carve

    data = load_agnews(data_dir)
    notes = list(data.notes)
    if cfg.source == "full":
        if data.train is None:
            raise DataMissingError(
                f"agnews-bert data.source=full needs the official train split: train.csv is not in "
                f"{data.source}/ (only the test split is there). Either place train.csv there (from "
                f"{MIRROR}), or train on parts of the test split: data.source=carve-from-test (as the cpu "
                "and smoke presets do).",
                dataset="ag_news",
                missing=["train.csv"],
            )
        if cfg.test_size is not None:
            raise ConfigError(
                "data.test_size is for data.source=carve-from-test; full uses the official test"
            )
        try:
            parts = stratified_carve(
                data.train, {"val": cfg.val_size, "train": cfg.train_size}, cfg.split_seed
            )
        except ValueError as e:
            raise ConfigError(f"data sizes: {e}") from e
        parts["test"] = data.test
        origin = "official train split (val carved from it), official test split"
    else:
        sizes = {"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size}
        if cfg.train_size is None and cfg.test_size is None:
            raise ConfigError("data.source=carve-from-test: set data.train_size or data.test_size")
        try:
            parts = stratified_carve(data.test, sizes, cfg.split_seed)
        except ValueError as e:
            raise ConfigError(f"data sizes: {e}") from e
        origin = f"carved (stratified, seed {cfg.split_seed}) from the 7,600-article official test split"
        notes.insert(0, f"AG News: {CARVED_NOTE}.")
    splits = {k: parts[k] for k in ("train", "val", "test")}
    sizes_text = " / ".join(f"{len(splits[s])} {s}" for s in splits)
    per_class = ", ".join(f"{s} {label_counts(splits[s])}" for s in splits)
    description = f"AG News (Zhang et al. 2015) from {data.source}: {sizes_text}; {origin}"
    notes.append(f"Articles per class: {per_class}.")
    return splits, data.classes, description, notes


class TokenizedSplit:
    """Token ids per article (truncated, unpadded) and labels."""

    def __init__(self, ids: list[list[int]], labels: list[int]) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, rows: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        """Articles `rows`, right-padded to the longest of them: {input_ids, attention_mask, labels}."""
        width = max(len(self.ids[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
        for row, i in enumerate(rows):
            input_ids[row, : len(self.ids[i])] = torch.tensor(self.ids[i], dtype=torch.long)
            mask[row, : len(self.ids[i])] = 1
        labels = torch.tensor([self.labels[i] for i in rows], dtype=torch.long)  # [B]
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def tokenize_split(tokenizer: Any, rows: list, max_length: int) -> TokenizedSplit:
    enc = tokenizer([r.text for r in rows], truncation=True, max_length=max_length)
    return TokenizedSplit(list(enc["input_ids"]), [r.label for r in rows])


class GlobalBatchSampler:
    """Global micro-batches of one epoch: a permutation drawn from (seed, epoch), cut into runs of
    `micro_size` rows, whole optimizer steps only (`accum` micro-batches each; the incomplete rest is
    dropped). Identical on every process (each takes its contiguous share of each micro-batch: ShareLoader).
    Iterating it yields the micro-batches from the one `skip` names (resume)."""

    def __init__(self, n: int, micro_size: int, accum: int, seed: int) -> None:
        self.n, self.batch_size, self.accum, self.seed = n, micro_size, accum, seed
        self.epoch, self.start = 0, 0
        self.steps_per_epoch = n // (micro_size * accum)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the training set ({n} articles) is smaller than one batch ({micro_size * accum})"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, start: int) -> None:
        self.start = start  # until the next `skip`

    def global_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        count = self.steps_per_epoch * self.accum
        return [order[b * self.batch_size : (b + 1) * self.batch_size] for b in range(count)]

    def __iter__(self):
        yield from self.global_batches()[self.start :]

    def __len__(self) -> int:
        return self.steps_per_epoch * self.accum - self.start


class ShareLoader:
    """The Trainer's training loader: `len` optimizer steps per epoch, `set_epoch`, `iter_from(step)`. Of
    every global micro-batch of the sampler this process takes its contiguous share (rows [rank * share,
    (rank + 1) * share)); one optimizer step's shares come concatenated, micro-batch after micro-batch, so the
    Trainer's split into `grad_accum` equal parts hands the model exactly those shares."""

    def __init__(self, split: TokenizedSplit, sampler: GlobalBatchSampler, pad_id: int, rank: int,
                 world: int) -> None:  # fmt: skip
        self.split, self.sampler, self.pad_id = split, sampler, pad_id
        self.share = sampler.batch_size // world
        self.first = rank * self.share

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def iter_from(self, start: int):
        accum, lo, hi = self.sampler.accum, self.first, self.first + self.share
        micro = self.sampler.global_batches()
        for step in range(start, len(self)):
            rows = [i for batch in micro[step * accum : (step + 1) * accum] for i in batch[lo:hi]]
            yield self.split.batch(rows, self.pad_id)

    def __iter__(self):
        return self.iter_from(0)


class ShareEvalLoader:
    """A whole split in order, in global batches of `batch_size` articles; this process gets its contiguous
    share of each (an empty share of a last, small batch is skipped). The Trainer sums over processes."""

    def __init__(self, split: TokenizedSplit, batch_size: int, pad_id: int, rank: int, world: int) -> None:
        self.split, self.batch_size, self.pad_id = split, batch_size, pad_id
        self.rank, self.world = rank, world

    def __iter__(self):
        n = len(self.split)
        for start in range(0, n, self.batch_size):
            rows = torch.arange(start, min(n, start + self.batch_size)).tensor_split(self.world)[self.rank]
            if len(rows):
                yield self.split.batch(rows.tolist(), self.pad_id)


class SequenceClassificationTask:
    """Cross-entropy of a Hugging Face sequence-classification model on padded batches {input_ids,
    attention_mask, labels}: loss and accuracy. Each (micro-)batch is cut to its own longest article first:
    the Trainer splits a process's share of a global batch into micro-batches, which were padded together."""

    unit = "samples"

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        mask = batch["attention_mask"]  # [B, T], right-padded
        width = int(mask.sum(dim=1).max())
        out = model(input_ids=batch["input_ids"][:, :width], attention_mask=mask[:, :width])
        logits = out.logits  # [B, K]
        labels = batch["labels"]  # [B]
        loss = F.cross_entropy(logits.float(), labels)  # the softmax in fp32 under autocast
        correct = (logits.detach().argmax(dim=-1) == labels).sum().float()
        return StepOutput(loss=loss, n=labels.shape[0], sums={"correct": correct})

    def metrics(self, loss_sum: float, n: float, sums: dict[str, float]) -> dict[str, float]:
        return {"loss": loss_sum / n, "accuracy": sums["correct"] / n}


# ------------------------------------------------------------------------------------------- model
def tiny_random_bert(tiny: TinyBertConfig, data_dir: Path | None) -> Path:
    """A tiny randomly initialised BertModel with the real bert-base-uncased vocab and tokenizer, saved once
    into the cache (`cache_dir()/models/`) and loaded from there as any HF model directory. Its weights depend
    only on `tiny` (seeded), so every run and process gets the same ones."""
    from llmlab.data.store import cache_dir, data_root_source

    root, root_source = data_root_source(data_dir)
    vocab_dir = root / VOCAB_DIR
    vocab = vocab_dir / "vocab.txt"
    if not vocab.is_file():
        raise DataMissingError(
            f"model.tiny_random=true needs the bert-base-uncased vocabulary: {vocab} not found (data root "
            f"from {root_source}). It is the standard 30,522-line vocab.txt of bert-base-uncased (data "
            "MANIFEST section 8; https://huggingface.co/bert-base-uncased/blob/main/vocab.txt). Place it "
            "there, or point LLMLAB_DATA (or --data-dir) at a folder that has "
            "tokenizers/bert-base-uncased/vocab.txt.",
            dataset="tokenizers",
            missing=[str(vocab)],
            root=root,
        )
    key = hashlib.sha256(vocab.read_bytes() + json.dumps(tiny.__dict__, sort_keys=True).encode()).hexdigest()
    target = cache_dir() / "models" / f"tiny-bert-{key[:16]}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(vocab_dir))
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden,
        num_hidden_layers=tiny.layers,
        num_attention_heads=tiny.heads,
        intermediate_size=tiny.intermediate,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.init_seed)
        model = BertModel(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic; another process may have won the race with identical files
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _dropout_kwargs(dropout: float | None) -> dict[str, float]:
    if dropout is None:
        return {}
    # BERT-family config names (BertConfig, RobertaConfig, ...).
    return {
        "hidden_dropout_prob": dropout,
        "attention_probs_dropout_prob": dropout,
        "classifier_dropout": dropout,
    }


def load_model_and_tokenizer(
    cfg: BertModelConfig, classes: tuple[str, ...], data_dir: Path | None
) -> tuple[Any, Any, str]:
    """(sequence-classification model with `id2label` = the class names, its tokenizer, its source)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = str(tiny_random_bert(cfg.tiny, data_dir)) if cfg.tiny_random else cfg.name_or_path
    labels = {i: name for i, name in enumerate(classes)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=len(classes),
            id2label=labels,
            label2id={name: i for i, name in labels.items()},
            **_dropout_kwargs(cfg.dropout),
        )
    except OSError as e:  # not a local directory, and not on the Hub or in its cache (e.g. offline)
        raise ModelUnavailableError(
            f"cannot load model.name_or_path={cfg.name_or_path!r}: {e}\nIt must be a local HF model "
            "directory or a Hub id reachable now (or already in the HF cache, ~/.cache/huggingface). "
            "Offline, try model.tiny_random=true (a tiny random BERT with the bert-base-uncased vocab from "
            "the data root).",
            dataset="model",
        ) from e
    return model, tokenizer, source


def save_model_directory(model: nn.Module, run_dir: Path, tokenizer: Any, max_length: int) -> None:
    """The trained model as a Hugging Face directory, RUN_DIR/model/ (config with the class names, weights,
    tokenizer), what `transformers.pipeline` and `llmlab serve` load."""
    target = run_dir / "model"
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.model_max_length = max_length  # the training length: what `truncation=True` cuts inputs to
    tokenizer.save_pretrained(target)


def load_model_directory(model: nn.Module, run_dir: Path) -> None:
    """A finished run's weights from RUN_DIR/model/ into `model` (`llmlab eval`)."""
    from transformers import AutoModelForSequenceClassification

    model_dir = Path(run_dir) / "model"
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{run_dir} has no saved model ({model_dir}/config.json); did the run finish?")
    saved = AutoModelForSequenceClassification.from_pretrained(str(model_dir))
    model.load_state_dict(saved.state_dict())


class CheckpointAlias(Callback):
    """`checkpoints/latest` names the newest checkpoint `step-NNNNNNN`, a link to the Trainer's folder
    `step_NNNNNNNN`: the layout agnews-bert's runs had when the recipe carried a loop of its own (its tests
    read it). Links whose folder the Trainer has pruned are removed. Main process only, as the event is."""

    def on_checkpoint(self, trainer: Any, path: Path) -> None:
        from llmlab.fileio import atomic_write_text

        root = path.parent
        for link in root.glob("step-*"):
            if link.is_symlink() and not link.exists():
                link.unlink()
        alias = root / f"step-{trainer.step:07d}"
        try:
            if alias.is_symlink():
                alias.unlink()
            alias.symlink_to(path.name, target_is_directory=True)
        except OSError:
            return  # no links on this filesystem: `latest` keeps the Trainer's own name
        atomic_write_text(root / "latest", alias.name)


def check_batch(batch_size: int, grad_accum: int, world: int) -> None:
    if batch_size % (grad_accum * world):
        raise ConfigError(
            f"train.batch_size={batch_size} (the global batch) must be divisible by "
            f"train.grad_accum={grad_accum} x {world} process(es), so every process gets equal micro-batches"
        )


# ------------------------------------------------------------------------------------------- the recipe
class AgNewsBert(Recipe):
    name = "agnews-bert"
    description = (
        "Stage 4: fine-tune BERT on AG News with the HF stack on the Trainer (train.strategy=accelerate; "
        "a standard HF model directory as result)"
    )
    dataset = "ag_news"
    config_cls = AgNewsBertConfig
    presets = {"default": default, "cpu": cpu, "smoke": smoke}
    smoke_needs_data = True  # the bert-base-uncased vocab and the AG News test CSV
    preset_help = {
        "default": "bert-base-uncased (Hub) on the full AG News, 3 epochs, bf16 on a GPU (~94.5% test; needs "
        "train.csv and the Hub: not runnable in the offline lab)",
        "cpu": "tiny random BERT on the 7,600 test articles carved 6000/800/800, minutes on 2 CPU cores",
        "smoke": "tiny random BERT on 640 carved articles, seconds, no Hub (the test suite)",
    }
    targets = {
        "default": Target("test/accuracy", 0.94),
        "cpu": Target("test/accuracy", 0.8),
        "smoke": Target("test/accuracy", 0.4),
    }

    def build(self, cfg: AgNewsBertConfig, ctx: BuildContext) -> Experiment:
        tc, world, rank = cfg.train, ctx.dist.world_size, ctx.dist.rank
        check_world_size(world, os.environ)  # the launch traps (any strategy), before anything is written
        check_batch(tc.batch_size, tc.grad_accum, world)
        rows, classes, description, notes = load_splits(cfg.data, ctx.data_dir)
        model, tokenizer, source = load_model_and_tokenizer(cfg.model, classes, ctx.data_dir)
        splits = {name: tokenize_split(tokenizer, part, cfg.model.max_length) for name, part in rows.items()}
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        micro = tc.batch_size // tc.grad_accum  # global rows of one micro-batch
        sampler = GlobalBatchSampler(len(splits["train"]), micro, tc.grad_accum, cfg.seed)
        eval_size = tc.eval_batch_size or 2 * tc.batch_size
        truncated = sum(len(ids) >= cfg.model.max_length for ids in splits["train"].ids) / len(
            splits["train"]
        )
        if cfg.model.tiny_random:
            t = cfg.model.tiny
            notes.append(
                f"Model: a tiny RANDOMLY INITIALISED BERT ({t.layers} layers, hidden {t.hidden}, {t.heads} "
                f"heads; no pretraining) with the bert-base-uncased vocabulary, from {source}: its accuracy "
                "shows the pipeline learns, not what BERT reaches."
            )
        else:
            notes.append(f"Model: {source} (AutoModelForSequenceClassification, a new linear head on [CLS]).")
        notes.append(
            f"Articles truncated to {cfg.model.max_length} tokens ({100 * truncated:.1f}% of train reach "
            f"it); global batch {tc.batch_size} = {world} process(es) x {tc.grad_accum} "
            f"micro-batch(es) x {tc.batch_size // (world * tc.grad_accum)} articles; the Trainer with "
            f"train.strategy={tc.strategy}, final model saved as a Hugging Face directory in model/."
        )
        return Experiment(
            model=model,
            task=SequenceClassificationTask(),
            optimizer=build_optimizer(model, cfg.optim),
            train_loader=ShareLoader(splits["train"], sampler, pad_id, rank, world),
            eval_loaders={"val": ShareEvalLoader(splits["val"], eval_size, pad_id, rank, world)},
            final_loaders={"test": ShareEvalLoader(splits["test"], eval_size, pad_id, rank, world)},
            data_description=description,
            notes=notes,
            callbacks=[CheckpointAlias()],
            save_model=partial(save_model_directory, tokenizer=tokenizer, max_length=cfg.model.max_length),
            load_model=load_model_directory,
        )
