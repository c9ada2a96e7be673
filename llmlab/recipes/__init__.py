"""The recipe registry: one recipe per stage of the ladder (see DESIGN.md)."""

from __future__ import annotations

import difflib

from llmlab.config import ConfigError
from llmlab.recipes.agnews_bert import AgNewsBert
from llmlab.recipes.base import BuildContext, Experiment, Recipe, Target
from llmlab.recipes.cifar10_resnet import Cifar10ResNet18, Cifar10ResNet20
from llmlab.recipes.gpt_finetune import GPTFinetune
from llmlab.recipes.gpt_lm import ChineseGPT, ShakespeareGPT
from llmlab.recipes.gpt_tp import TensorParallelGPT
from llmlab.recipes.imdb_rnn import ImdbGRU, ImdbLSTM
from llmlab.recipes.llama_lm import LlamaPretrain
from llmlab.recipes.llama_lora import LlamaLoRA
from llmlab.recipes.mnist_mlp import MnistMLP
from llmlab.recipes.translation import IwsltTransformer, Multi30kTransformer

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        MnistMLP(),
        Cifar10ResNet18(),
        Cifar10ResNet20(),
        ImdbLSTM(),
        ImdbGRU(),
        AgNewsBert(),
        Multi30kTransformer(),
        IwsltTransformer(),
        ShakespeareGPT(),
        ChineseGPT(),
        GPTFinetune(),
        LlamaPretrain(),
        LlamaLoRA(),
        TensorParallelGPT(),
    )
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        close = difflib.get_close_matches(name, list(RECIPES), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown recipe {name!r} (recipes: {', '.join(RECIPES)}).{hint}")
    return RECIPES[name]


__all__ = ["RECIPES", "BuildContext", "Experiment", "Recipe", "Target", "get_recipe"]
