"""Serving against its twin: `/v1/classify` over real HTTP gives the labels and scores that
`transformers.pipeline("text-classification")` gives on the same saved model directory and the same texts.

The server tokenizes a request's texts together (padded to the longest, truncated to the model's max_length),
runs one batch and takes a float32 torch softmax; the pipeline runs each text alone, unpadded, and takes a
numpy softmax of the float32 logits. The attention mask keeps the padding out exactly (masked scores become
exp(-huge) = 0), so the same model on the same tokens gives the same logits up to float32 rounding: the padded
batch's matmuls sum in other blocks than one text's. With this wide-init model (logits up to ~6) that is up to
8e-6 on a logit (measured, ~17 float32 ulps after 2 layers), and a softmax passes at most half of it to a
probability: measured at most 2.6e-6 between the served and the pipeline's scores. ABS_TOL = 5e-5 leaves a
20x margin, while what a serving bug does is far larger: scores under the wrong label, a sigmoid instead of a
softmax, padding leaking into a text, or truncation at another length move scores by 1e-2 or more (the texts
get clearly different scores; see tests/serve/helpers.py; LONG below is cut at max_length).
"""

from __future__ import annotations

import pytest

from llmlab.serve.app import ServeLimits, start_server
from tests.serve.helpers import TEXTS, classify

ABS_TOL = 5e-5  # see the module docstring
# > 128 tokens (212 with the real vocab), and its scores hang on where it is cut: one token fewer moves a
# score by 7e-2, so a truncation at another length than max_length cannot pass.
LONG = " ".join(TEXTS + TEXTS[::-1])


@pytest.fixture(scope="module")
def pipe(model_dir):
    from transformers import pipeline

    return pipeline("text-classification", model=str(model_dir), device="cpu")


def test_classify_over_http_equals_the_transformers_pipeline(model_dir, classifier, pipe, one_torch_thread):
    texts = [*TEXTS, LONG]
    assert len(classifier.tokenizer(LONG)["input_ids"]) > classifier.max_length  # it is truncated
    limits = ServeLimits(max_texts=16, max_chars=2000, max_batch_size=16)
    with start_server(classifier, limits) as handle:
        reply = classify(handle.port, texts)  # one request: one padded batch of texts of unequal lengths
    assert reply.status == 200, reply.body
    served = reply.json()["results"]
    # All scores of each text (top_k=None), truncated at the server's max_length like the server does.
    expected = pipe(texts, top_k=None, truncation=True, max_length=classifier.max_length)
    assert len(served) == len(expected) == len(texts)
    labels_seen = set()
    for text, got, want in zip(texts, served, expected, strict=True):
        want_scores = {r["label"]: r["score"] for r in want}
        assert set(got["scores"]) == set(want_scores) == set(pipe.model.config.id2label.values())
        assert got["label"] == want[0]["label"], text  # the pipeline sorts by score, best first
        assert got["score"] == pytest.approx(want[0]["score"], abs=ABS_TOL), text
        for label, score in want_scores.items():
            assert got["scores"][label] == pytest.approx(score, abs=ABS_TOL), (text, label)
        labels_seen.add(got["label"])
    assert len(labels_seen) >= 2  # the texts are told apart: a mix-up of labels cannot hide
