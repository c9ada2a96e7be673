"""Helpers of the export tests: the runs they train (each recipe's smoke preset, a couple of steps on tiny
data), reading a model card, and running its code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

# translation: no BLEU during training, and short decodes (an untrained model writes to the length limit)
TRANSLATION = [
    "train.max_steps=2", "train.eval_every=0", "data.synthetic_train=200", "data.synthetic_eval=4",
    "report_samples=1", "eval_bleu=false", "decode.beam_size=2", "decode.max_len_a=0", "decode.max_len_b=4",
]  # fmt: skip
LM = ["train.max_steps=2", "train.eval_every=0", "samples.count=0", "data.eval_batches=2"]
# recipe -> overrides of its smoke preset: 2-3 steps, small splits, no samples or extra evaluations, so each
# run takes about a second (a few on a busy 2-core machine). `{llama}`: the llama-pretrain run's folder.
RUNS: dict[str, list[str]] = {
    "mnist-mlp": [
        "train.max_steps=2", "data.synthetic_train=256", "data.synthetic_eval=64", "data.val_size=32",
    ],
    "cifar10-resnet20": [
        "train.max_steps=2", "train.batch_size=8", "data.synthetic_train=64", "data.synthetic_eval=16",
        "data.val_size=8",
    ],
    "cifar10-resnet18": [
        "train.max_steps=2", "train.batch_size=4", "data.synthetic_train=32", "data.synthetic_eval=8",
        "data.val_size=4",
    ],
    "imdb-lstm": [
        "train.max_steps=2", "baseline=false", "data.synthetic_train=128", "data.synthetic_eval=32",
        "data.val_size=16",
    ],
    "imdb-gru": [
        "train.max_steps=2", "baseline=false", "data.synthetic_train=128", "data.synthetic_eval=32",
        "data.val_size=16",
    ],
    "multi30k-transformer": TRANSLATION,
    "iwslt-transformer": TRANSLATION,
    "agnews-bert": [
        "train.max_steps=2", "train.eval_every=0", "data.train_size=64", "data.val_size=16",
        "data.test_size=16",
    ],
    "shakespeare-gpt": LM,
    "gpt-pretrain": LM,
    "gpt-finetune": LM,
    "gpt-tp": LM,
    "llama-pretrain": LM,
    # LoRA on the llama-pretrain run, on its own text (same characters); 3 steps without warmup at lr 1e-2
    # move the logits by ~1e-2, far above the 1e-5 of the equality checks
    "llama-lora": ["init_from={llama}", "data.corpus=synthetic-zh", "schedule.warmup_steps=0",
                   "train.max_steps=3", "train.eval_every=0", "samples.count=0", "data.eval_batches=2"],
}  # fmt: skip
NEEDS_DATA = {"agnews-bert"}  # the bert-base-uncased vocabulary and the AG News test CSV


def front_matter(readme: Path) -> dict:
    """The YAML metadata of a model card, as the Hub reads it (huggingface_hub)."""
    from huggingface_hub import ModelCard

    return ModelCard.load(readme).data.to_dict()


def section(readme: Path, title: str) -> str:
    """The text of a `## title` section of a card."""
    text = readme.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"no section {title!r} in {readme}"
    return match.group(1)


def python_blocks(readme: Path, title: str = "How to load") -> list[str]:
    """The ```python blocks of a card's section."""
    return re.findall(r"```python\n(.*?)```", section(readme, title), flags=re.S)


def run_card_code(readme: Path, replace: dict[str, str] | None = None, having: str = "") -> list[dict]:
    """Execute each python block of the card's "How to load" that contains `having` (after textual
    replacements, e.g. of a placeholder the user fills in); their namespaces."""
    spaces = []
    for code in python_blocks(readme):
        if having not in code:
            continue
        for old, new in (replace or {}).items():
            code = code.replace(old, new)
        namespace: dict = {}
        exec(compile(code, f"{readme}:How to load", "exec"), namespace)  # noqa: S102 - the card's own code
        spaces.append(namespace)
    return spaces


def state_dict_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))
