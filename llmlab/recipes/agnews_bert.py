"""Stage 4 recipe `agnews-bert`: fine-tune BERT on AG News with Hugging Face Accelerate, in a loop of its own.

The BERT fine-tuning recipe of Devlin et al. (2019, §4 and appendix A.3): the pretrained encoder plus a linear
head on the pooled [CLS] vector, AdamW at 2e-5 with weight decay 0.01 except on biases and LayerNorm, linear
warmup over the first 10% of the steps then linear decay to zero, a few epochs; AG News as in Sun et al.
(2019, "How to Fine-Tune BERT for Text Classification?"), whose bert-base figure is ~94.5-94.8% test accuracy.

Why its own loop: this stage is about the Hugging Face ecosystem itself, so the step is Accelerate's
(`prepare`, `accumulate`, `backward`, `clip_grad_norm_`, `gather_for_metrics`), the model a plain
`transformers` model, and the result a standard HF model directory (`RUN_DIR/model/`) that
`transformers.pipeline("text-classification", model=RUN_DIR/"model")` and `llmlab serve` load as they are. The
run record is the same as every recipe's (the runner writes it; this loop emits the standard callback events).

Data parallelism (torchrun or `accelerate launch --multi_gpu`): `train.batch_size` is the GLOBAL batch of one
optimizer step, whatever the number of processes. A seeded sampler of ours draws each global micro-batch
(`batch_size / grad_accum` rows) identically on every process, Accelerate splits it into contiguous shares
(`split_batches=True`), and every step checks that this process got exactly its share (the rows carry their
index), so N processes see what one process would, and the equality is tested (tests/recipes/). Two known
traps are turned into errors: `accelerate launch --cpu --num_processes N` starts one process, and an
Accelerator that does not see the launcher's processes (a CPU-only machine without `cpu=True`) trains
unsynchronised copies.

Checkpoints (`--resume`): `accelerator.save_state` into `RUN_DIR/checkpoints/step-N/` (model, optimizer,
schedule, RNG states of every process) plus the loop's position (`loop.json`); a resumed run continues the
same batches."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch
import torch.nn.functional as F

from llmlab.config import ConfigError
from llmlab.data.store import DataMissingError
from llmlab.recipes.base import BuildContext, CustomLoop, Outcome, Recipe, Target
from llmlab.train.callbacks import Callback
from llmlab.train.checkpoint import CheckpointError
from llmlab.train.config import OptimConfig, ScheduleConfig, TrainConfig
from llmlab.train.optim import build_optimizer, build_scheduler

VOCAB_DIR = Path("tokenizers") / "bert-base-uncased"  # under the data root: vocab.txt (+ tokenizer config)
CARVED_NOTE = "trained on part of the official test split; not comparable to published figures"


class LaunchError(ConfigError):
    """The processes Accelerate sees are not the ones the launcher started."""


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
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adamw", lr=2e-5, weight_decay=0.01))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="linear", warmup_frac=0.1))


# ------------------------------------------------------------------------------------------- presets
def default() -> AgNewsBertConfig:
    """bert-base-uncased from the Hub on the full AG News, on a GPU (bf16): the published recipe."""
    return AgNewsBertConfig(
        model=BertModelConfig(name_or_path="bert-base-uncased", max_length=128),
        data=AgNewsDataConfig(source="full", val_size=5000),
        train=TrainConfig(
            batch_size=32, max_epochs=3, eval_every=1000, log_every=50, precision="auto", grad_clip=1.0
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
            batch_size=32, max_epochs=4, eval_every=0, log_every=25, precision="fp32", grad_clip=1.0
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
            batch_size=8, max_epochs=3, eval_every=64, log_every=8, precision="fp32", grad_clip=1.0
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


class TokenizedSplit(torch.utils.data.Dataset):
    """Token ids per article (truncated, unpadded) and labels; items carry their index, so the loop can check
    which rows each process received."""

    def __init__(self, ids: list[list[int]], labels: list[int]) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[int, list[int], int]:
        return i, self.ids[i], self.labels[i]


def tokenize_split(tokenizer: Any, rows: list, max_length: int) -> TokenizedSplit:
    enc = tokenizer([r.text for r in rows], truncation=True, max_length=max_length)
    return TokenizedSplit(list(enc["input_ids"]), [r.label for r in rows])


class PadCollate:
    """Pads a list of items to the longest in it: {index, input_ids, attention_mask, labels} tensors."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[tuple[int, list[int], int]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for _, ids, _ in items)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(items), width), dtype=torch.long)  # [B, T]
        for row, (_, ids, _) in enumerate(items):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = 1
        return {
            "index": torch.tensor([i for i, _, _ in items], dtype=torch.long),  # [B]
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": torch.tensor([y for _, _, y in items], dtype=torch.long),  # [B]
        }


class GlobalBatchSampler:
    """Global micro-batches of one epoch: a permutation drawn from (seed, epoch), cut into runs of
    `micro_size` rows, whole optimizer steps only (`accum` micro-batches each; the incomplete rest is
    dropped). Identical on every process; Accelerate (`split_batches=True`) hands each process its contiguous
    share of each one. `start` skips micro-batches (resume)."""

    drop_last = True

    def __init__(self, n: int, micro_size: int, accum: int, seed: int) -> None:
        self.n, self.batch_size, self.accum, self.seed = n, micro_size, accum, seed
        self.epoch, self.start = 0, 0
        self.steps_per_epoch = n // (micro_size * accum)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the training set ({n} articles) is smaller than one batch ({micro_size * accum})"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # Accelerate's loader calls this too, as each of its iterations starts

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


# ------------------------------------------------------------------------------------------- accelerate
def check_world_size(num_processes: int, env: dict[str, str] | os._Environ) -> None:
    """Raise LaunchError unless Accelerate sees the processes the launcher started (see the module doc)."""
    launched = int(env.get("WORLD_SIZE", "1"))
    if num_processes != launched:
        raise LaunchError(
            f"Accelerate sees {num_processes} process(es) but the launcher started WORLD_SIZE={launched}: "
            "the processes would train unsynchronised copies. On CPU, launch with `torchrun --nproc_per_node "
            "N -m llmlab run ...` (or `accelerate launch --multi_gpu --num_processes N -m llmlab run ... "
            "--device cpu`)."
        )
    if launched == 1 and env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in env:
        raise LaunchError(
            "`accelerate launch --cpu --num_processes N` starts ONE process on a CPU machine (accelerate's "
            "simple launcher), not N. Launch with `torchrun --nproc_per_node N -m llmlab run ...` (or "
            "`accelerate launch --multi_gpu --num_processes N -m llmlab run ... --device cpu`)."
        )


def mixed_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """(llmlab, Accelerate) names of `train.precision`; auto: bf16 (fp16) on CUDA, else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    return precision, {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def make_accelerator(device: torch.device, precision: str, grad_accum: int) -> Any:
    """A fresh Accelerator (the state of an earlier one in this process is dropped) that splits each global
    batch into contiguous per-process shares, on `device`'s type, with the launcher's processes (checked)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(
        cpu=device.type == "cpu",  # without it, processes on a CPU-only machine do not form a group
        mixed_precision=mixed_precision(precision, device)[1],
        gradient_accumulation_steps=grad_accum,
        dataloader_config=DataLoaderConfiguration(split_batches=True, even_batches=True),
        step_scheduler_with_optimizer=True,  # with split_batches: one schedule step per optimizer step
    )
    check_world_size(accelerator.num_processes, os.environ)
    return accelerator


class _LoopView:
    """What the callbacks read from the loop (the Trainer's attributes of the same names)."""

    def __init__(self, name: str, total_steps: int) -> None:
        self.name = name
        self.total_steps = total_steps
        self.step = 0
        self.task = SimpleNamespace(unit="samples")
        self.should_stop = False
        self.final_metrics: dict[str, float] = {}


@torch.no_grad()
def evaluate_split(
    model: Any, loader: Any, n_expected: int, accelerator: Any = None, autocast: Any = None
) -> dict:
    """Mean cross-entropy and accuracy over a whole split. Under Accelerate, each process evaluates its share
    and `gather_for_metrics` drops the rows repeated to even out the last batch; the count is checked."""
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for batch in loader:
        with autocast() if autocast is not None else contextlib.nullcontext():
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits  # [B, K]
        losses = F.cross_entropy(logits.float(), batch["labels"], reduction="none")  # [B]
        hits = (logits.argmax(dim=-1) == batch["labels"]).long()  # [B]
        if accelerator is not None:
            losses, hits = accelerator.gather_for_metrics((losses, hits))
        loss_sum += losses.double().sum().item()
        correct += int(hits.sum().item())
        n += hits.numel()
    model.train(was_training)
    if n != n_expected:
        raise RuntimeError(
            f"evaluation covered {n} articles, expected {n_expected} (duplicated or lost rows)"
        )
    return {"loss": loss_sum / n, "accuracy": correct / n}


# ------------------------------------------------------------------------------------------- the loop
class AgNewsBertLoop(CustomLoop):
    def __init__(
        self,
        cfg: AgNewsBertConfig,
        ctx: BuildContext,
        model: Any,
        tokenizer: Any,
        rows: dict[str, list],
        splits: dict[str, TokenizedSplit],
        classes: tuple[str, ...],
        data_description: str,
        notes: list[str],
    ) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.model, self.tokenizer = model, tokenizer
        self.rows, self.splits, self.classes = rows, splits, classes
        self.data_description = data_description
        self.notes = notes
        self.callbacks: list[Callback] = []
        self.artifacts = {}
        self.collate = PadCollate(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)

    # ----------------------------------------------------------------- evaluation of a saved run
    def evaluate(self, run_dir: Path, split: str) -> dict[str, float]:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if split not in self.splits:
            raise ConfigError(f"split {split!r} not available; choose from {', '.join(self.splits)}")
        model_dir = Path(run_dir) / "model"
        if not (model_dir / "config.json").is_file():
            raise CheckpointError(
                f"{run_dir} has no saved model ({model_dir}/config.json); did the run finish?"
            )
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).to(self.ctx.device)
        data = tokenize_split(tokenizer, self.rows[split], self.cfg.model.max_length)
        loader = torch.utils.data.DataLoader(
            data, batch_size=self._eval_batch_size(1), collate_fn=self.collate
        )
        device = self.ctx.device
        moved = ({k: v.to(device) for k, v in b.items()} for b in loader)
        precision = mixed_precision(self.cfg.train.precision, device)[0]
        autocast = None
        if precision != "fp32":
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            autocast = lambda: torch.autocast(device_type=device.type, dtype=dtype)  # noqa: E731
        return evaluate_split(model, moved, len(data), autocast=autocast)

    def _eval_batch_size(self, world: int) -> int:
        size = self.cfg.train.eval_batch_size or 2 * self.cfg.train.batch_size
        return math.ceil(size / world) * world  # split_batches needs a multiple of the process count

    # ----------------------------------------------------------------- training
    def fit(self, out: Path, callbacks: list[Callback], resume: bool, name: str) -> Outcome:
        cfg, tc = self.cfg, self.cfg.train
        precision = mixed_precision(tc.precision, self.ctx.device)[0]
        accelerator = make_accelerator(self.ctx.device, tc.precision, tc.grad_accum)
        world, rank = accelerator.num_processes, accelerator.process_index
        check_batch(tc.batch_size, tc.grad_accum, world)
        micro = tc.batch_size // tc.grad_accum  # global rows of one micro-batch
        share = micro // world  # this process's rows of one micro-batch

        sampler = GlobalBatchSampler(len(self.splits["train"]), micro, tc.grad_accum, cfg.seed)
        # Each loader gets a generator of its own: a DataLoader iterator draws a seed from its generator when
        # it starts, and drawing from the global RNG would move the dropout masks (after a resume, or with
        # eval_every) away from those of an uninterrupted run.
        train_dl = torch.utils.data.DataLoader(
            self.splits["train"], batch_sampler=sampler, collate_fn=self.collate, generator=torch.Generator()
        )
        eval_bs = self._eval_batch_size(world)
        eval_dls = {
            s: torch.utils.data.DataLoader(
                self.splits[s], batch_size=eval_bs, collate_fn=self.collate, generator=torch.Generator()
            )
            for s in ("val", "test")
        }
        optimizer = build_optimizer(self.model, cfg.optim)
        steps_per_epoch = sampler.steps_per_epoch
        if tc.max_steps is not None:
            total_steps = tc.max_steps
        else:
            total_steps = max(1, math.ceil(tc.max_epochs * steps_per_epoch))
        scheduler = build_scheduler(optimizer, cfg.schedule, total_steps)
        model, optimizer, train_dl, val_dl, test_dl, scheduler = accelerator.prepare(
            self.model, optimizer, train_dl, eval_dls["val"], eval_dls["test"], scheduler
        )

        view = _LoopView(name, total_steps)
        pos = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "train_time_s": 0.0, "units_seen": 0}
        ckpt_dir = out / "checkpoints"
        if resume:
            pos = self._restore(accelerator, ckpt_dir, pos, total_steps, world)
        view.step = pos["step"]

        def emit(event: str, *args: Any) -> None:
            for cb in callbacks:
                getattr(cb, event)(view, *args)

        def run_evals(names: tuple[str, ...]) -> None:
            for split in names:
                loader = val_dl if split == "val" else test_dl
                metrics = evaluate_split(model, loader, len(self.splits[split]), accelerator)
                view.final_metrics.update({f"{split}/{k}": v for k, v in metrics.items()})
                epoch = pos["epoch"] + pos["batch_in_epoch"] / steps_per_epoch
                record = {"step": pos["step"], "epoch": round(epoch, 4), "split": split}
                emit("on_log", {**record, "time_s": round(pos["train_time_s"], 3), **metrics})

        status, error, stop_reason = "completed", None, None
        interval = {"loss": 0.0, "correct": 0.0, "n": 0.0, "time": 0.0, "grad_norm": None}
        last_eval, last_ckpt = -1, pos["step"]
        emit("on_train_start")
        try:
            while pos["step"] < total_steps and stop_reason is None:
                epoch = pos["epoch"]
                train_dl.set_epoch(epoch)
                sampler.set_epoch(epoch)
                sampler.skip(pos["batch_in_epoch"] * tc.grad_accum)
                expected = sampler.global_batches()
                batches = iter(train_dl)
                while pos["step"] < total_steps:
                    tick = time.perf_counter()
                    model.train()
                    sums = torch.zeros(
                        4, dtype=torch.float64, device=accelerator.device
                    )  # loss·n, correct, n, stop
                    for k in range(tc.grad_accum):
                        batch = next(batches)
                        micro_index = pos["batch_in_epoch"] * tc.grad_accum + k
                        mine = expected[micro_index][rank * share : (rank + 1) * share]
                        if batch["index"].tolist() != mine:
                            raise RuntimeError(
                                f"process {rank} received rows {batch['index'].tolist()[:8]}... of "
                                f"micro-batch {micro_index}, not its contiguous share {mine[:8]}...: the "
                                "data sharding is not what this loop assumes"
                            )
                        with accelerator.accumulate(model):
                            logits = model(
                                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                            ).logits
                            loss = F.cross_entropy(logits.float(), batch["labels"])  # mean over this share
                            accelerator.backward(loss)  # divided by grad_accum; averaged over processes
                        rows = batch["labels"].numel()
                        sums[0] += loss.detach().double() * rows
                        sums[1] += (logits.detach().argmax(-1) == batch["labels"]).sum()
                        sums[2] += rows
                    if not accelerator.sync_gradients:
                        raise RuntimeError("gradients were not synchronised at the end of a global batch")
                    sums[3] = float(view.should_stop)
                    totals = accelerator.reduce(sums, reduction="sum")  # over processes
                    loss_value = (totals[0] / totals[2]).item()
                    if not math.isfinite(loss_value):
                        raise FloatingPointError(
                            f"training diverged at step {pos['step'] + 1}: the loss is {loss_value}. Try a "
                            "lower optim.lr, train.grad_clip=1.0, or train.precision=fp32."
                        )
                    if tc.grad_clip is not None:
                        interval["grad_norm"] = float(
                            accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)
                        )
                    lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)

                    pos["step"] += 1
                    pos["batch_in_epoch"] += 1
                    view.step = pos["step"]
                    epoch_end = pos["batch_in_epoch"] == steps_per_epoch
                    if epoch_end:
                        pos["epoch"], pos["batch_in_epoch"] = pos["epoch"] + 1, 0
                    if accelerator.device.type == "cuda":
                        torch.cuda.synchronize(accelerator.device)  # honest step times
                    elapsed = time.perf_counter() - tick
                    pos["train_time_s"] += elapsed
                    pos["units_seen"] += int(totals[2].item())
                    interval["loss"] += totals[0].item()
                    interval["correct"] += totals[1].item()
                    interval["n"] += totals[2].item()
                    interval["time"] += elapsed
                    emit("on_step_end", loss_value)
                    done = pos["step"] >= total_steps
                    if pos["step"] % tc.log_every == 0 or done or epoch_end:
                        self._log_train(emit, pos, interval, steps_per_epoch, lr)
                    if (
                        (tc.eval_every > 0 and pos["step"] % tc.eval_every == 0)
                        or (tc.eval_every == 0 and epoch_end)
                        or done
                    ):
                        run_evals(("val",))
                        last_eval = pos["step"]
                    if totals[3].item() > 0:
                        stop_reason = "callback"
                    elif tc.max_time_s is not None and self._any(
                        accelerator, pos["train_time_s"] >= tc.max_time_s
                    ):
                        stop_reason = "max_time"
                    due = (tc.checkpoint_every > 0 and pos["step"] % tc.checkpoint_every == 0) or (
                        tc.checkpoint_every == 0 and epoch_end
                    )
                    if not done and due:
                        self._save(accelerator, ckpt_dir, pos, total_steps, world, emit)
                        last_ckpt = pos["step"]
                    if epoch_end:
                        for _ in batches:  # run the loader to its end (Accelerate's end-of-epoch bookkeeping)
                            raise RuntimeError("the training loader yielded more batches than an epoch has")
                    if done or epoch_end or stop_reason is not None:
                        break
            if last_eval != pos["step"]:
                run_evals(("val",))
            run_evals(("test",))  # once, at the end
            if tc.checkpoint_every >= 0 and last_ckpt != pos["step"]:
                self._save(
                    accelerator, ckpt_dir, pos, total_steps, world, emit
                )  # --resume then has nothing left
        except FloatingPointError as err:
            status, error = "diverged", str(err)
        except KeyboardInterrupt:
            status, error = "interrupted", "interrupted by the user; continue with --resume"
        finally:
            emit("on_train_end")

        def save(run_dir: Path) -> None:
            target = run_dir / "model"
            accelerator.unwrap_model(model).save_pretrained(target, safe_serialization=True)
            # The training length: what `truncation=True` (pipelines, servers) cuts inputs to.
            self.tokenizer.model_max_length = self.cfg.model.max_length
            self.tokenizer.save_pretrained(target)

        return Outcome(
            status=status,
            metrics=dict(view.final_metrics),
            steps=pos["step"],
            epochs=pos["epoch"] + pos["batch_in_epoch"] / steps_per_epoch,
            train_time_s=pos["train_time_s"],
            units_seen=pos["units_seen"],
            unit="samples",
            n_params=sum(p.numel() for p in self.model.parameters()),
            precision=precision,
            save=save,
            stop_reason=stop_reason or ("max_steps" if status == "completed" else None),
            error=error,
        )

    @staticmethod
    def _any(accelerator: Any, flag: bool) -> bool:
        t = torch.tensor([float(flag)], device=accelerator.device)
        return bool(accelerator.reduce(t, reduction="sum").item() > 0)

    @staticmethod
    def _log_train(emit: Any, pos: dict, interval: dict, steps_per_epoch: int, lr: float) -> None:
        if interval["n"] == 0:
            return
        record = {
            "step": pos["step"],
            "epoch": round(pos["epoch"] + pos["batch_in_epoch"] / steps_per_epoch, 4),
            "split": "train",
            "time_s": round(pos["train_time_s"], 3),
            "loss": interval["loss"] / interval["n"],
            "accuracy": interval["correct"] / interval["n"],
            "lr": lr,
            "throughput": interval["n"] / max(interval["time"], 1e-9),
        }
        if interval["grad_norm"] is not None:
            record["grad_norm"] = interval["grad_norm"]
        emit("on_log", record)
        interval.update(loss=0.0, correct=0.0, n=0.0, time=0.0, grad_norm=None)

    # ----------------------------------------------------------------- checkpoints
    def _save(
        self, accelerator: Any, ckpt_dir: Path, pos: dict, total_steps: int, world: int, emit: Any
    ) -> None:
        path = ckpt_dir / f"step-{pos['step']:07d}"
        accelerator.wait_for_everyone()
        accelerator.save_state(
            str(path)
        )  # every process: its RNG state; the main one: model, optimizer, schedule
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            from llmlab.fileio import atomic_write_text

            atomic_write_text(
                path / "loop.json", json.dumps({**pos, "total_steps": total_steps, "world_size": world})
            )
            atomic_write_text(ckpt_dir / "latest", path.name)
            kept = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())
            for old in kept[: -self.cfg.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            emit("on_checkpoint", path)
        accelerator.wait_for_everyone()

    def _restore(self, accelerator: Any, ckpt_dir: Path, pos: dict, total_steps: int, world: int) -> dict:
        pointer = ckpt_dir / "latest"
        if not pointer.is_file():
            return pos  # nothing saved yet: start from the beginning
        path = ckpt_dir / pointer.read_text().strip()
        try:
            loop = json.loads((path / "loop.json").read_text())
            accelerator.load_state(str(path))
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint {path} cannot be restored: {err}") from err
        if loop["total_steps"] != total_steps:
            raise CheckpointError(
                f"checkpoint {path} belongs to a run of {loop['total_steps']} steps; this one has "
                f"{total_steps}"
            )
        if loop["world_size"] != world:
            raise CheckpointError(
                f"checkpoint {path} was written by {loop['world_size']} process(es); resume it with as many "
                f"(this launch has {world}): each process's RNG state is part of it"
            )
        return {k: loop[k] for k in pos}


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
        "Stage 4: fine-tune BERT on AG News with HF Accelerate (a standard HF model directory as result)"
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

    def build(self, cfg: AgNewsBertConfig, ctx: BuildContext) -> AgNewsBertLoop:
        if cfg.train.compile:
            raise ConfigError("train.compile is not supported by agnews-bert (Accelerate's loop)")
        check_world_size(ctx.dist.world_size, os.environ)  # the launch traps, before anything is written
        check_batch(cfg.train.batch_size, cfg.train.grad_accum, ctx.dist.world_size)
        rows, classes, description, notes = load_splits(cfg.data, ctx.data_dir)
        model, tokenizer, source = load_model_and_tokenizer(cfg.model, classes, ctx.data_dir)
        splits = {name: tokenize_split(tokenizer, part, cfg.model.max_length) for name, part in rows.items()}
        truncated = sum(len(ids) >= cfg.model.max_length for ids in splits["train"].ids) / len(
            splits["train"]
        )
        world = ctx.dist.world_size
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
            f"it); global batch {cfg.train.batch_size} = {world} process(es) x {cfg.train.grad_accum} "
            f"micro-batch(es) x {cfg.train.batch_size // (world * cfg.train.grad_accum)} articles; "
            "Accelerate loop, final model saved as a Hugging Face directory in model/."
        )
        return AgNewsBertLoop(cfg, ctx, model, tokenizer, rows, splits, classes, description, notes)
