"""TextClassifier: loading an HF dir, an llmlab run dir or a Hub id (clear errors); batching invariance."""

from __future__ import annotations

import time

import pytest
import torch

from llmlab.serve.model import ModelLoadError, TextClassifier, resolve_model_source
from tests.serve.helpers import AG_NEWS_LABELS, TEXTS


def test_loads_hf_dir_with_labels_and_max_length(classifier, model_dir):
    assert classifier.labels == AG_NEWS_LABELS
    assert classifier.name == model_dir.name
    assert classifier.max_length == 128  # the model's max_position_embeddings (the tokenizer states none)
    assert not classifier.model.training
    results = classifier.classify(TEXTS[:3])
    assert len(results) == 3
    for r in results:
        assert set(r) == {"label", "score", "scores"}
        assert list(r["scores"]) == AG_NEWS_LABELS
        assert r["label"] == max(r["scores"], key=r["scores"].get)
        assert r["score"] == r["scores"][r["label"]]
        assert sum(r["scores"].values()) == pytest.approx(1.0, abs=1e-5)


def test_loads_llmlab_run_dir(run_dir, classifier):
    from_run = TextClassifier.from_path(run_dir)
    assert from_run.name == run_dir.name
    assert resolve_model_source(run_dir).location == str(run_dir / "model")
    a, b = from_run.classify(TEXTS[:2]), classifier.classify(TEXTS[:2])
    assert [r["label"] for r in a] == [r["label"] for r in b]


def test_results_do_not_depend_on_batch_neighbours(classifier):
    """Padding to a longer neighbour must not change a text's scores: the attention mask is passed."""
    alone = [classifier.classify([t])[0] for t in TEXTS]
    together = classifier.classify(TEXTS)
    for a, b in zip(alone, together, strict=True):
        assert a["label"] == b["label"]
        for label in AG_NEWS_LABELS:
            assert a["scores"][label] == pytest.approx(b["scores"][label], abs=1e-5)
    # The texts really differ in length, so the batch really is padded.
    lengths = [len(classifier.tokenizer(t)["input_ids"]) for t in TEXTS]
    assert max(lengths) > 2 * min(lengths)


def test_attention_mask_reaches_the_model(classifier):
    seen = {}

    def hook(module, args, kwargs):
        seen.update(kwargs)

    handle = classifier.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        classifier.classify(["short", TEXTS[-1]])
    finally:
        handle.remove()
    mask = seen["attention_mask"]
    assert mask.shape == seen["input_ids"].shape and mask.dtype in (torch.long, torch.int64)
    assert mask[0].sum() < mask[1].sum()  # the short text's padding is masked out


def test_long_texts_are_truncated_to_max_length(model_dir):
    capped = TextClassifier.from_path(model_dir, max_length=16)
    assert capped.max_length == 16
    long_text = " ".join(["stocks fell on wall street"] * 100)
    [result] = capped.classify([long_text])
    # Truncation keeps the first 16 tokens: same as classifying just those.
    ids = capped.tokenizer(long_text, truncation=True, max_length=16)["input_ids"]
    prefix = capped.tokenizer.decode(ids[1:-1])
    [expected] = capped.classify([prefix])
    assert result["label"] == expected["label"]
    assert result["score"] == pytest.approx(expected["score"], abs=1e-5)
    assert TextClassifier.from_path(model_dir, max_length=100_000).max_length == 128
    with pytest.raises(ValueError, match="max_length=1"):
        TextClassifier.from_path(model_dir, max_length=1)


def test_empty_list_is_empty(classifier):
    assert classifier.classify([]) == []


def test_missing_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-run"
    with pytest.raises(ModelLoadError, match="no such directory") as err:
        TextClassifier.from_path(str(missing))
    assert str(missing) in str(err.value) and "model/config.json" in str(err.value)
    with pytest.raises(ModelLoadError, match="no such directory"):
        TextClassifier.from_path(missing)  # a Path is always local, never a Hub id
    with pytest.raises(ModelLoadError, match="no such directory"):
        TextClassifier.from_path("./runs/agnews-bert-does-not-exist/model")


def test_directory_without_a_model_names_what_was_looked_for(tmp_path):
    (tmp_path / "result.json").write_text("{}")
    with pytest.raises(ModelLoadError) as err:
        TextClassifier.from_path(tmp_path)
    msg = str(err.value)
    assert "not a model directory" in msg
    assert str(tmp_path / "config.json") in msg and str(tmp_path / "model" / "config.json") in msg
    file = tmp_path / "result.json"
    with pytest.raises(ModelLoadError, match="is a file"):
        TextClassifier.from_path(file)


def test_model_dir_without_weights_is_a_clear_error(tmp_path, model_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="could not load a sequence-classification model") as err:
        TextClassifier.from_path(broken)
    assert str(broken) in str(err.value)


def test_hub_id_offline_fails_fast_and_names_the_id():
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        TextClassifier.from_path("llmlab-test/no-such-model", local_files_only=True)
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert "llmlab-test/no-such-model" in msg and "Hugging Face Hub" in msg


def test_hub_ids_are_recognised_and_paths_are_not(tmp_path, monkeypatch):
    assert not resolve_model_source("textattack/bert-base-uncased-ag-news").is_local
    assert not resolve_model_source("distilbert-base-uncased").is_local
    for path in ("/abs/missing", "a/b/c", "~/x", "../up"):
        with pytest.raises(ModelLoadError):
            resolve_model_source(path)
    # A relative run path whose parent folder exists is a path (a typo), not a Hub id to try online.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ModelLoadError, match="no such directory"):
        resolve_model_source("runs/agnews-bert-typo")


def test_run_dir_without_a_model_says_so(tmp_path):
    (tmp_path / "config.json").write_text('{"recipe": "imdb-lstm"}')
    with pytest.raises(ModelLoadError, match="not a transformers model config"):
        TextClassifier.from_path(tmp_path)
