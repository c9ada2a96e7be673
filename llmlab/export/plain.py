"""The default exporter (`exporter_for` in core.py): runs whose model has no Hugging Face twin (the MLP,
the ResNets, the IMDB LSTM/GRU classifiers, the translation Transformer) as model.safetensors + the llmlab
config (config.json, what the runner wrote) + the tokenizer or vocabulary the model reads, with a card
that shows how llmlab rebuilds the model from that config and loads the weights.

The weights file is copied byte for byte (its safetensors metadata kept) after it was read with safetensors
(no pickle) and loaded strictly into the model the config describes, built as the card's code builds it: a
truncated file, or weights of another model, is a CheckpointError and nothing is written.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from llmlab.export.run import RunExport


@dataclass(frozen=True)
class PlainModel:
    """How the card's code rebuilds one kind of model, and the same build run at export time."""

    task: str  # Hub pipeline tag / model-index task
    tags: tuple[str, ...]
    imports: str  # python: what `code` and `example` import
    code: str  # python once `cfg` and `folder` exist: defines `model` (weights not loaded yet)
    example: str  # python using `model` (and what `code` defined) on an input
    inputs: str  # prose: what the model takes and gives
    build: Callable[[Any, Path], nn.Module]  # (cfg, run_dir) -> the model, as `code` builds it
    files: tuple[str, ...] = ()  # the run's files the model needs besides its weights


def _mlp(cfg: Any, run_dir: Path) -> nn.Module:
    from llmlab.models.mlp import build_mlp

    return build_mlp(cfg.model)


def _resnet(cfg: Any, run_dir: Path) -> nn.Module:
    from llmlab.models.resnet import build_resnet

    return build_resnet(cfg.model)


def _rnn(cfg: Any, run_dir: Path) -> nn.Module:
    from llmlab.models.rnn import build_rnn_classifier

    return build_rnn_classifier(cfg.model)


def _transformer(cfg: Any, run_dir: Path) -> nn.Module:
    from llmlab.data.subword import PAD_ID, load_tokenizer
    from llmlab.models.transformer import build_transformer

    return build_transformer(cfg.model, load_tokenizer(run_dir / "tokenizer.json").get_vocab_size(), PAD_ID)


MLP = PlainModel(
    task="image-classification",
    tags=("mlp", "image-classification"),
    imports="from llmlab.data.mnist import MNIST_MEAN, MNIST_STD\nfrom llmlab.models.mlp import build_mlp",
    code="model = build_mlp(cfg.model).eval()",
    example=(
        "images = torch.randint(0, 256, (4, cfg.model.in_features), dtype=torch.uint8)  # flattened pixels\n"
        "x = (images.float() / 255 - MNIST_MEAN) / MNIST_STD\n"
        "with torch.no_grad():\n"
        "    logits = model(x)  # [4, 10]: digits 0-9"
    ),
    inputs="flattened grey-scale images, pixels scaled to [0, 1] then normalised with MNIST's mean 0.1307 "
    "and standard deviation 0.3081 (the bundled 8x8 digits: 64 features, same normalisation); it returns "
    "logits over the 10 digits",
    build=_mlp,
)
RESNET = PlainModel(
    task="image-classification",
    tags=("resnet", "image-classification"),
    imports=(
        "from llmlab.data.cifar10 import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD\n"
        "from llmlab.models.resnet import build_resnet"
    ),
    code="model = build_resnet(cfg.model).eval()",
    example=(
        "images = torch.rand(4, 3, 32, 32)  # RGB in [0, 1]\n"
        "mean, std = torch.tensor(CIFAR10_MEAN)[:, None, None], torch.tensor(CIFAR10_STD)[:, None, None]\n"
        "with torch.no_grad():\n"
        "    labels = [CIFAR10_CLASSES[i] for i in model((images - mean) / std).argmax(-1)]"
    ),
    inputs="32x32 RGB images [B, 3, 32, 32] in [0, 1], normalised per channel with CIFAR-10's mean and "
    "standard deviation; it returns logits over the 10 CIFAR-10 classes",
    build=_resnet,
)
RNN = PlainModel(
    task="text-classification",
    tags=("rnn", "sentiment-analysis"),
    imports=(
        "from llmlab.data.text import Vocab, tokenize\nfrom llmlab.models.rnn import build_rnn_classifier"
    ),
    code='vocab = Vocab.from_json(f"{folder}/vocab.json")\nmodel = build_rnn_classifier(cfg.model).eval()',
    example=(
        'ids = vocab.encode(tokenize("A wonderful film, I loved every minute."), cfg.data.max_len)\n'
        "with torch.no_grad():\n"
        "    logits = model(torch.tensor([ids]), torch.tensor([len(ids)]))  # [1, 2]: negative, positive"
    ),
    inputs="token ids of `llmlab.data.text.tokenize(text)` under vocab.json (0 = padding), with their "
    "lengths; it returns logits over (negative, positive)",
    build=_rnn,
    files=("vocab.json",),
)
TRANSFORMER = PlainModel(
    task="translation",
    tags=("transformer", "translation"),
    imports=(
        "from llmlab.data.subword import PAD_ID, load_tokenizer\n"
        "from llmlab.models.transformer import build_transformer\n"
        "from llmlab.recipes.translation import Translator"
    ),
    code=(
        'tokenizer = load_tokenizer(f"{folder}/tokenizer.json")\n'
        "model = build_transformer(cfg.model, tokenizer.get_vocab_size(), PAD_ID).eval()"
    ),
    example=(
        "translator = Translator(model, tokenizer, cfg, folder)\n"
        'print(translator.translate(["A man is riding a bike."]))  # beam search, as the run decoded'
    ),
    inputs="source sentences encoded with the joint byte-level BPE of tokenizer.json (a standard "
    "`tokenizers` file); llmlab's Translator runs beam search with the run's decoding settings",
    build=_transformer,
    files=("tokenizer.json",),
)


def plain_model(recipe: Any) -> PlainModel | None:
    from llmlab.recipes.cifar10_resnet import _CifarRecipe
    from llmlab.recipes.imdb_rnn import _ImdbRecipe
    from llmlab.recipes.mnist_mlp import MnistMLP
    from llmlab.recipes.translation import _TranslationRecipe

    kinds = ((MnistMLP, MLP), (_CifarRecipe, RESNET), (_ImdbRecipe, RNN), (_TranslationRecipe, TRANSFORMER))
    return next((kind for cls, kind in kinds if isinstance(recipe, cls)), None)


def folder_code(run: RunExport) -> tuple[str, str]:
    """(an import or "", python that sets `folder` to where the exported files are: downloaded from the Hub,
    or this folder)."""
    if run.repo_id:
        return "from huggingface_hub import snapshot_download", f"folder = snapshot_download({run.repo_id!r})"
    return "", f"folder = {run.ref!r}  # this folder (or, once on the Hub, snapshot_download(REPO_ID))"


def export_plain(run: RunExport, out: Path) -> None:
    """The default exporter (`exporter_for`, core.py) (see the module docstring)."""
    from llmlab.export.run import load_fitting
    from llmlab.train.checkpoint import load_weights

    kind = plain_model(run.recipe)
    source = run.final_file("model.safetensors")
    weights = load_weights(source)
    found = tuple(n for n in ("tokenizer.json", "vocab.json") if (run.run_dir / n).is_file())
    needs = kind.files if kind else found
    for name in needs:
        run.final_file(name, f"{name} (the model's input vocabulary)")
    if kind is not None:
        model = kind.build(run.cfg, run.run_dir)
        load_fitting(model, weights, source)
        run.task = kind.task
        run.tags += list(kind.tags)
        n = sum(p.numel() for p in model.parameters())
        run.architecture = f"`{type(model).__name__}` of llmlab ({n:,} parameters), built from `cfg.model`"
    shutil.copyfile(source, out / "model.safetensors")
    shutil.copyfile(run.run_dir / "config.json", out / "config.json")
    for name in needs:
        shutil.copyfile(run.run_dir / name, out / name)
    run.files.update(
        {
            "model.safetensors": "the weights: the state dict of llmlab's model (safetensors)",
            "config.json": "the llmlab run config (recipe, preset, overrides, resolved config): what "
            "rebuilds the model",
        }
    )
    for name in needs:
        run.files[name] = {"vocab.json": "the vocabulary (llmlab.data.text.Vocab)"}.get(
            name, "the tokenizer (Hugging Face `tokenizers` format)"
        )
    run.usage = plain_usage(run, kind)


def plain_usage(run: RunExport, kind: PlainModel | None) -> str:
    hub, assign = folder_code(run)
    imports = [
        "import json", "", "import torch", *([hub] if hub else []), "from safetensors.torch import load_file",
        "", "from llmlab.config import from_dict", "from llmlab.recipes import get_recipe",
    ]  # fmt: skip
    config = (
        f"{assign}\n"
        'stored = json.load(open(f"{folder}/config.json"))\n'
        'cfg = from_dict(get_recipe(stored["recipe"]).config_cls, stored["config"])'
    )
    if kind is None:
        body = (
            "\n".join([*imports, "from llmlab.recipes import BuildContext"]) + f"\n\n{config}\n"
            "# the recipe builds the model with its data (the data root: $LLMLAB_DATA)\n"
            'recipe = get_recipe(stored["recipe"])\n'
            'model = recipe.build(cfg, BuildContext(device=torch.device("cpu"))).model\n'
            'model.load_state_dict(load_file(f"{folder}/model.safetensors"))'
        )
        return f"No Hugging Face twin; load it with llmlab installed:\n\n```python\n{body}\n```"
    body = (
        "\n".join([*imports, kind.imports]) + f"\n\n{config}\n{kind.code}\n"
        'model.load_state_dict(load_file(f"{folder}/model.safetensors"))\n\n'
        f"{kind.example}"
    )
    return (
        "This model has no Hugging Face twin: it is llmlab's own implementation. Load it with llmlab "
        f"installed, which rebuilds it from config.json:\n\n```python\n{body}\n```\n\n"
        f"The model takes {kind.inputs}."
    )
