"""Stage 5 recipes: English→German translation with the Transformer of "Attention Is All You Need".

`multi30k-transformer` trains on Multi30k (Elliott et al. 2016: 29,000 image captions and their German
translations; test = test_2016_flickr), `iwslt-transformer` on IWSLT 2017 TED talks; they share every line of
code but the data. The pipeline:

- a joint byte-level BPE vocabulary trained on the training split only (llmlab/data/subword.py), saved with
  the run as tokenizer.json; sources end with EOS, targets are BOS … EOS;
- training pairs longer than `data.max_len` tokens are left out of training (counted in the report);
  validation and test keep every sentence (sinusoidal positions have no length limit);
- batches by token count with length bucketing (llmlab/data/token_batches.py; `train.batch_size` counts
  tokens), label-smoothed cross-entropy per target token (Seq2SeqTask), throughput in target tokens/s;
- at every validation the whole val split is also greedy-decoded and scored with corpus BLEU (sacreBLEU on
  detokenised text: the `val/bleu` curve); after training, val and test are decoded with greedy and with
  beam search: `val|test/bleu_greedy`, `val|test/bleu_beam`, every figure with its sacreBLEU signature and
  decoding settings. The run keeps the translations (translations/*.txt), a report section with a table of
  sample translations (source, reference, greedy, beam) and an encoder-decoder attention heat-map of one test
  sentence (attention.png, next to curves.png).

`llmlab translate RUN_DIR "A man rides a bike."` translates with a finished run (see `Translator`).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from llmlab.config import ConfigError
from llmlab.data.subword import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    decode,
    encode,
    load_tokenizer,
    save_tokenizer,
    train_bpe,
)
from llmlab.data.token_batches import TokenBatchLoader, padded_slots
from llmlab.models.transformer import Transformer, TransformerConfig, build_transformer
from llmlab.nn.decoding import DecodeConfig, beam_search, greedy_search
from llmlab.recipes.base import BuildContext, Experiment, FinalEvaluation, Recipe, Target
from llmlab.train.bleu import bleu_signature, bleu_stats, corpus_bleu
from llmlab.train.config import OptimConfig, ScheduleConfig, TrainConfig
from llmlab.train.optim import build_optimizer
from llmlab.train.tasks import Seq2SeqTask

SECTION_FILE = "sections/translation.md"
ATTENTION_FILE = "attention.png"


# ------------------------------------------------------------------------------------------------- configs
@dataclass
class TranslationDataConfig:
    source: Literal["multi30k", "iwslt2017", "synthetic"] = "multi30k"
    src_lang: str = "en"
    tgt_lang: str = "de"
    test_set: str | None = None  # None: the dataset's usual test set (test_2016_flickr, tst2010)
    vocab_size: int = 8000  # joint BPE vocabulary (source and target)
    min_frequency: int = 2  # a merge must be seen this often
    max_len: int = 128  # tokens (BOS/EOS included); longer training pairs are left out; evaluation keeps all
    train_limit: int | None = None  # train on the first N pairs only (quick runs)
    eval_limit: int | None = None  # evaluate on the first N val/test pairs only (the CI test)
    synthetic_train: int = 1200
    synthetic_eval: int = 100
    # Every training batch holds a multiple of this many sentences; the plan uses lcm(row_multiple,
    # processes × grad_accum), so runs whose lcm agrees (row_multiple=8 on 1, 2, 4 or 8 processes) see the
    # same batches.
    row_multiple: int = 1

    def __post_init__(self) -> None:
        if self.vocab_size < 260:
            raise ValueError("vocab_size must be >= 260 (the 256 bytes and 4 special tokens)")
        if self.max_len < 3 or self.min_frequency < 1 or self.row_multiple < 1:
            raise ValueError("max_len must be >= 3, min_frequency >= 1 and row_multiple >= 1")
        for name in ("train_limit", "eval_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or none)")


@dataclass
class TranslationConfig:
    seed: int = 0
    label_smoothing: float = 0.1  # ε_ls of §5.4
    eval_bleu: bool = True  # greedy-decode the val split at every evaluation (the val/bleu curve)
    report_samples: int = 8  # test sentences shown with their translations in the report
    model: TransformerConfig = field(default_factory=TransformerConfig)
    data: TranslationDataConfig = field(default_factory=TranslationDataConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.label_smoothing < 1:
            raise ValueError("label_smoothing must be in [0, 1)")
        if self.report_samples < 0:
            raise ValueError("report_samples must be >= 0")


# ------------------------------------------------------------------------------------------------- presets
def _default(source: str = "multi30k") -> TranslationConfig:
    """The base model of the paper (Table 3) on a GPU, bf16, the paper's optimizer and schedule."""
    return TranslationConfig(
        model=TransformerConfig(),  # d 512, 8 heads, 6+6 layers, d_ff 2048, dropout 0.1, post-norm
        data=TranslationDataConfig(source=source, vocab_size=10_000),
        train=TrainConfig(
            batch_size=8192,
            batch_unit="tokens",
            max_epochs=30,
            eval_every=0,
            log_every=50,
            precision="auto",
            grad_clip=1.0,
            keep_checkpoints=2,
        ),
        optim=OptimConfig(name="adamw", lr=7e-4, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.0001),
        schedule=ScheduleConfig(name="noam", warmup_steps=4000),
    )


def _cpu(source: str = "multi30k") -> TranslationConfig:
    """Sized for 2 CPU cores: about 45 minutes of training."""
    return TranslationConfig(
        model=TransformerConfig(
            d_model=256,
            n_heads=4,
            encoder_layers=3,
            decoder_layers=3,
            d_ff=1024,
            dropout=0.1,
            attention_dropout=0.1,
            activation_dropout=0.1,
        ),
        data=TranslationDataConfig(source=source, vocab_size=8000),
        # Chosen on the validation split of seed 0 (docs/results.md): α 1.0 beat the paper's 0.6 by 0.25 BLEU
        # (beams of 0.6 are too short), the exact stop added 0.15.
        decode=DecodeConfig(beam_size=5, length_penalty=1.0, early_stop=False),
        train=TrainConfig(
            batch_size=3000,
            batch_unit="tokens",
            max_epochs=12,
            eval_every=0,
            log_every=50,
            precision="fp32",
            grad_clip=1.0,
        ),
        optim=OptimConfig(name="adamw", lr=7e-4, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.0001),
        schedule=ScheduleConfig(name="cosine", warmup_steps=400, min_lr_ratio=0.05),
    )


def _iwslt_cpu() -> TranslationConfig:
    """The multi30k `cpu` model and its number of steps (about 45 minutes) on IWSLT's 206k pairs: about one
    epoch, with validation every 300 steps."""
    cfg = _cpu("iwslt2017")
    cfg.train.max_epochs, cfg.train.max_steps, cfg.train.eval_every = None, 2100, 300
    cfg.train.checkpoint_every = 300
    return cfg


def _smoke() -> TranslationConfig:
    """Synthetic word-for-word 'translation' with a tiny model: seconds, for the test suite."""
    return TranslationConfig(
        model=TransformerConfig(
            d_model=64, n_heads=4, encoder_layers=2, decoder_layers=2, d_ff=128, dropout=0.0
        ),
        data=TranslationDataConfig(source="synthetic", vocab_size=400, min_frequency=1),
        decode=DecodeConfig(beam_size=3, batch_size=64),
        train=TrainConfig(
            batch_size=800,
            batch_unit="tokens",
            max_steps=200,
            eval_every=100,
            log_every=10,
            precision="fp32",
            grad_clip=1.0,
        ),
        optim=OptimConfig(name="adamw", lr=5e-3, betas=(0.9, 0.98)),
        schedule=ScheduleConfig(name="cosine", warmup_steps=20),
        report_samples=4,
    )


# ------------------------------------------------------------------------------------------------- data
# A toy bilingual lexicon: the smoke preset's "translation" maps each word and keeps the order.
_LEXICON = {
    "a": "ein",
    "man": "Mann",
    "woman": "Frau",
    "dog": "Hund",
    "cat": "Katze",
    "child": "Kind",
    "sees": "sieht",
    "holds": "hält",
    "runs": "läuft",
    "sits": "sitzt",
    "on": "auf",
    "in": "in",
    "the": "der",
    "red": "rot",
    "blue": "blau",
    "small": "klein",
    "big": "groß",
    "ball": "Ball",
    "street": "Straße",
    "park": "Park",
    "water": "Wasser",
    "and": "und",
    "with": "mit",
    ".": ".",
}


def _synthetic_pairs(n: int, split: str) -> tuple[list[str], list[str]]:
    rng = random.Random(f"translation-{split}")
    words = list(_LEXICON)
    src, tgt = [], []
    for _ in range(n):
        sentence = rng.choices(words[:-1], k=rng.randint(3, 9)) + ["."]
        src.append(" ".join(sentence))
        tgt.append(" ".join(_LEXICON[w] for w in sentence))
    return src, tgt


@dataclass
class Corpus:
    splits: dict[str, tuple[list[str], list[str]]]  # train / val / test -> (sources, references)
    description: str
    notes: list[str]


def load_corpus(cfg: TranslationDataConfig, ctx: BuildContext) -> Corpus:
    if cfg.source == "synthetic":
        splits = {
            "train": _synthetic_pairs(cfg.synthetic_train, "train"),
            "val": _synthetic_pairs(cfg.synthetic_eval, "val"),
            "test": _synthetic_pairs(cfg.synthetic_eval, "test"),
        }
        return Corpus(splits, f"synthetic word-for-word pairs ({cfg.synthetic_train} train)", [])
    from llmlab.data.store import data_root
    from llmlab.data.translation import load_parallel

    try:
        corpus = load_parallel(cfg.source, data_root(ctx.data_dir), cfg.src_lang, cfg.tgt_lang, cfg.test_set)
    except ValueError as err:  # an unsupported language pair or test set: a config problem
        if type(err) is not ValueError:
            raise
        raise ConfigError(f"data: {err}") from err
    splits = dict(corpus.splits)
    if cfg.train_limit is not None:
        splits["train"] = tuple(side[: cfg.train_limit] for side in splits["train"])
    if cfg.eval_limit is not None:
        for name in ("val", "test"):
            splits[name] = tuple(side[: cfg.eval_limit] for side in splits[name])
    sizes = " / ".join(f"{len(splits[s][0])} {s}" for s in ("train", "val", "test"))
    return Corpus(splits, f"{corpus.description()}; used: {sizes}", list(corpus.notes))


@dataclass
class EncodedSplit:
    """One split as padded id tensors: src [N, S] (… EOS), tgt [N, T] (BOS … EOS), and their lengths."""

    src: torch.Tensor
    tgt: torch.Tensor
    src_len: torch.Tensor
    tgt_len: torch.Tensor
    sources: list[str]
    references: list[str]


def _pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(x) for x in seqs], dtype=torch.long)  # [N]
    width = max([1, *(len(x) for x in seqs)])
    out = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)  # [N, L]
    for i, x in enumerate(seqs):
        out[i, : len(x)] = torch.tensor(x, dtype=torch.long)
    return out, lengths


def encode_split(tok: Any, sources: list[str], targets: list[str]) -> EncodedSplit:
    src, src_len = _pad([ids + [EOS_ID] for ids in encode(tok, sources)])
    tgt, tgt_len = _pad([[BOS_ID] + ids + [EOS_ID] for ids in encode(tok, targets)])
    return EncodedSplit(src, tgt, src_len, tgt_len, list(sources), list(targets))


def _keep(split: EncodedSplit, keep: torch.Tensor) -> EncodedSplit:
    idx = keep.nonzero().squeeze(1)
    rows = idx.tolist()
    return EncodedSplit(
        split.src[idx],
        split.tgt[idx],
        split.src_len[idx],
        split.tgt_len[idx],
        [split.sources[i] for i in rows],
        [split.references[i] for i in rows],
    )


def tokenizer_for(corpus: Corpus, cfg: TranslationDataConfig, ctx: BuildContext) -> tuple[Any, str]:
    """The run's tokenizer.json when it has one (resume, `llmlab eval`), else a BPE trained on train."""
    saved = ctx.run_dir / "tokenizer.json" if ctx.run_dir is not None else None
    if saved is not None and saved.is_file():
        return load_tokenizer(saved), f"the run's {saved.name}"
    from llmlab.data.store import cache_dir

    src, tgt = corpus.splits["train"]
    tok = train_bpe([*src, *tgt], cfg.vocab_size, cfg.min_frequency, cache=cache_dir() / "tokenizers")
    return tok, "trained on the training split"


# ------------------------------------------------------------------------------------------------- decoding
def translate_ids(
    model: Transformer, src: torch.Tensor, src_len: torch.Tensor, cfg: DecodeConfig, beam: bool
) -> list[list[int]]:
    """Output token ids for every row of src [N, S], decoded in batches of similar length."""
    order = torch.sort(src_len, descending=True, stable=True).indices.tolist()
    out: list[list[int]] = [[] for _ in order]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), cfg.batch_size):
            rows = order[start : start + cfg.batch_size]
            width = max(1, int(src_len[rows].max()))
            batch = src[rows, :width].to(device)  # [b, S_b]
            if beam:
                hyps = [h[0] for h in beam_search(model, batch, BOS_ID, EOS_ID, cfg)]
            else:
                hyps = greedy_search(model, batch, BOS_ID, EOS_ID, cfg)
            for row, hyp in zip(rows, hyps, strict=True):
                out[row] = hyp.tokens
    finally:
        model.train(was_training)
    return out


class GreedyBleu:
    """The Seq2SeqTask scorer: greedy-decode an evaluation batch and return its BLEU statistics against the
    references of the rows it holds (`ids` index `references`, val and test one after the other)."""

    def __init__(self, tok: Any, references: list[str], cfg: DecodeConfig) -> None:
        self.tok, self.references, self.cfg = tok, references, cfg

    def __call__(self, model: nn.Module, src: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
        if src.shape[0] == 0:
            return bleu_stats([], [])
        hyps = greedy_search(model, src, BOS_ID, EOS_ID, self.cfg)
        texts = decode(self.tok, [h.tokens for h in hyps])
        return bleu_stats(texts, [self.references[i] for i in ids.tolist()])


# ------------------------------------------------------------------------------------------------- recipe
class _TranslationRecipe(Recipe):
    config_cls = TranslationConfig
    batch_units = ("tokens",)

    def build(self, cfg: TranslationConfig, ctx: BuildContext) -> Experiment:
        corpus = load_corpus(cfg.data, ctx)
        tok, tok_origin = tokenizer_for(corpus, cfg.data, ctx)
        enc = {name: encode_split(tok, *corpus.splits[name]) for name in ("train", "val", "test")}
        train = enc["train"]
        usable = (train.src_len <= cfg.data.max_len) & (train.tgt_len <= cfg.data.max_len)
        usable &= (train.src_len > 1) & (train.tgt_len > 2)  # both sides non-empty
        dropped = int((~usable).sum())
        train = _keep(train, usable)
        if len(train.sources) == 0:
            raise ConfigError(f"data.max_len={cfg.data.max_len} leaves no training pair")

        d = ctx.dist
        row_multiple = math.lcm(cfg.data.row_multiple, d.world_size * cfg.train.grad_accum)
        train_loader = TokenBatchLoader(
            train.src.to(ctx.device),
            train.tgt.to(ctx.device),
            train.src_len,
            train.tgt_len,
            cfg.train.batch_size,
            shuffle=True,
            seed=cfg.seed,
            rank=d.rank,
            world_size=d.world_size,
            row_multiple=row_multiple,
        )
        eval_tokens = cfg.train.eval_batch_size or cfg.train.batch_size
        offsets = {"val": 0, "test": len(enc["val"].sources)}
        references = enc["val"].references + enc["test"].references

        def evaluation(name: str) -> TokenBatchLoader:
            split = enc[name]
            ids = torch.arange(len(split.sources)) + offsets[name]
            return TokenBatchLoader(
                split.src.to(ctx.device),
                split.tgt.to(ctx.device),
                split.src_len,
                split.tgt_len,
                eval_tokens,
                ids=ids.to(ctx.device),
                rank=d.rank,
                world_size=d.world_size,
            )

        vocab = tok.get_vocab_size()
        model = build_transformer(cfg.model, vocab, PAD_ID)
        scorer = GreedyBleu(tok, references, cfg.decode) if cfg.eval_bleu else None
        task = Seq2SeqTask(PAD_ID, cfg.label_smoothing, scorer)

        real, slots = padded_slots(train.src_len, train.tgt_len, train_loader.batch_indices())
        tokens_per = {
            name: (float(enc[name].src_len.float().mean() - 1), float(enc[name].tgt_len.float().mean() - 2))
            for name in ("train", "val", "test")
        }
        over = {
            name: int(((enc[name].src_len > cfg.data.max_len) | (enc[name].tgt_len > cfg.data.max_len)).sum())
            for name in ("val", "test")
        }
        src_avg, tgt_avg = tokens_per["train"]
        notes = [
            f"Tokenizer: joint byte-level BPE, {vocab:,} entries ({tok_origin}; saved as tokenizer.json); "
            f"training sentences average {src_avg:.1f} source and {tgt_avg:.1f} target tokens.",
            f"Training pairs over {cfg.data.max_len} tokens (or with an empty side) left out: {dropped} of "
            f"{len(enc['train'].sources)}; evaluation keeps every sentence (over the limit: "
            f"val {over['val']}, test {over['test']}).",
            f"Batches of at most {cfg.train.batch_size:,} padded tokens, length-bucketed: "
            f"{len(train_loader)} per epoch, {100 * (1 - real / slots):.1f}% of the slots are padding.",
            *corpus.notes,
        ]
        translation = TranslationEvaluation(tok, enc, cfg)
        return Experiment(
            model=model,
            task=task,
            optimizer=build_optimizer(model, cfg.optim),
            train_loader=train_loader,
            eval_loaders={"val": evaluation("val")},
            final_loaders={"test": evaluation("test")},
            data_description=corpus.description,
            notes=notes,
            artifacts={"tokenizer.json": lambda path: save_tokenizer(tok, path)},
            final_eval=translation,
        )


class Multi30kTransformer(_TranslationRecipe):
    name = "multi30k-transformer"
    dataset = "multi30k"
    description = "Stage 5: Transformer (Vaswani et al. 2017) translating English→German on Multi30k"
    presets = {"default": lambda: _default("multi30k"), "cpu": lambda: _cpu("multi30k"), "smoke": _smoke}
    preset_help = {
        "default": "base Transformer (65M) on a GPU, bf16, noam schedule (goal: BLEU >= 35)",
        "cpu": "Transformer d256 3+3 layers on 2 CPU cores, ~45 min, beam 5 (BLEU > 25, goal 30)",
        "smoke": "synthetic word-for-word pairs, tiny model, seconds (the test suite)",
    }
    targets = {
        "default": Target("test/bleu_beam", 35.0),
        "cpu": Target("test/bleu_beam", 25.0),
        "smoke": Target("test/bleu_beam", 60.0),
    }


class IwsltTransformer(_TranslationRecipe):
    name = "iwslt-transformer"
    dataset = "iwslt2017"
    description = "Stage 5: the same Transformer on IWSLT 2017 TED talks, English→German"
    presets = {"default": lambda: _default("iwslt2017"), "cpu": lambda: _iwslt_cpu(), "smoke": _smoke}
    preset_help = {
        "default": "base Transformer on a GPU (needs the IWSLT 2017 en-de files or HF datasets online)",
        "cpu": "the multi30k cpu model and time budget (2,100 steps, ~45 min) on IWSLT: about one epoch",
        "smoke": "synthetic word-for-word pairs, tiny model, seconds (the test suite)",
    }
    targets = {"smoke": Target("test/bleu_beam", 60.0)}


# ------------------------------------------------------------------------------------------------- final eval
class TranslationEvaluation:
    """`Experiment.final_eval`: decode val and test with greedy and beam search, corpus BLEU of each, and,
    in a run directory, the translations, a report section and an attention heat-map."""

    def __init__(self, tok: Any, enc: dict[str, EncodedSplit], cfg: TranslationConfig) -> None:
        self.tok, self.enc, self.cfg = tok, enc, cfg

    def __call__(self, model: nn.Module, splits: list[str], run_dir: Path | None) -> FinalEvaluation:
        signature, dc = bleu_signature(), self.cfg.decode
        metrics: dict[str, float] = {}
        outputs: dict[str, dict[str, list[str]]] = {}
        speed: dict[str, float] = {}
        for split in splits:
            data = self.enc[split]
            outputs[split] = {}
            for mode in ("greedy", "beam"):
                t0 = time.perf_counter()
                ids = translate_ids(model, data.src, data.src_len, dc, beam=mode == "beam")
                speed[mode] = len(ids) / max(time.perf_counter() - t0, 1e-9)
                outputs[split][mode] = decode(self.tok, ids)
                metrics[f"{split}/bleu_{mode}"] = corpus_bleu(outputs[split][mode], data.references)
        settings = (
            f"beam {dc.beam_size}, length penalty α={dc.length_penalty:g} (GNMT), max length "
            f"{dc.max_len_a:g}·|source| + {dc.max_len_b}, {'early stop' if dc.early_stop else 'exact stop'}"
        )
        notes = [
            f"BLEU: sacreBLEU {signature} on detokenised output against the raw references; beam search: "
            f"{settings}. Decoding speed on this machine: greedy {speed['greedy']:.1f}, beam "
            f"{speed['beam']:.1f} sentences/s (batches of {dc.batch_size} sentences)."
        ]
        if run_dir is not None:
            self._write(model, run_dir, outputs, metrics, signature, settings, speed)
        return FinalEvaluation(metrics, notes, {"bleu_signature": signature, "decoding": settings})

    def _write(self, model, run_dir, outputs, metrics, signature, settings, speed) -> None:
        from llmlab.fileio import atomic_write_text

        (run_dir / "translations").mkdir(exist_ok=True)
        for split, modes in outputs.items():
            for mode, texts in modes.items():
                atomic_write_text(
                    run_dir / "translations" / f"{split}.{mode}.txt", "".join(t + "\n" for t in texts)
                )
        heat = self._attention(model, run_dir) if "test" in outputs else None
        (run_dir / "sections").mkdir(exist_ok=True)
        atomic_write_text(
            run_dir / SECTION_FILE, self._section(outputs, metrics, signature, settings, speed, heat)
        )

    def _attention(self, model: Transformer, run_dir: Path) -> int | None:
        """Heat-map of the last decoder layer's attention over the source (mean over heads) for the first test
        sentence of 8-20 source tokens (else the first), translated by beam search."""
        data = self.enc["test"]
        lengths = (data.src_len - 1).tolist()
        pick = next((i for i, n in enumerate(lengths) if 8 <= n <= 20), 0)
        src = data.src[pick : pick + 1, : int(data.src_len[pick])]
        device = next(model.parameters()).device
        model.eval()
        hyp = beam_search(model, src.to(device), BOS_ID, EOS_ID, self.cfg.decode)[0][0]
        tgt_in = torch.tensor([[BOS_ID] + hyp.tokens], device=device)
        weights = model.cross_attention(src.to(device), tgt_in)[0].mean(0).cpu()  # [T, S]
        src_pieces = [self.tok.decode([i]) or "·" for i in src[0].tolist()]
        src_pieces[-1] = "</s>"
        out_pieces = [self.tok.decode([i]) or "·" for i in hyp.tokens] + ["</s>"]
        from llmlab.report.heatmap import write_heatmap

        write_heatmap(
            run_dir / ATTENTION_FILE,
            weights,
            src_pieces,
            out_pieces,
            title=f"test sentence #{pick}: encoder-decoder attention, last layer, mean over heads",
        )
        return pick

    def _section(self, outputs, metrics, signature, settings, speed, heat) -> str:
        from llmlab.report.markdown import md_table

        rows = [
            [
                split,
                str(len(self.enc[split].sources)),
                f"{metrics[f'{split}/bleu_greedy']:.2f}",
                f"{metrics[f'{split}/bleu_beam']:.2f}",
            ]
            for split in outputs
        ]
        dc = self.cfg.decode
        lines = [
            "## Translation",
            md_table(["split", "sentences", "greedy BLEU", f"beam BLEU (k={dc.beam_size})"], rows),
            f"sacreBLEU signature `{signature}`, on detokenised output against the raw references. Beam "
            f"search: {settings}. Speed here: greedy {speed['greedy']:.1f}, beam {speed['beam']:.1f} "
            "sentences/s. Every translation is in `translations/SPLIT.{greedy,beam}.txt`.",
        ]
        if "test" in outputs and self.cfg.report_samples:
            data, out = self.enc["test"], outputs["test"]
            n = min(self.cfg.report_samples, len(data.sources))
            sample = [
                [str(i), data.sources[i], data.references[i], out["greedy"][i], out["beam"][i]]
                for i in range(n)
            ]
            lines += [
                f"### Sample translations (the first {n} test sentences)",
                md_table(["#", "source", "reference", "greedy", "beam"], sample, align_numbers=False),
            ]
        if heat is not None:
            lines += [
                "### Attention",
                f"![attention]({ATTENTION_FILE})",
                f"Where the decoder looks while writing test sentence #{heat}: the last decoder layer's "
                "attention over the source tokens, averaged over heads (rows: output tokens, columns: source "
                "tokens; each row sums to 1).",
            ]
        return "\n\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- translate
class Translator:
    """A finished translation run, ready to translate: its tokenizer.json, config and final weights."""

    def __init__(self, model: Transformer, tok: Any, cfg: TranslationConfig, run_dir: Path) -> None:
        self.model, self.tok, self.cfg, self.run_dir = model, tok, cfg, run_dir

    @classmethod
    def from_run(cls, run_dir: Path | str, device: str = "cpu") -> Translator:
        from llmlab.recipes.base import load_run_of_kind
        from llmlab.train.checkpoint import load_run_weights

        run_dir, _, cfg = load_run_of_kind(run_dir, _TranslationRecipe, "a translation model")
        tok = load_tokenizer(run_dir / "tokenizer.json")
        model = build_transformer(cfg.model, tok.get_vocab_size(), PAD_ID)
        load_run_weights(run_dir, model)
        return cls(model.to(device).eval(), tok, cfg, run_dir)

    def translate(self, texts: list[str], beam_size: int | None = None, greedy: bool = False) -> list[str]:
        """One translation per text, in order; empty (or blank) texts give empty translations."""
        dc = (
            self.cfg.decode
            if beam_size is None
            else DecodeConfig(**{**vars(self.cfg.decode), "beam_size": beam_size})
        )
        todo = [i for i, t in enumerate(texts) if t.strip()]
        out = [""] * len(texts)
        if todo:
            split = encode_split(self.tok, [texts[i].strip() for i in todo], [""] * len(todo))
            ids = translate_ids(self.model, split.src, split.src_len, dc, beam=not greedy)
            for i, text in zip(todo, decode(self.tok, ids), strict=True):
                out[i] = text
        return out
