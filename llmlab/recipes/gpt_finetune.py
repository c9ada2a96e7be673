"""Stage 6 recipe `gpt-finetune`: continue training a pretrained GPT-2 on another text.

The starting point, `init_from=`, is one of
- an llmlab run directory of any language-model recipe (`gpt-pretrain`, `shakespeare-gpt`, an earlier
  `gpt-finetune`): the architecture comes from its config, the tokenizer from its tokenizer.json, the weights
  from its model.safetensors (else its latest checkpoint);
- a Hugging Face GPT-2 directory (what `GPT2LMHeadModel.save_pretrained` writes, plus its tokenizer files):
  the architecture from config.json, the weights through llmlab.models.gpt.load_hf (the one explicit
  converter), the tokenizer from the folder: a BERT `vocab.txt` (as uer/gpt2-chinese-cluecorpussmall, Zhao et
  al. 2019, whose GPT-2 reads bert-base-chinese's vocabulary), else `tokenizer.json`, else GPT-2's
  `vocab.json` + `merges.txt`;
- a Hugging Face Hub id such as `gpt2` (downloaded with huggingface_hub where the Hub is reachable; where it
  is not, a ConfigError says so and how to pass a local copy instead);
- `scratch`: no pretrained model, a randomly initialised one of `model.*` with `data.tokenizer` built on the
  target text: the baseline that says what the pretraining buys (the smoke preset uses it to run alone).

A fine-tune keeps the architecture and the tokenizer of its init: `model.*` architecture fields and
`data.tokenizer` that differ from the init's are refused (they are for init_from=scratch); `model.dropout` and
`model.attention` may change, and `data.block_size` may train on shorter windows than the model's context
(e.g. GPT-2's 1,024 on a CPU).

Characters of the target text that the init's tokenizer cannot encode (`data.unknown_chars`; only a char
vocabulary has such characters, having no unknown token): by default ("error") the run stops with a
ConfigError naming them; "drop" removes them from the text; "extend" adds them to the vocabulary, the
embedding (and the tied output layer) growing by one row each, initialised to the mean of the existing rows
(Hewitt 2021, "Initializing New Word Embeddings for Pretrained Language Models": the new tokens start with
the average logit instead of a random one; the old ids move to their places in the new sorted vocabulary and
keep their rows). Tokenizers with an unknown token (bert-chinese: [UNK]) map such characters to it, and
byte-level BPE (gpt2, bpe) encodes every character as bytes: for them the policy has nothing to do, and the
run's notes give the [UNK] rate, or the characters per token, of the target text under the init's tokenizer.

Before training, the init model is evaluated on the target text's validation split (every process its share;
`val/loss_before`, `val/loss_per_char_before`, `val/ppl_before` in result.json) and sampled; the report shows
samples before and after fine-tuning. The run keeps what it needs to stand alone: `init.json` (where it
started, the resolved architecture), `tokenizer.json` (extended, perhaps) and `before.json`, so `--resume`
from a checkpoint, `llmlab eval` and `llmlab generate` work without the init. As nanoGPT's
finetune_shakespeare.py: a smaller learning rate than pretraining and a short run.

Preset `zh-poetry`: the novel-trained `gpt-pretrain` model on the Tang poems (traditional characters, one poem
a line) under DeepSpeed ZeRO-2 on 2 processes:

    torchrun --nproc_per_node 2 -m llmlab run gpt-finetune --preset zh-poetry --device cpu init_from=RUN_DIR
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from llmlab.config import ConfigError
from llmlab.models.causal_lm import build_lm, describe_lm
from llmlab.models.gpt import GPT, GPTConfig
from llmlab.nn.attention import AttentionImpl
from llmlab.recipes.base import BuildContext, Experiment, FinalEvaluation, Target
from llmlab.recipes.gpt_lm import (
    SAMPLES_FILE,
    Generator,
    LMData,
    LMSampleConfig,
    _LMRecipe,
    _sample_cfg,
    lm_experiment,
    read_corpus,
)
from llmlab.train.config import OptimConfig, ScheduleConfig, TrainConfig

INIT_FILE = "init.json"  # what the run started from: init_from, its kind, the resolved architecture
BEFORE_FILE = "before.json"  # the init model on the target text: val metrics and samples
SCRATCH = "scratch"
# what a Hub download fetches: config, weights, every tokenizer file hf_tokenizer reads
HF_FILES = ["config.json", "*.safetensors", "tokenizer.json", "vocab.json", "merges.txt", "vocab.txt"]
HF_FILES += ["tokenizer_config.json", "special_tokens_map.json"]
_ARCH = ("block_size", "n_layer", "n_head", "n_embd", "activation")


@dataclass
class FinetuneModelConfig:
    """The model of a fine-tune. Its architecture is the init's: the architecture fields are for
    init_from=scratch (unset: GPT-2 small's), and with a pretrained init may only repeat the init's values;
    dropout (None: the init's) and attention may change."""

    block_size: int | None = None
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    activation: Literal["gelu_new", "gelu"] | None = None
    dropout: float | None = None
    attention: AttentionImpl = "fused"


@dataclass
class FinetuneDataConfig:
    corpus: str = "tang_poems"  # as LMDataConfig.corpus: a name of llmlab.data.lm_text, a path, or synthetic
    # init_from=scratch: the tokenizer to build (None: char); otherwise None or the init's kind
    tokenizer: Literal["char", "gpt2", "bert-chinese", "bpe"] | None = None
    bpe_vocab_size: int = 4096  # init_from=scratch, tokenizer=bpe
    # Chinese script conversion before anything else (llmlab.data.lm_text.convert_script): "t2s" turns the
    # Tang poems' traditional characters into the simplified ones of a model trained on the novels
    convert: Literal["none", "t2s", "s2t"] = "none"
    unknown_chars: Literal["error", "drop", "extend"] = "error"  # characters a char vocabulary lacks
    block_size: int | None = None  # training/validation window in tokens; None: the model's context
    val_fraction: float = 0.1
    steps_per_epoch: int | None = None
    eval_batches: int | None = None  # validation batches per evaluation (before fine-tuning too)

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ValueError("val_fraction must be in (0, 1)")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError("block_size must be >= 1 (or none: the model's context)")


@dataclass
class FinetuneConfig:
    init_from: str | None = None  # a run directory, HF directory, Hub id, or "scratch" (module docstring)
    seed: int = 0
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    samples: LMSampleConfig = field(default_factory=LMSampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


# ------------------------------------------------------------------------------------------------- presets
def _zh_poetry() -> FinetuneConfig:
    """The `gpt-pretrain --preset cpu` model on the Tang poems, DeepSpeed ZeRO-2 on 2 CPU processes. The
    novels' character vocabulary lacks the poems' traditional characters (27.2% of them): they are added
    (unknown_chars=extend). 1,000 steps of 16 windows (2 M characters, 0.6 passes over the poems) at 1e-3
    (half the pretraining rate: the new embedding rows start from nothing). Measured: val loss 8.03 -> 5.37
    nats per character in 11 minutes (docs/results.md); no target is claimed."""
    return FinetuneConfig(
        init_from=None,  # required: the gpt-pretrain run directory
        model=FinetuneModelConfig(dropout=0.0),
        data=FinetuneDataConfig(corpus="tang_poems", unknown_chars="extend", eval_batches=40),
        samples=LMSampleConfig(count=3, prompt="\n", max_new_tokens=120, temperature=0.8, top_k=200),
        train=TrainConfig(
            batch_size=16,
            max_steps=1000,
            eval_every=250,
            log_every=50,
            checkpoint_every=500,
            precision="fp32",
            grad_clip=1.0,
            strategy="deepspeed",
            ds_stage=2,
        ),
        optim=OptimConfig(name="adamw", lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
        schedule=ScheduleConfig(name="cosine", warmup_steps=50, min_lr_ratio=0.1),
    )


def _smoke() -> FinetuneConfig:
    """From scratch (runs alone) on synthetic quatrains; the tests pass init_from=a smoke pretrain run."""
    return FinetuneConfig(
        init_from=SCRATCH,
        model=FinetuneModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0),
        data=FinetuneDataConfig(corpus="synthetic-zh-poems", steps_per_epoch=50),
        samples=LMSampleConfig(count=1, prompt="\n", max_new_tokens=48),
        train=TrainConfig(
            batch_size=16, max_steps=100, eval_every=50, log_every=10, precision="fp32", grad_clip=1.0
        ),
        optim=OptimConfig(name="adamw", lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1),
        schedule=ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1),
    )


# ------------------------------------------------------------------------------------------------- the init
@dataclass
class Init:
    """A pretrained starting point: its model (weights loaded), tokenizer, and where it came from."""

    kind: str  # run | hf | scratch
    source: str  # what init_from named (resolved path, or Hub id and its download folder)
    model: (
        nn.Module | None
    )  # a GPT or a Llama; None for scratch (built from model.* once the tokenizer is known)
    tokenizer: Any
    description: str


def resolve_init(
    cfg: Any, ctx: BuildContext, load_weights: bool = True, recipe: type[GPTFinetune] | None = None
) -> Init:
    """The init of `cfg.init_from` (see the module docstring) for fine-tuning `recipe` (gpt-finetune or a
    subclass: its model kind and architecture fields); a ConfigError says what is wrong."""
    recipe = recipe or GPTFinetune
    name = cfg.init_from
    if name is None or not str(name).strip():
        raise ConfigError(
            f"{recipe.name} needs init_from=...: a run directory of a language-model recipe (e.g. "
            f"init_from=runs/{recipe.pretrain}-cpu-...), a Hugging Face {recipe.hf_kind} directory "
            f"(save_pretrained), a Hub id such as init_from={recipe.hub_example}, or init_from=scratch (a "
            "randomly initialised baseline)"
        )
    name = str(name).strip()
    if name == SCRATCH:
        return Init(SCRATCH, SCRATCH, None, None, "no pretrained model (init_from=scratch): random weights")
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"init_from={name}: {path} is a file; expected a run or HF model directory")
        init = _local_init(name, path, load_weights)
    elif _looks_like_path(name):
        raise ConfigError(f"init_from={name}: no such directory ({path.resolve()})")
    else:
        folder = _hub_download(name, path)
        init = _local_init(name, folder, load_weights)
        init.source = f"{name} (Hugging Face Hub, {folder})"
    if not isinstance(init.model.cfg, recipe.model_config_cls):
        kind = type(init.model).__name__
        raise ConfigError(
            f"init_from={name} is a {kind} model; {recipe.name} fine-tunes a "
            f"{recipe.model_config_cls.__name__.removesuffix('Config')} (use "
            f"{'llama-lora' if kind == 'Llama' else 'gpt-finetune'} for it)"
        )
    refuse_changes(cfg, init, recipe.arch_fields)
    return init


def refuse_changes(cfg: Any, init: Init, arch_fields: tuple[str, ...] = ()) -> None:
    """A ConfigError when `model.*` or `data.tokenizer` ask for another architecture or tokenizer than the
    init's (fields left unset, or set to the init's own values, are fine: a preset may name them)."""
    m = init.model.cfg
    fields = arch_fields or _ARCH
    arch = {k: getattr(cfg.model, k) for k in fields if getattr(cfg.model, k) not in (None, getattr(m, k))}
    if arch:
        given = ", ".join(f"model.{k}={v} (the init's: {getattr(m, k)})" for k, v in arch.items())
        raise ConfigError(
            f"{given}: a fine-tune keeps the architecture of init_from={cfg.init_from}; leave model.* unset "
            "(only the dropout and model.attention may change), or train a new model with "
            "init_from=scratch"
        )
    if cfg.data.tokenizer not in (None, init.tokenizer.kind):
        raise ConfigError(
            f"data.tokenizer={cfg.data.tokenizer}: a fine-tune uses the tokenizer of "
            f"init_from={cfg.init_from} ({init.tokenizer.name}: the model's embedding rows are its ids); "
            "leave it unset, or train a new model with init_from=scratch"
        )


def _looks_like_path(name: str) -> bool:
    """Whether `name` can only be a local path (a Hub id is `name` or `owner/name`, no leading ./ ~ /)."""
    if name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or "\\" in name:
        return True
    head = name.split("/")[0]
    return "/" in name and Path(head).is_dir()  # e.g. runs/RUN where runs/ exists here


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _hub_download(repo_id: str, path: Path) -> Path:
    """The local snapshot of Hub model `repo_id` (config, weights, tokenizer files), or a ConfigError."""
    where = f"no local directory {path.resolve()}"
    if not _HUB_ID.match(repo_id):
        raise ConfigError(f"init_from={repo_id}: {where}, and not a Hugging Face Hub id either")
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, allow_patterns=HF_FILES))
        if not any(folder.glob("*.safetensors")):  # older repositories hold only pytorch_model.bin
            folder = Path(snapshot_download(repo_id, allow_patterns=[*HF_FILES, "pytorch_model.bin"]))
    except Exception as err:  # noqa: BLE001 - every failure becomes one clear message
        kind = type(err).__name__
        first = str(err).strip().splitlines()[0] if str(err).strip() else kind
        if kind in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
            why = f"the Hugging Face Hub has no model {repo_id!r} that can be read ({kind})"
        else:
            why = f"the Hugging Face Hub is unreachable from here ({kind}: {first[:200]})"
        raise ConfigError(
            f"init_from={repo_id}: {where}, and as a Hub id it could not be downloaded: {why}. Download it "
            f"where the Hub is reachable (`hf download {repo_id} --local-dir DIR`, or "
            "`GPT2LMHeadModel.from_pretrained(...).save_pretrained(DIR)` with its tokenizer) and pass "
            "init_from=DIR"
        ) from None
    return folder


def _local_init(name: str, path: Path, load_weights: bool) -> Init:
    config = path / "config.json"
    if not config.is_file():
        raise ConfigError(
            f"init_from={name}: {path} is neither an llmlab run directory nor a Hugging Face model directory "
            "(no config.json)"
        )
    try:
        stored = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"init_from={name}: {config} cannot be read as JSON ({err})") from err
    if isinstance(stored, dict) and "recipe" in stored:
        return _run_init(name, path, load_weights)
    if isinstance(stored, dict) and "model_type" in stored:
        return _hf_init(name, path, stored, load_weights)
    raise ConfigError(
        f"init_from={name}: {config} is neither an llmlab run's config (no 'recipe') nor a Hugging Face "
        "model config (no 'model_type')"
    )


def _run_init(name: str, path: Path, load_weights: bool) -> Init:
    from llmlab.data.lm_tokenizers import TokenizerError, load_text_tokenizer
    from llmlab.recipes.base import load_run_of_kind
    from llmlab.report import RunDirError
    from llmlab.train.checkpoint import CheckpointError

    try:
        run_dir, recipe, run_cfg = load_run_of_kind(path, _LMRecipe, "a language model")
        tok = load_text_tokenizer(run_dir / "tokenizer.json")
    except (RunDirError, TokenizerError, ConfigError) as err:
        raise ConfigError(f"init_from={name}: {err}") from err
    try:
        if load_weights:
            model = recipe.load_trained(run_dir, run_cfg, tok)
        else:
            model = build_lm(recipe.model_config(run_cfg, run_dir, tok))
    except CheckpointError as err:
        raise ConfigError(f"init_from={name}: {err}") from err
    desc = (
        f"the {recipe.name} run {run_dir} ({describe_lm(model.cfg)}, {model.n_params / 1e6:.2f} M "
        f"parameters; tokenizer {tok.name})"
    )
    return Init("run", str(run_dir.resolve()), model, tok, desc)


def _hf_init(name: str, path: Path, config: dict, load_weights: bool) -> Init:
    model_type = config.get("model_type")
    if model_type == "gpt2":
        from llmlab.models.gpt import config_from_hf, load_hf
    elif model_type == "llama":
        from llmlab.models.llama import config_from_hf, load_hf
    else:
        raise ConfigError(
            f"init_from={name}: {path / 'config.json'} has model_type {model_type!r}; llmlab loads GPT-2 "
            "(gpt2) and LLaMA (llama) checkpoints"
        )
    try:
        gcfg = config_from_hf(config)
    except (ValueError, KeyError) as err:
        raise ConfigError(f"init_from={name}: {path / 'config.json'}: {err}") from err
    tok = hf_tokenizer(path)
    if tok.vocab_size > gcfg.vocab_size:
        raise ConfigError(
            f"init_from={name}: the tokenizer has {tok.vocab_size:,} entries but the model only "
            f"{gcfg.vocab_size:,} embedding rows"
        )
    if load_weights:
        try:
            model = load_hf(path).float()
        except Exception as err:  # noqa: BLE001 - missing or mismatching weight files: one clear error
            raise ConfigError(f"init_from={name}: cannot load the weights of {path}: {err}") from err
    else:
        model = build_lm(gcfg)
    desc = (
        f"the Hugging Face {model_type} model {path} ({describe_lm(gcfg)}, {model.n_params / 1e6:.2f} M "
        f"parameters; tokenizer {tok.name})"
    )
    return Init("hf", str(path.resolve()), model, tok, desc)


def hf_tokenizer(folder: Path) -> Any:
    """The tokenizer of an HF model directory: a BERT vocab.txt (uer/gpt2-chinese), else tokenizer.json, else
    GPT-2's vocab.json + merges.txt; a ConfigError when there is none."""
    from llmlab.data.lm_tokenizers import BertChineseTokenizer, PretrainedTokenizer

    try:
        if (folder / "vocab.txt").is_file():
            return BertChineseTokenizer.from_vocab(folder / "vocab.txt")
        if (folder / "tokenizer.json").is_file():
            return PretrainedTokenizer.from_file(folder / "tokenizer.json")
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return PretrainedTokenizer.from_bpe_files(folder / "vocab.json", folder / "merges.txt")
    except ValueError as err:  # DataCorruptError, TokenizerError
        raise ConfigError(f"{folder}: its tokenizer cannot be read: {err}") from err
    raise ConfigError(
        f"{folder} has no tokenizer files: expected vocab.txt (BERT WordPiece, as uer/gpt2-chinese), "
        "tokenizer.json, or vocab.json + merges.txt (GPT-2's byte-level BPE)"
    )


# ------------------------------------------------------------------------------------------------- the text
@dataclass
class VocabFit:
    """How the target text fits the init's tokenizer: the tokenizer to train with (extended or not), the row
    of the new embedding each old id moves to (extension), and what to say about it."""

    tokenizer: Any
    old_to_new: list[int] | None
    notes: list[str]
    text: str


def fit_vocabulary(text: str, tok: Any, policy: str) -> VocabFit:
    """Apply `data.unknown_chars` (see the module docstring) to `text` under the init's tokenizer `tok`."""
    from llmlab.data.lm_tokenizers import BertChineseTokenizer, CharTokenizer

    if isinstance(tok, CharTokenizer):
        known = set(tok.chars)
        unknown = Counter(c for c in text if c not in known)
        n = sum(unknown.values())
        if not unknown:
            return VocabFit(
                tok, None, [f"Every character of the target text is in the init's {tok.name}."], text
            )
        top = unknown.most_common(12)
        shown = " ".join(c if c.isprintable() and not c.isspace() else repr(c) for c, _ in top)
        what = (
            f"{len(unknown):,} distinct characters of the target text ({n:,} of {len(text):,}, "
            f"{n / len(text):.1%}) are not in the init's {tok.name} vocabulary (most frequent: {shown})"
        )
        if policy == "error":
            raise ConfigError(
                f"{what}, and a char vocabulary has no unknown token. Choose data.unknown_chars=extend (add "
                "them: new embedding rows, initialised to the mean row) or data.unknown_chars=drop (remove "
                "them from the text)"
            )
        if policy == "drop":
            kept = "".join(c for c in text if c in known)
            return VocabFit(tok, None, [f"{what}: dropped from the text (data.unknown_chars=drop)."], kept)
        new = CharTokenizer(tok.chars + "".join(unknown))
        old_to_new = [new._stoi[c] for c in tok.chars]
        note = (
            f"{what}: added to the vocabulary (data.unknown_chars=extend), {tok.vocab_size:,} → "
            f"{new.vocab_size:,} entries; their embedding rows start at the mean of the pretrained rows."
        )
        return VocabFit(new, old_to_new, [note], text)
    sample = text[:2_000_000]
    ids = tok.encode(sample)
    if isinstance(tok, BertChineseTokenizer):
        unk = sum(1 for i in ids if i == tok.unk_id)
        note = (
            f"Under the init's {tok.name} tokenizer {unk:,} of {len(sample):,} characters "
            f"({unk / len(sample):.2%}) of the target text become [UNK] (kept: the model learns to "
            f"predict [UNK]); {len(sample) / len(ids):.3f} characters per token."
        )
    else:
        how = "byte-level: every character is encodable" if tok.kind in ("gpt2", "bpe") else "its own rules"
        note = (
            f"Under the init's {tok.name} tokenizer the target text has {len(sample) / max(len(ids), 1):.3f} "
            f"characters per token ({how})."
        )
    return VocabFit(tok, None, [note], text)


def load_target(cfg: FinetuneDataConfig, tok: Any, ctx: BuildContext) -> tuple[LMData, VocabFit]:
    """The target text, fitted to `tok` (or, for scratch, `tok` None: a tokenizer built on it), tokenised."""
    from llmlab.data.lm_text import convert_script, split_tokens, token_memmap
    from llmlab.data.lm_tokenizers import build_tokenizer
    from llmlab.data.store import cache_dir, data_root

    text, source, notes = read_corpus(cfg.corpus, ctx)
    try:
        text, converted = convert_script(text, cfg.convert)
    except ImportError as err:
        raise ConfigError(f"data.convert={cfg.convert}: {err}") from err
    if converted:
        notes.append(converted)
    if tok is None:
        kind = cfg.tokenizer or "char"
        basis = text if kind == "char" else split_tokens(text, cfg.val_fraction)[0]
        root = data_root(ctx.data_dir)
        tok = build_tokenizer(
            kind, basis, vocab_size=cfg.bpe_vocab_size, root=root, cache=cache_dir() / "lm-bpe"
        )
        fit = VocabFit(tok, None, [], text)
    else:
        fit = fit_vocabulary(text, tok, cfg.unknown_chars)
    train_text, val_text = split_tokens(fit.text, cfg.val_fraction)
    try:
        train, val = token_memmap(train_text, fit.tokenizer), token_memmap(val_text, fit.tokenizer)
    except ValueError as err:
        raise ConfigError(f"data: {err}") from err
    cpt = len(val_text) / max(len(val), 1)
    t = fit.tokenizer
    notes.insert(
        0,
        f"Tokenizer {t.name} ({t.vocab_size:,} entries; saved as tokenizer.json): {len(train):,} train and "
        f"{len(val):,} val tokens, {cpt:.2f} characters per token in val (the last {cfg.val_fraction:.0%} of "
        "the text).",
    )
    how = f", converted {cfg.convert}" if cfg.convert != "none" else ""
    description = f"{cfg.corpus} ({len(fit.text):,} characters from {source}{how})"
    return LMData(train, val, t, description, [*fit.notes, *notes], cpt), fit


VOCAB_ROWS = ("transformer.wte.weight", "model.embed_tokens.weight", "lm_head.weight")  # GPT's, LLaMA's


def extend_embedding(model: nn.Module, old_to_new: list[int], vocab_size: int) -> nn.Module:
    """A copy of `model` (GPT or LLaMA) with `vocab_size` embedding rows: old row i at old_to_new[i], the
    others the mean of the old rows; the output layer grows the same way (tied: it is the embedding)."""
    state = model.state_dict()
    for key in VOCAB_ROWS:
        if key in state:
            old = state[key]  # [V_old, d]
            new = old.mean(dim=0, keepdim=True).repeat(vocab_size, 1)  # [V_new, d]
            new[torch.tensor(old_to_new)] = old
            state[key] = new
    grown = build_lm(dataclasses.replace(model.cfg, vocab_size=vocab_size))
    grown.load_state_dict(state)
    return grown


# ------------------------------------------------------------------------------------------------- recipe
class GPTFinetune(_LMRecipe):
    name = "gpt-finetune"
    dataset = "tang_poems"
    description = "Stage 6: fine-tune a pretrained GPT-2 (llmlab run, HF directory or Hub id) on another text"
    config_cls = FinetuneConfig
    presets = {"zh-poetry": _zh_poetry, "smoke": _smoke}
    default_preset = "zh-poetry"
    preset_help = {
        "zh-poetry": "init_from=RUN_DIR (a gpt-pretrain run) fine-tuned on the Tang poems, DeepSpeed ZeRO-2: "
        "torchrun --nproc_per_node 2 -m llmlab run gpt-finetune --preset zh-poetry init_from=RUN_DIR",
        "smoke": "synthetic quatrains, a tiny model from scratch, seconds (the tests pass init_from=RUN)",
    }
    # smoke (from scratch): the quatrains' entropy is ~0.46 nats/character (a line follows from its first
    # character), their character frequencies alone give ~2.6; measured 1.83 after the 100 steps
    targets = {"smoke": Target("val/loss", 2.3, higher_is_better=False)}

    # what subclasses (llama-lora) change: the model kind, its architecture fields, the words of messages
    model_config_cls: type = GPTConfig
    arch_fields: tuple[str, ...] = _ARCH
    pretrain, hf_kind, hub_example = "gpt-pretrain", "GPT-2", "gpt2"

    def build(self, cfg: FinetuneConfig, ctx: BuildContext) -> Experiment:
        from llmlab.config import from_dict
        from llmlab.data.lm_tokenizers import CharTokenizer, load_text_tokenizer

        saved = _saved_init(ctx.run_dir)
        tok = load_text_tokenizer(ctx.run_dir / "tokenizer.json") if saved is not None else None
        # A resumed run with a checkpoint, or `llmlab eval`: the weights come from the run, whose record says
        # the rest (tokenizer.json, init.json, before.json): the init need not exist any more.
        if saved is not None and self.weights_in_run(cfg, ctx.run_dir):
            data, _ = load_target(cfg.data, tok, ctx)
            model = build_lm(from_dict(self.model_config_cls, saved["model"]))
            init = Init(saved["kind"], saved["source"], model, tok, f"{saved['source']} (see {INIT_FILE})")
        else:
            init = resolve_init(cfg, ctx, recipe=type(self))
            data, fit = load_target(cfg.data, tok or init.tokenizer, ctx)
            if init.model is None:  # scratch
                model = self.scratch_model(cfg, data.tokenizer.vocab_size)
            else:
                model, old_to_new = init.model, fit.old_to_new
                if isinstance(tok, CharTokenizer) and tok.vocab_size > model.cfg.vocab_size:  # resumed after
                    old_to_new = [
                        tok._stoi[c] for c in init.tokenizer.chars
                    ]  # an extension, no checkpoint yet
                if old_to_new is not None:
                    model = extend_embedding(model, old_to_new, data.tokenizer.vocab_size)
        tok = data.tokenizer
        if self.dropout(cfg) is not None:
            set_dropout(model, self.dropout(cfg))
        model.set_attention_impl(cfg.model.attention)
        model.cfg.attention = cfg.model.attention
        block = cfg.data.block_size or model.cfg.block_size
        if block > model.cfg.block_size:
            raise ConfigError(
                f"data.block_size={block}: longer than the model's context ({model.cfg.block_size} tokens)"
            )
        record = {
            "init_from": cfg.init_from,
            "kind": init.kind,
            "source": init.source,
            "model": dataclasses.asdict(model.cfg),
        }
        model, notes = self.adapt(model, cfg, ctx, record)
        section = self.final_section(tok, cfg, init.kind != SCRATCH)
        notes = [f"Initialised from {init.description}.", *notes]
        exp = lm_experiment(cfg, ctx, model, data, block, section, notes=notes)
        exp.artifacts[INIT_FILE] = lambda path: _write_json(path, record)
        if init.kind != SCRATCH:
            section.before = _load_before(ctx.run_dir) or _evaluate_before(exp, model, tok, cfg, ctx)
            exp.artifacts[BEFORE_FILE] = lambda path: _write_json(path, section.before)
        self.finish(exp, cfg, ctx, record)
        return exp

    # ------------------------------------------------------------------------------------------- the hooks
    def weights_in_run(self, cfg: Any, run_dir: Path | None) -> bool:
        """Whether the run directory holds the whole model (final weights or a checkpoint to resume)."""
        return run_dir is not None and (
            (run_dir / "model.safetensors").exists() or any((run_dir / "checkpoints").glob("step_*"))
        )

    def scratch_model(self, cfg: FinetuneConfig, vocab_size: int) -> nn.Module:
        """init_from=scratch: a random model of `model.*` (unset fields: GPT-2 small's)."""
        arch = {k: getattr(cfg.model, k) for k in _ARCH if getattr(cfg.model, k) is not None}
        return GPT(GPTConfig(vocab_size=vocab_size, dropout=cfg.model.dropout or 0.0, **arch))

    def dropout(self, cfg: FinetuneConfig) -> float | None:
        return cfg.model.dropout

    def adapt(self, model: nn.Module, cfg: Any, ctx: BuildContext, record: dict) -> tuple[nn.Module, list]:
        """The model to train from the init's (full fine-tuning: itself) and notes on it; `record` is what
        init.json will hold (a subclass may add to it)."""
        return model, []

    def final_section(self, tok: Any, cfg: Any, pretrained: bool) -> FinetuneSamples:
        return FinetuneSamples(tok, cfg, pretrained)

    def finish(self, exp: Experiment, cfg: Any, ctx: BuildContext, record: dict) -> None:
        """Last changes to the Experiment (e.g. how the final model is saved); `record`: init.json's."""

    def model_config(self, cfg: Any, run_dir: Path, tok: Any) -> Any:
        from llmlab.config import from_dict

        saved = _saved_init(run_dir)
        if saved is None:
            raise ConfigError(f"{run_dir} holds no {INIT_FILE}: the {self.name} run did not start")
        return from_dict(self.model_config_cls, saved["model"])


def set_dropout(model: nn.Module, p: float) -> None:
    """Every dropout of the model to `p`: GPT's (embeddings, attention probabilities, residual branches),
    LLaMA's (attention probabilities, its only one)."""
    if hasattr(model.cfg, "attention_dropout"):
        model.cfg.attention_dropout = p
    else:
        model.cfg.dropout = p
    for mod in model.modules():
        if isinstance(getattr(mod, "dropout", None), float):
            mod.dropout = p


def _write_json(path: Path, obj: Any) -> None:
    from llmlab.fileio import atomic_write_text

    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=1) + "\n")


def _saved_init(run_dir: Path | None) -> dict | None:
    if run_dir is None or not (run_dir / INIT_FILE).is_file():
        return None
    return json.loads((run_dir / INIT_FILE).read_text(encoding="utf-8"))


def _load_before(run_dir: Path | None) -> dict | None:
    if run_dir is None or not (run_dir / BEFORE_FILE).is_file():
        return None
    return json.loads((run_dir / BEFORE_FILE).read_text(encoding="utf-8"))


def _evaluate_before(exp: Experiment, model: nn.Module, tok: Any, cfg: Any, ctx: BuildContext) -> dict:
    """The init model on the target's validation split (every process its share, summed) and its samples
    (the main process), before any training step."""
    from llmlab.train.trainer import evaluate

    model.to(ctx.device)
    metrics = evaluate(model, exp.task, exp.eval_loaders["val"], ctx.device, ctx.dist)
    samples: list[str] = []
    if ctx.dist.is_main and cfg.samples.count:
        gen = Generator(model.eval(), tok)
        samples = gen.sample(cfg.samples.prompt, _sample_cfg(cfg.samples), cfg.samples.count, cfg.seed)
        model.train()
    return {"val": metrics, "samples": samples}


class FinetuneSamples:
    """`Experiment.final_eval`: the val figures before fine-tuning as metrics; samples before and after."""

    def __init__(self, tok: Any, cfg: FinetuneConfig, pretrained: bool) -> None:
        self.tok, self.cfg, self.pretrained = tok, cfg, pretrained
        self.before: dict | None = None

    def __call__(self, model: nn.Module, splits: list[str], run_dir: Path | None) -> FinalEvaluation:
        metrics, notes = {}, []
        if self.before is not None:
            val = self.before["val"]
            metrics = {f"val/{k}_before": v for k, v in val.items() if k in ("loss", "loss_per_char", "ppl")}
            notes.append(
                f"Validation loss on the target text before fine-tuning: {val['loss']:.4f} per token"
                + (f", {val['loss_per_char']:.4f} per character" if "loss_per_char" in val else "")
                + " (the init model as loaded; the metrics val/*_before)."
            )
        s = self.cfg.samples
        if run_dir is None or s.count == 0:
            return FinalEvaluation(metrics, notes)
        after = Generator(model, self.tok).sample(s.prompt, _sample_cfg(s), count=s.count, seed=self.cfg.seed)
        setting = (
            f"{s.count} samples of {s.max_new_tokens} tokens after the prompt {s.prompt!r}, temperature "
            f"{s.temperature:g}, top-k {s.top_k} (seed {self.cfg.seed})"
        )

        def block(texts: list[str]) -> str:
            return "\n\n".join(f"```text\n{s.prompt}{t}\n```" for t in texts)

        parts = ["## Samples\n"]
        if self.pretrained and self.before is not None:
            before = block(self.before["samples"])
            parts.append(f"Before fine-tuning (the init model), {setting}:\n\n{before}\n")
            parts.append(f"After fine-tuning:\n\n{block(after)}\n")
        else:
            parts.append(f"{setting}:\n\n{block(after)}\n")
        from llmlab.fileio import atomic_write_text

        (run_dir / "sections").mkdir(exist_ok=True)
        atomic_write_text(run_dir / SAMPLES_FILE, "\n".join(parts))
        return FinalEvaluation(metrics, notes)
