"""The HTTP API over real HTTP to a waitress server on 127.0.0.1: happy path, every bad input, the endpoints.

Each test starts its own server (port 0) and stops it at the end, so nothing outlives a test.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from openapi_spec_validator import validate

from llmlab.config import ConfigError
from llmlab.serve.app import ServeLimits, start_server
from tests.serve.helpers import AG_NEWS_LABELS, TEXTS, FakeClassifier, classify, request

LIMITS = ServeLimits(
    max_texts=8, max_chars=500, max_body_bytes=20_000, max_batch_size=8, max_wait_ms=2, max_queue=64
)


@pytest.fixture
def server(classifier):
    with start_server(classifier, LIMITS) as handle:
        yield handle


def test_classify_happy_path(server, classifier):
    reply = classify(server.port, TEXTS[:3])
    assert reply.status == 200 and reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert body["model"] == classifier.name
    expected = classifier.classify(TEXTS[:3])
    assert len(body["results"]) == 3
    for got, want in zip(body["results"], expected, strict=True):
        assert got["label"] == want["label"] and list(got["scores"]) == AG_NEWS_LABELS
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)
    # A +json media type and a charset parameter are fine too.
    body = json.dumps({"texts": ["Oil prices fell."]})
    for ctype in ("application/json; charset=utf-8", "application/vnd.api+json"):
        assert request(server.port, "POST", "/v1/classify", body, content_type=ctype).status == 200


def test_texts_beyond_max_length_tokens_are_truncated_not_refused(server, classifier):
    long_text = " ".join(["stocks"] * 400)[: LIMITS.max_chars]  # ~70 words, more tokens with punctuation
    long_text = long_text.replace(" ", ".")  # each "." is a token of its own: ~140 tokens > 128
    assert len(classifier.tokenizer(long_text)["input_ids"]) > classifier.max_length
    reply = classify(server.port, [long_text])
    assert reply.status == 200 and reply.json()["results"][0]["label"] in AG_NEWS_LABELS


def _post(port, body, content_type="application/json"):
    return request(port, "POST", "/v1/classify", body, content_type=content_type)


BAD_BODIES = [
    # (body, status, error code, words in the message)
    ('{"texts": ["a"]', 400, "invalid_json", "not valid JSON"),
    ("", 400, "invalid_json", "not valid JSON"),
    (b"\xff\xfe{}", 400, "invalid_json", "UTF-8"),
    ("[" * 5000 + "]" * 5000, 400, "invalid_json", "nested too deeply"),
    ('["a", "b"]', 400, "invalid_body", "must be an object"),
    ('"just a string"', 400, "invalid_body", "got a string"),
    ("null", 400, "invalid_body", "got null"),
    ("{}", 400, "missing_field", "missing key 'texts'"),
    ('{"text": ["a"]}', 400, "unknown_field", "'text'"),
    ('{"texts": ["a"], "top_k": 2}', 400, "unknown_field", "the only accepted key is 'texts'"),
    ('{"texts": "a single text"}', 400, "invalid_texts", "wrap a single text in a list"),
    ('{"texts": {"a": 1}}', 400, "invalid_texts", "got an object"),
    ('{"texts": null}', 400, "invalid_texts", "got null"),
    ('{"texts": []}', 400, "empty_texts", "at least one text"),
    ('{"texts": ["ok", 3]}', 400, "invalid_text", "texts[1] must be a string; got a number"),
    ('{"texts": ["ok", ["nested"]]}', 400, "invalid_text", "got an array"),
    ('{"texts": [true]}', 400, "invalid_text", "got a boolean"),
    ('{"texts": ["ok", ""]}', 400, "empty_text", "texts[1] is empty"),
    ('{"texts": [" \\t\\n\\u3000 "]}', 400, "empty_text", "whitespace only"),
    ('{"texts": ["\\ud800 lone surrogate"]}', 400, "invalid_text", "unpaired surrogate"),
    (json.dumps({"texts": ["x"] * 9}), 400, "too_many_texts", "9 texts in one request; at most 8"),
    (
        json.dumps({"texts": ["ok", "y" * 501]}),
        400,
        "text_too_long",
        "texts[1] has 501 characters; at most 500",
    ),
    (json.dumps({"texts": ["z" * 30_000]}), 413, "payload_too_large", "at most 20000"),
    (json.dumps({"texts": ["z" * 200_000]}), 413, "payload_too_large", "at most 20000"),
]


@pytest.mark.parametrize("body, status, code, words", BAD_BODIES, ids=[b[2] for b in BAD_BODIES])
def test_bad_bodies_get_a_clear_json_error(server, body, status, code, words):
    reply = _post(server.port, body)
    assert reply.status == status, reply.body[:300]
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()["error"]
    assert error["code"] == code and words in error["message"]


@pytest.mark.parametrize(
    "content_type, words",
    [
        (None, "no Content-Type"),
        ("text/plain", "'text/plain'"),
        ("application/x-www-form-urlencoded", "form"),
    ],
)
def test_wrong_content_type_is_415(server, content_type, words):
    reply = _post(server.port, '{"texts": ["a"]}', content_type=content_type)
    assert reply.status == 415 and reply.error_code == "unsupported_media_type"
    assert words in reply.json()["error"]["message"]


def test_wrong_method_405_and_unknown_path_404(server):
    reply = request(server.port, "GET", "/v1/classify")
    assert reply.status == 405 and reply.error_code == "method_not_allowed"
    assert (
        "POST" in reply.headers["allow"]
        and "GET is not allowed on /v1/classify" in reply.json()["error"]["message"]
    )
    for method in ("PUT", "DELETE", "PATCH"):
        assert request(server.port, method, "/v1/classify", "{}").status == 405
    reply = request(server.port, "POST", "/healthz", "{}")
    assert reply.status == 405 and reply.error_code == "method_not_allowed"
    for path in ("/", "/v1/classify/", "/v2/classify", "/v1/models", "/%ff"):
        reply = request(server.port, "GET", path)
        assert reply.status == 404 and reply.error_code == "not_found", path
        assert "/openapi.json" in reply.json()["error"]["message"]


def test_health_ready_model_and_stats(server, classifier):
    assert request(server.port, "GET", "/healthz").json() == {"status": "ok"}
    ready = request(server.port, "GET", "/readyz")
    assert ready.status == 200 and ready.json()["status"] == "ready"
    info = request(server.port, "GET", "/v1/model").json()
    assert info["name"] == classifier.name and info["labels"] == AG_NEWS_LABELS
    assert info["max_length"] == 128 and info["device"] == "cpu"
    assert info["limits"]["max_texts"] == 8 and info["limits"]["max_body_bytes"] == 20_000
    classify(server.port, TEXTS[:2])
    stats = request(server.port, "GET", "/v1/stats").json()["batcher"]
    assert stats["requests"] == 1 and stats["texts"] == 2 and stats["batches"] == 1
    assert stats["batch_size_histogram"] == {"2": 1}


def test_openapi_document_describes_every_endpoint_and_error(server):
    reply = request(server.port, "GET", "/openapi.json")
    assert reply.status == 200
    doc = reply.json()
    assert doc["openapi"].startswith("3.")
    assert {"/v1/classify", "/healthz", "/readyz", "/v1/model", "/v1/stats", "/openapi.json"} <= set(
        doc["paths"]
    )
    post = doc["paths"]["/v1/classify"]["post"]
    assert {"200", "400", "405", "413", "415", "500", "503", "504"} <= set(post["responses"])
    request_schema = doc["components"]["schemas"]["ClassifyRequest"]
    assert request_schema["additionalProperties"] is False
    assert request_schema["properties"]["texts"]["maxItems"] == 8
    assert request_schema["properties"]["texts"]["items"]["maxLength"] == 500
    assert doc["components"]["schemas"]["Result"]["properties"]["label"]["enum"] == AG_NEWS_LABELS
    # Every $ref resolves.
    refs = []

    def walk(node):
        if isinstance(node, dict):
            refs.extend(v for k, v in node.items() if k == "$ref")
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    assert refs
    for ref in refs:
        _, section, kind, name = ref.split("/")
        assert name in doc[section][kind], ref
    validate(doc)  # the OpenAPI 3 schema itself (openapi-spec-validator, in the test extra: never skipped)


def test_overloaded_is_503_with_retry_after():
    gate = threading.Event()
    fake = FakeClassifier(gate=gate)
    limits = ServeLimits(max_texts=2, max_batch_size=2, max_wait_ms=0, max_queue=2, request_timeout_s=10)
    with start_server(fake, limits) as handle:
        replies = {}
        first = threading.Thread(
            target=lambda: replies.setdefault("first", classify(handle.port, ["a", "b"]))
        )
        first.start()
        assert fake.entered.wait(10)  # the worker is busy with the first request
        second = threading.Thread(
            target=lambda: replies.setdefault("second", classify(handle.port, ["c", "d"]))
        )
        second.start()
        deadline = time.monotonic() + 10
        while handle.state.batcher.stats()["queued_texts"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        reply = classify(handle.port, ["e"])
        gate.set()
        first.join(10)
        second.join(10)
    assert reply.status == 503 and reply.error_code == "overloaded"
    assert int(reply.headers["retry-after"]) >= 1
    assert replies["first"].status == 200 and replies["second"].status == 200


def test_slow_model_is_504_timeout():
    gate = threading.Event()
    with start_server(FakeClassifier(gate=gate), ServeLimits(request_timeout_s=0.2, max_wait_ms=0)) as handle:
        try:
            reply = classify(handle.port, ["waits forever"])
        finally:
            gate.set()
    assert reply.status == 504 and reply.error_code == "timeout"
    assert "request_timeout_s=0.2" in reply.json()["error"]["message"]


def test_not_ready_after_the_batcher_stops():
    with start_server(FakeClassifier(), ServeLimits()) as handle:
        assert request(handle.port, "GET", "/readyz").status == 200
        handle.state.batcher.close()
        ready = request(handle.port, "GET", "/readyz")
        reply = classify(handle.port, ["hello"])
        alive = request(handle.port, "GET", "/healthz")
    assert ready.status == 503 and ready.error_code == "not_ready" and "retry-after" in ready.headers
    assert reply.status == 503 and reply.error_code == "not_ready"
    assert alive.status == 200


def test_a_model_failure_is_a_logged_json_500_and_the_server_carries_on(caplog):
    with start_server(FakeClassifier(fail_on="boom"), ServeLimits(max_wait_ms=0)) as handle:
        with caplog.at_level(logging.ERROR, logger="llmlab.serve"):
            reply = classify(handle.port, ["boom"])
        after = classify(handle.port, ["fine afterwards"])
    assert reply.status == 500 and reply.error_code == "internal_error"
    assert (
        "RuntimeError" in reply.json()["error"]["message"] and "boom" not in reply.json()["error"]["message"]
    )
    assert any(
        "unexpected error on POST /v1/classify" in r.getMessage() and r.exc_info for r in caplog.records
    )
    assert after.status == 200 and after.json()["results"][0]["label"] == "long"


def test_server_close_stops_listening(classifier):
    handle = start_server(classifier, LIMITS)
    port = handle.port
    assert request(port, "GET", "/healthz").status == 200
    handle.close()
    handle.close()  # idempotent
    with pytest.raises(OSError):
        request(port, "GET", "/healthz", timeout=2)
    assert not handle.state.batcher.running


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"max_texts": 0}, "max_texts=0"),
        ({"max_wait_ms": -1}, "max_wait_ms"),
        ({"request_timeout_s": 0}, "request_timeout_s"),
        ({"max_queue": 4, "max_texts": 8}, "could never be queued"),
        ({"max_batch_size": 2.5}, "positive integer"),
    ],
)
def test_bad_limits_are_config_errors(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        ServeLimits(**kwargs)
