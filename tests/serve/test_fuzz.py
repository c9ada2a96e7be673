"""Fuzzing the API with hypothesis over real HTTP: no generated request may produce a 5xx or a non-JSON body.

Bounded: a fixed number of examples, a per-example deadline, small payloads, and one server per test.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmlab.serve.app import ServeLimits, start_server
from tests.serve.helpers import request

LIMITS = ServeLimits(max_texts=4, max_chars=200, max_body_bytes=4_000, max_batch_size=8, max_wait_ms=1)
FUZZ = settings(
    max_examples=100,
    deadline=5_000,  # ms per example, generous for a busy 2-core machine
    database=None,  # nothing written into the repo
    suppress_health_check=[HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# Bodies close to valid reach the model and the validation edges more often than random JSON does.
near_valid = st.fixed_dictionaries(
    {
        "texts": st.lists(st.text(max_size=250), max_size=6)
        | st.lists(st.text(max_size=250) | json_values, max_size=6)
    },
    optional={"extra": json_values},
)
# Valid requests of arbitrary Unicode (control characters, combining marks, emoji...) reach the tokenizer.
valid = st.fixed_dictionaries(
    {"texts": st.lists(st.text(min_size=1, max_size=200).filter(str.strip), min_size=1, max_size=4)}
)
paths = st.sampled_from(
    ["/v1/classify", "/healthz", "/readyz", "/v1/model", "/v1/stats", "/openapi.json", "/", "/v1", "/x/../y"]
)
content_types = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/problem+json",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "",
        "json",
    ]
)


def _check(reply, path: str) -> None:
    assert reply.status < 500, (reply.status, reply.body[:300])
    body = json.loads(reply.body)  # always JSON
    if reply.status >= 400:
        assert set(body) == {"error"} and {"code", "message"} <= set(body["error"])
        assert body["error"]["message"]


def test_fuzz_json_payloads_never_5xx(classifier):
    with start_server(classifier, LIMITS) as handle:

        @FUZZ
        @given(payload=valid | near_valid | json_values, ensure_ascii=st.booleans())
        def check(payload, ensure_ascii):
            body = json.dumps(payload, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")
            reply = request(handle.port, "POST", "/v1/classify", body, timeout=20)
            _check(reply, "/v1/classify")
            if reply.status == 200:
                assert len(reply.json()["results"]) == len(payload["texts"])

        check()
        stats = handle.state.batcher.stats()
    assert stats["failed_batches"] == 0


# Raw bodies: random bytes, and valid JSON with random bytes spliced in (close to parsing, then broken).
raw_bodies = st.binary(max_size=300) | st.builds(
    lambda payload, cut, junk: (lambda b: b[:cut] + junk + b[cut:])(json.dumps(payload).encode()),
    near_valid,
    st.integers(0, 60),
    st.binary(max_size=4),
)
any_request = st.tuples(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
    paths,
    st.binary(max_size=50) | st.none(),
    content_types,
)
classify_request = st.tuples(st.just("POST"), st.just("/v1/classify"), raw_bodies | st.none(), content_types)


def test_fuzz_raw_requests_never_5xx(classifier):
    with start_server(classifier, LIMITS) as handle:

        @FUZZ
        @given(req=classify_request | any_request)
        def check(req):
            method, path, body, content_type = req
            reply = request(handle.port, method, path, body, content_type=content_type or None, timeout=20)
            if method in ("HEAD", "OPTIONS"):
                assert reply.status < 500  # no body to check
                return
            _check(reply, path)

        check()
