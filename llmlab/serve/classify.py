"""POST /v1/classify: a text classifier behind the shared HTTP rules (httpapi.py), micro-batched.

    POST /v1/classify   {"texts": ["...", ...]} -> {"model": NAME, "results": [{"label", "score", "scores"}]}

Request rules (documented in /openapi.json): the body is an object with exactly one key, `texts` (unknown keys
are rejected, so a typo such as "text" is not silently ignored); `texts` is a non-empty list of at most
`max_texts` strings, each with at least one non-whitespace character and at most `max_chars` characters
(Unicode code points). Token truncation to the model's max_length is normal and not an error. Requests of all
clients share model calls through the adaptive MicroBatcher (batching.py); a text's result does not depend
on its batch.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Protocol

import flask

from llmlab.serve.batching import MicroBatcher
from llmlab.serve.httpapi import (
    NOT_READY_HEADERS,
    ApiError,
    check_request,
    json_type,
    parse_json_object,
    reject_unknown_keys,
    run_on_batcher,
)
from llmlab.serve.limits import ServeLimits
from llmlab.serve.openapi import openapi_document


class Classifier(Protocol):
    """What the app needs from a model (TextClassifier satisfies it; tests use small fakes)."""

    name: str
    labels: list[str]
    max_length: int

    def classify(self, texts: list[str]) -> list[dict[str, Any]]: ...


def parse_classify_body(data: bytes, limits: ServeLimits) -> list[str]:
    """The validated `texts` of a /v1/classify body, or an ApiError(400) saying exactly what is wrong."""
    body = parse_json_object(data, '{"texts": ["..."]}')
    reject_unknown_keys(body, ["texts"])
    if "texts" not in body:
        raise ApiError(400, "missing_field", "missing key 'texts' (a list of strings)")
    texts = body["texts"]
    if not isinstance(texts, list):
        hint = '; wrap a single text in a list: {"texts": ["..."]}' if isinstance(texts, str) else ""
        raise ApiError(
            400, "invalid_texts", f"'texts' must be a list of strings; got {json_type(texts)}{hint}"
        )
    if not texts:
        raise ApiError(400, "empty_texts", "'texts' is empty; send at least one text")
    if len(texts) > limits.max_texts:
        raise ApiError(
            400,
            "too_many_texts",
            f"{len(texts)} texts in one request; at most {limits.max_texts} are allowed",
        )
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ApiError(400, "invalid_text", f"texts[{i}] must be a string; got {json_type(text)}")
        if len(text) > limits.max_chars:
            raise ApiError(
                400,
                "text_too_long",
                f"texts[{i}] has {len(text)} characters; at most {limits.max_chars} are allowed "
                "(longer texts are cut to the model's max_length tokens anyway)",
            )
        if not text.strip():
            raise ApiError(400, "empty_text", f"texts[{i}] is empty or whitespace only")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800" in the JSON
            raise ApiError(
                400, "invalid_text", f"texts[{i}] is not valid Unicode (it contains an unpaired surrogate)"
            ) from None
    return texts


class ClassifyEndpoint:
    """The classifier's side of the app (app.py's `Endpoint`): its route, batcher, model info and OpenAPI."""

    path = "/v1/classify"
    kind = "classifier"
    description = "a text classifier"

    def __init__(self, classifier: Classifier, limits: ServeLimits) -> None:
        self.model = classifier
        self.limits = limits
        self.batcher: MicroBatcher = MicroBatcher(
            classifier.classify,
            max_batch_size=limits.max_batch_size,
            max_wait_ms=limits.max_wait_ms,
            max_queue=limits.max_queue,
            adaptive=True,
        )

    @property
    def ready(self) -> bool:
        return self.model is not None and self.batcher.running

    def handle(self, req: flask.Request) -> dict[str, Any]:
        # Announced before parsing, so an open batch waits for this request (see batching.py).
        with self.batcher.arriving():
            check_request(req, self.limits.max_body_bytes)
            texts = parse_classify_body(req.get_data(cache=False), self.limits)
            if not self.ready:
                raise ApiError(503, "not_ready", "the model is not ready; retry shortly", NOT_READY_HEADERS)
            results = run_on_batcher(self.batcher, texts, self.limits.request_timeout_s)
        return {"model": self.model.name, "results": results}

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "name": self.model.name,
            "kind": self.kind,
            "labels": list(self.model.labels),
            "max_length": self.model.max_length,
        }
        device = getattr(self.model, "device", None)
        if device is not None:
            info["device"] = str(device)
        info["limits"] = asdict(self.limits)
        return info

    def stats(self) -> dict[str, Any]:
        return {"model": self.model.name, "batcher": self.batcher.stats()}

    def openapi(self) -> dict[str, Any]:
        return openapi_document(self.limits, labels=list(self.model.labels), model_name=self.model.name)

    def default_threads(self) -> int:
        # Request threads mostly wait on the batcher; a full batch needs max_batch_size of them in flight.
        return max(8, 2 * self.limits.max_batch_size)

    def banner(self) -> str:
        labels = ", ".join(self.model.labels)
        device = getattr(self.model, "device", "?")
        return (
            f"{self.model.name} [{labels}] on {device}, max_length {self.model.max_length} tokens; "
            f"batches of up to {self.limits.max_batch_size} texts, wait {self.limits.max_wait_ms:g} ms"
        )
