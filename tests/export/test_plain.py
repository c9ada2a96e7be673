"""Runs without a Hugging Face twin (MLP, ResNet, LSTM/GRU, translation Transformer): the export holds
model.safetensors equal, tensor for tensor, to the run's final weights (read back with safetensors alone),
the llmlab config.json and the vocabulary / tokenizer the model reads; and the card's "How to load" code,
executed as a user would, rebuilds the model with those weights and runs it on an input."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from tests.export.helpers import read_json, run_card_code, state_dict_equal

KINDS = [
    ("mnist-mlp", []),
    ("cifar10-resnet20", []),
    ("imdb-lstm", ["vocab.json"]),
    ("imdb-gru", ["vocab.json"]),
    ("multi30k-transformer", ["tokenizer.json"]),
    # the same exporters as above, on the sibling recipes
    pytest.param("cifar10-resnet18", [], marks=pytest.mark.slow),
    pytest.param("iwslt-transformer", ["tokenizer.json"], marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("recipe", "files"), KINDS)
def test_weights_config_and_card_code(train, export, recipe, files):
    run_dir, out = train(recipe), export(recipe)
    weights = load_file(out / "model.safetensors")
    assert state_dict_equal(weights, load_file(run_dir / "model.safetensors"))
    assert read_json(out / "config.json") == read_json(run_dir / "config.json")
    for name in files:
        assert (out / name).read_bytes() == (run_dir / name).read_bytes()
    manifest = read_json(out / "llmlab_export.json")
    assert manifest["kind"] == "llmlab" and manifest["recipe"] == recipe
    assert set(manifest["files"]) >= {"model.safetensors", "config.json", "README.md", *files}
    (space,) = run_card_code(out / "README.md")
    model = space["model"]
    assert state_dict_equal({k: v for k, v in model.state_dict().items() if k in weights}, weights)
    assert set(model.state_dict()) == set(weights)
    if recipe.endswith("-transformer"):  # the card's example translated a sentence with the run's decoding
        assert isinstance(space["translator"].translate(["A dog runs."])[0], str)
    else:
        out_name = "labels" if recipe.startswith("cifar") else "logits"
        assert out_name in space
