"""Stage 6 benchmark: which tokenizer models the four Chinese novels best, per character?

    LLMLAB_DATA=../shared/data python benchmarks/zh_tokenizers.py [--tokenizers char,bert-chinese,bpe-8192]
        [--chars 1500000] [--max-time 150] [--checkpoint-chars 100000] [--eval-chars 30000] [--threads N]
        [--out FILE]
    LLMLAB_DATA=../shared/data python benchmarks/zh_tokenizers.py --estimate-cpu-preset [--threads N]
    LLMLAB_DATA=../shared/data python benchmarks/zh_tokenizers.py --ngram chinese_novels

The candidates are those of llmlab/data/lm_tokenizers.py: "bert-chinese", the WordPiece vocabulary of Google's
Chinese BERT, which the public Chinese GPT-2 checkpoints use (uer/gpt2-chinese-cluecorpussmall, Zhao et al.
2019, "UER: An Open-Source Toolkit for Pre-training Models"); "bpe-N", a byte-level BPE of N entries learnt
on the training split (GPT-2's scheme, Radford et al. 2019); and "char", one id per character (nanoGPT's
shakespeare_char). Each trains the same small GPT (llmlab/models/gpt.py; nanoGPT's CPU shape: 4 layers, 4
heads, 128 dimensions, context 64 tokens, batches of 12 windows; AdamW 2e-3 constant after 50 warmup steps,
clip 1, no dropout) through the one Trainer on the recipe's own data pipeline (`load_lm_data`, as
`gpt-pretrain` builds it), for `--chars` training characters or `--max-time` seconds of training, whichever
comes first.

Tokens are not comparable across tokenizers, characters are: the score is the validation loss per character
(nats per character = loss per token / characters per token), on the same text for every tokenizer, the first
`--eval-chars` characters of the validation split (the last 10% of the text), evaluated every
`--checkpoint-chars` training characters (training characters = steps x batch x context x the training
split's characters per token). A constant learning rate makes every checkpoint a fair point of comparison.
The table gives the loss at equal characters (each checkpoint every tokenizer reached) and at the end of each
run, with the speed (a larger vocabulary costs more per token in the output layer), and what each tokenizer
does with the Tang poems (traditional characters, the `gpt-finetune --preset zh-poetry` text): how many
characters a token holds there, and what it cannot represent. `--table FILE` prints it again from --out FILE.

`--ngram CORPUS` prints the validation loss per character of count-based character n-gram models
(`ngram_baselines`), what the `gpt-pretrain --preset cpu` target is set against. `--estimate-cpu-preset`
times the `gpt-pretrain --preset cpu` training step against the `shakespeare-gpt --preset cpu` step in
interleaved bursts (`estimate_cpu_preset`) and scales the ratio by the latter's measured step time alone, to
estimate the preset's duration on an idle machine from a busy one.
On a busy machine `--threads 1` avoids most of the cost of sharing: two threads that must meet at every
operation wait for each other whenever the scheduler runs something else on one core.

Caveat built into "bert-chinese": its encoding is lossy (whitespace dropped; curly quotes, the em dash and
rare characters become [UNK]; see lm_tokenizers.py), so it never has to predict those distinctions: its loss
per character is slightly flattered against the lossless "char" and "bpe".
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch

MODEL = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64}  # nanoGPT's CPU shakespeare_char shape
BATCH = 12


def _tokenizer_config(name: str):
    from llmlab.recipes.gpt_lm import LMDataConfig

    if name.startswith("bpe-"):
        return LMDataConfig(corpus="chinese_novels", tokenizer="bpe", bpe_vocab_size=int(name[4:]))
    return LMDataConfig(corpus="chinese_novels", tokenizer=name)


def _tang_coverage(tok, tang: str) -> dict:
    """What the tokenizer makes of the Tang poems: characters per token, and the share it cannot represent
    (char: characters outside its vocabulary; bert: [UNK] tokens per character; byte-level BPE: none)."""
    from llmlab.data.lm_tokenizers import BertChineseTokenizer, CharTokenizer

    if isinstance(tok, CharTokenizer):
        known = set(tok.chars)
        missing = sum(n for c, n in Counter(tang).items() if c not in known)
        return {"tang_chars_per_token": 1.0, "tang_unrepresented": missing / len(tang)}
    ids = tok.encode(tang)
    unk = sum(1 for i in ids if i == tok.unk_id) if isinstance(tok, BertChineseTokenizer) else 0
    return {"tang_chars_per_token": len(tang) / len(ids), "tang_unrepresented": unk / len(tang)}


def run_one(name: str, args: argparse.Namespace, text: str, tang: str) -> dict:
    from llmlab.data.lm_text import WindowLoader, split_tokens, token_memmap
    from llmlab.data.lm_tokenizers import BertChineseTokenizer
    from llmlab.models.gpt import GPT, GPTConfig
    from llmlab.recipes.base import BuildContext
    from llmlab.recipes.gpt_lm import load_lm_data
    from llmlab.train.callbacks import Callback
    from llmlab.train.config import OptimConfig, ScheduleConfig, TrainConfig
    from llmlab.train.optim import build_optimizer
    from llmlab.train.tasks import CausalLMTask
    from llmlab.train.trainer import Trainer

    t0 = time.perf_counter()
    data = load_lm_data(_tokenizer_config(name), BuildContext(device=torch.device("cpu")))
    tok = data.tokenizer
    _, val_text = split_tokens(text, 0.1)
    span = val_text[: args.eval_chars]
    span_tokens = token_memmap(span, tok)
    cpt_train = (len(text) - len(val_text)) / len(data.train_tokens)
    cpt_span = len(span) / len(span_tokens)
    unk = 0.0
    if isinstance(tok, BertChineseTokenizer):
        unk = int((torch.from_numpy(span_tokens.astype("int64")) == tok.unk_id).sum()) / len(span)
    prep_s = time.perf_counter() - t0

    torch.manual_seed(args.seed)
    cfg = GPTConfig(vocab_size=tok.vocab_size, dropout=0.0, activation="gelu", **MODEL)
    model = GPT(cfg)
    block = cfg.block_size
    chars_per_step = BATCH * block * cpt_train
    every = max(1, round(args.checkpoint_chars / chars_per_step))
    steps = max(every, round(args.chars / chars_per_step))
    train = WindowLoader(data.train_tokens, block, BATCH, shuffle=True, seed=args.seed)
    val = WindowLoader(span_tokens, block, 32, shuffle=False)
    curve: list[dict] = []

    class Record(Callback):
        def on_log(self, trainer, record):
            if record["split"] == "val":
                curve.append(
                    {
                        "step": record["step"],
                        "chars": round(record["step"] * chars_per_step),
                        "time_s": record["time_s"],
                        "loss": record["loss"],
                        "loss_per_char": record["loss_per_char"],
                    }
                )
                print(f"  {name} step {record['step']}: {curve[-1]['chars']:,} chars, val loss/char "
                      f"{record['loss_per_char']:.4f} ({record['time_s']:.0f} s)", flush=True)  # fmt: skip

    trainer = Trainer(
        model,
        CausalLMTask(chars_per_token=cpt_span),
        build_optimizer(model, OptimConfig(name="adamw", lr=2e-3, betas=(0.9, 0.99), weight_decay=0.1)),
        train,
        TrainConfig(
            batch_size=BATCH,
            max_steps=steps,
            eval_every=every,
            log_every=10**9,
            checkpoint_every=-1,
            precision="fp32",
            grad_clip=1.0,
            max_time_s=args.max_time,
        ),
        ScheduleConfig(name="constant", warmup_steps=50),
        eval_loaders={"val": val},
        callbacks=[Record()],
    )
    trainer.fit()
    return {
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "params": model.n_params,
        "chars_per_token": {
            "train": cpt_train,
            "val": len(val_text) / len(data.val_tokens),
            "eval": cpt_span,
        },
        "unk_per_char": unk,
        **_tang_coverage(tok, tang),
        "steps": trainer.step,
        "train_time_s": trainer.train_time_s,
        "step_ms": 1000 * trainer.train_time_s / max(trainer.step, 1),
        "chars_per_s": trainer.step * chars_per_step / max(trainer.train_time_s, 1e-9),
        "stop_reason": trainer.stop_reason,
        "prep_s": prep_s,
        "curve": curve,
    }


def _table(results: dict[str, dict], checkpoint_chars: int) -> str:
    """Markdown: per tokenizer, its figures, the val loss per character at each checkpoint every tokenizer
    reached (equal characters; a checkpoint is the step nearest a multiple of `checkpoint_chars`), and at the
    end of its run (equal time when every run hit --max-time)."""

    def at(r: dict, chars: int) -> float | None:
        best = min(r["curve"], key=lambda p: abs(p["chars"] - chars), default=None)
        return best["loss_per_char"] if best and abs(best["chars"] - chars) <= 0.05 * chars else None

    reached = min(max((p["chars"] for p in r["curve"]), default=0) for r in results.values())
    grid = [k * checkpoint_chars for k in range(1, int(reached * 1.05) // checkpoint_chars + 1)]
    grid = [g for g in grid if all(at(r, g) is not None for r in results.values())]
    eq = " | ".join(f"val loss/char at {g // 1000:,}k chars" for g in grid)
    rows = [
        "| tokenizer | entries | params | chars/token (val) | [UNK] per char (val) | Tang poems: chars/token "
        f"| Tang: not representable | {eq} | at the end (chars trained) | ms/step | chars/s |",
        "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(grid) + "---:|---:|---:|",
    ]
    for name, r in results.items():
        end = r["curve"][-1]
        eqs = " | ".join(f"{at(r, g):.4f}" for g in grid)
        rows.append(
            f"| {name} | {r['vocab_size']:,} | {r['params'] / 1e6:.2f} M | {r['chars_per_token']['val']:.3f} "
            f"| {r['unk_per_char']:.2%} | {r['tang_chars_per_token']:.3f} | {r['tang_unrepresented']:.1%} "
            f"| {eqs} | {end['loss_per_char']:.4f} ({end['chars']:,}) | {r['step_ms']:.0f} "
            f"| {r['chars_per_s']:,.0f} |"
        )
    return "\n".join(rows)


def ngram_baselines(text: str, d: float = 0.75) -> dict[str, float]:
    """Cross-entropy (nats per character) of the validation split (the last 10%) under character n-gram
    models counted on the training split: add-one unigram, then bigram and trigram with interpolated absolute
    discounting (Ney, Essen & Kneser 1994; discount d, back-off weight d x distinct followers / count): what a
    neural model of the text should beat, and the figures behind the `gpt-pretrain --preset cpu` target."""
    from llmlab.data.lm_text import split_tokens

    tr, va = split_tokens(text, 0.1)
    n, v = len(tr), len(set(text))
    uni = Counter(tr)
    bi, tri = Counter(zip(tr, tr[1:], strict=False)), Counter(zip(tr, tr[1:], tr[2:], strict=False))
    c1, c2 = Counter(tr[:-1]), Counter(zip(tr, tr[1:-1], strict=False))
    f1, f2 = Counter(a for a, _ in bi), Counter((a, b) for a, b, _ in tri)

    def p1(c: str) -> float:
        return (uni[c] + 1) / (n + v)

    def p2(a: str, b: str) -> float:
        return p1(b) if not c1[a] else (max(bi[a, b] - d, 0) + d * f1[a] * p1(b)) / c1[a]

    def p3(a: str, b: str, c: str) -> float:
        k = c2[a, b]
        return p2(b, c) if not k else (max(tri[a, b, c] - d, 0) + d * f2[a, b] * p2(b, c)) / k

    return {
        "unigram": -sum(math.log(p1(c)) for c in va) / len(va),
        "bigram": -sum(math.log(p2(a, b)) for a, b in zip(va, va[1:], strict=False)) / (len(va) - 1),
        "trigram": -sum(math.log(p3(*t)) for t in zip(va, va[1:], va[2:], strict=False)) / (len(va) - 2),
    }


# The median training step of `shakespeare-gpt --preset cpu` alone on this 2-core machine, measured through
# the runner (docs/results.md, Stage 6: 46.4 ms, mean over 4 seeds of the median step, 2026-12-01).
ANCHOR_STEP_MS = 46.4


def estimate_cpu_preset(rounds: int = 6, steps: int = 4) -> dict:
    """How long `gpt-pretrain --preset cpu` takes alone, from steps timed *relative* to the anchor (the
    shakespeare-gpt CPU model) in interleaved bursts: on a busy machine both slow down alike, so the ratio
    holds while the absolute times do not. Train steps: forward, backward, clipping, AdamW on real batches;
    evaluation: forward of one validation batch. Estimate = ratio x ANCHOR_STEP_MS per step, plus the
    evaluations the preset runs (eval_batches each, every eval_every steps and at the end)."""
    import statistics

    import torch.nn.functional as F

    from llmlab.data.lm_text import WindowLoader
    from llmlab.models.gpt import GPT, GPTConfig
    from llmlab.recipes import get_recipe
    from llmlab.recipes.base import BuildContext
    from llmlab.recipes.gpt_lm import load_lm_data

    cfg = get_recipe("gpt-pretrain").config("cpu")
    t0 = time.perf_counter()
    data = load_lm_data(cfg.data, BuildContext(device=torch.device("cpu")))
    prep_s = time.perf_counter() - t0
    torch.manual_seed(0)
    ours = GPT(GPTConfig(**{**vars(cfg.model), "vocab_size": data.tokenizer.vocab_size}))
    anchor = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, activation="gelu"))
    batches = {
        "ours": iter(WindowLoader(data.train_tokens, ours.cfg.block_size, cfg.train.batch_size, seed=1)),
        "anchor": iter(WindowLoader(data.train_tokens % 65, 64, 12, seed=1)),
    }
    val = next(iter(WindowLoader(data.val_tokens, ours.cfg.block_size, cfg.train.batch_size, shuffle=False)))
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in (("ours", ours), ("anchor", anchor))}
    models = {"ours": ours, "anchor": anchor}
    times: dict[str, list[float]] = {"ours": [], "anchor": [], "eval": []}

    def train_step(name: str) -> float:
        x, y = next(batches[name])
        tick = time.perf_counter()
        logits = models[name](x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models[name].parameters(), 1.0)
        opts[name].step()
        return time.perf_counter() - tick

    for r in range(rounds + 1):  # round 0 warms up
        for name in ("anchor", "ours", "anchor", "ours"):
            dts = [train_step(name) for _ in range(steps)]
            if r:
                times[name] += dts
        with torch.no_grad():
            tick = time.perf_counter()
            ours(val[0])
            if r:
                times["eval"].append(time.perf_counter() - tick)
    med = {k: statistics.median(v) for k, v in times.items()}
    step_ms = ANCHOR_STEP_MS * med["ours"] / med["anchor"]
    eval_ms = ANCHOR_STEP_MS * med["eval"] / med["anchor"]
    tc = cfg.train
    n_evals = tc.max_steps // tc.eval_every + (tc.max_steps % tc.eval_every != 0)
    eval_batches = cfg.data.eval_batches or math.ceil(
        len(data.val_tokens) / (tc.batch_size * ours.cfg.block_size)
    )
    total_s = (tc.max_steps * step_ms + n_evals * eval_batches * eval_ms) / 1000 + prep_s
    return {
        "tokenizer": data.tokenizer.name,
        "params": ours.n_params,
        "measured_ms": {k: 1000 * v for k, v in med.items()},
        "ratio": med["ours"] / med["anchor"],
        "step_ms_alone": step_ms,
        "eval_batch_ms_alone": eval_ms,
        "steps": tc.max_steps,
        "evals": n_evals,
        "eval_batches": eval_batches,
        "prep_s": prep_s,
        "total_min": total_s / 60,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizers", default="char,bert-chinese,bpe-8192")
    ap.add_argument("--chars", type=int, default=1_500_000, help="training characters per tokenizer")
    ap.add_argument("--max-time", type=float, default=150.0, help="training seconds per tokenizer (cap)")
    ap.add_argument("--checkpoint-chars", type=int, default=100_000)
    ap.add_argument("--eval-chars", type=int, default=30_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument(
        "--estimate-cpu-preset",
        action="store_true",
        help="instead: estimate how long `gpt-pretrain --preset cpu` takes alone on this machine",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--table", type=Path, default=None, help="instead: print the table of a saved --out FILE")
    ap.add_argument("--ngram", metavar="CORPUS", default=None, help="instead: n-gram baselines of a corpus")
    args = ap.parse_args(argv)
    if args.ngram is not None:
        from llmlab.data.lm_text import load_text
        from llmlab.data.store import data_root

        baselines = ngram_baselines(load_text(args.ngram, data_root(None)).text)
        print(f"{args.ngram}: " + ", ".join(f"{k} {v:.4f}" for k, v in baselines.items()) + " nats/character")
        return 0
    if args.table is not None:
        saved = json.loads(args.table.read_text())
        print(_table(saved["results"], saved.get("checkpoint_chars", args.checkpoint_chars)))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.estimate_cpu_preset:
        print(f"# {' '.join(sys.argv)}; load average {os.getloadavg()[0]:.2f}", flush=True)
        print(json.dumps(estimate_cpu_preset(), indent=1))
        print(f"# load average {os.getloadavg()[0]:.2f}")
        return 0

    from llmlab.data.lm_text import load_text
    from llmlab.data.store import data_root

    text = load_text("chinese_novels", data_root(None)).text
    tang = load_text("tang_poems", data_root(None)).text[:1_000_000]
    print(
        f"# {' '.join(sys.argv)}\n# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}, "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        flush=True,
    )
    results = {}
    for name in [t.strip() for t in args.tokenizers.split(",") if t.strip()]:
        print(f"{name}:", flush=True)
        results[name] = run_one(name, args, text, tang)
        r = results[name]
        print(f"  {r['steps']} steps in {r['train_time_s']:.0f} s ({r['stop_reason']}), load average "
              f"{os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    print()
    print(_table(results, args.checkpoint_chars))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"argv": sys.argv, "checkpoint_chars": args.checkpoint_chars, "results": results}
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
