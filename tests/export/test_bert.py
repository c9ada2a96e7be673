"""agnews-bert runs (real data: the bert-base-uncased vocabulary and AG News from LLMLAB_DATA) export as the
HF model directory they saved: transformers' AutoTokenizer + AutoModelForSequenceClassification give the
token ids and logits of the classifier `llmlab serve` / `llmlab predict` load from the run (TextClassifier),
and `pipeline` names one of the four AG News classes.

Both sides run the same transformers code on the same float32 weights and inputs: the logits are equal up
to nothing but thread scheduling (1e-6)."""

from __future__ import annotations

import torch

from tests.export.helpers import front_matter, read_json, section

TEXTS = ["Stocks rallied after the central bank held rates.", "The striker scored twice in the final."]


def test_transformers_loads_the_classifier(train, export):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llmlab.serve.model import TextClassifier

    run_dir, out = train("agnews-bert"), export("agnews-bert")
    ours = TextClassifier.from_path(run_dir)  # how llmlab serve loads the run (RUN/model/)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    ref = ours.tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(enc["input_ids"], ref["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).logits, ours.model(**ref).logits, rtol=0, atol=1e-6)
    saved = read_json(run_dir / "model" / "config.json")
    assert read_json(out / "config.json")["id2label"] == saved["id2label"]


def test_pipeline_and_card(export):
    from transformers import pipeline

    out = export("agnews-bert")
    labels = set(read_json(out / "config.json")["id2label"].values())
    assert pipeline("text-classification", model=str(out))(TEXTS[0])[0]["label"] in labels
    meta = front_matter(out / "README.md")
    assert meta["pipeline_tag"] == "text-classification" and meta["datasets"] == ["fancyzhx/ag_news"]
    (result,) = meta["model-index"][0]["results"][:1]
    assert result["dataset"]["type"] == "fancyzhx/ag_news"
    assert "RANDOM weights" in section(out / "README.md", "Limitations")
    assert 'pipeline("text-classification"' in section(out / "README.md", "How to load")
