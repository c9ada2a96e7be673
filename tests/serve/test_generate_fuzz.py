"""Fuzzing /v1/generate with hypothesis over real HTTP: no generated request may produce a 5xx or a non-JSON
body, and every 200 holds n samples of at most max_new_tokens tokens.

Bounded: a fixed number of examples, a per-example deadline, small payloads, tiny generations, one server.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmlab.serve.app import start_server
from llmlab.serve.generate import GenerateLimits
from tests.serve.helpers import LM_CHARS, request

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LIMITS = GenerateLimits(max_prompt_chars=60, max_new_tokens=4, max_n=2, max_body_bytes=2_000)
FUZZ = settings(
    max_examples=80,
    deadline=5_000,  # ms per example, generous for a busy 2-core machine
    database=None,  # nothing written into the repo
    suppress_health_check=[HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
# Valid requests of every parameter's whole range (tiny generations) reach the model: none may fail there.
valid = st.fixed_dictionaries(
    {"prompt": st.text(alphabet=LM_CHARS, min_size=1, max_size=60)},
    optional={
        "max_new_tokens": st.integers(1, LIMITS.max_new_tokens),
        "temperature": st.just(0.0) | st.floats(0.01, 100),
        "top_k": st.none() | st.integers(1, 2**31 - 1),
        "top_p": st.none() | st.floats(0, 1, exclude_min=True),
        "repetition_penalty": st.floats(0.01, 100),
        "n": st.integers(1, LIMITS.max_n),
        "seed": st.none() | st.integers(0, 2**63 - 1),
    },
)
numbers = st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=True, allow_infinity=True)
# Near-valid bodies: every key, values of any type and range, prompts of any Unicode or of the vocabulary.
near_valid = st.fixed_dictionaries(
    {"prompt": st.text(max_size=70) | st.text(alphabet=LM_CHARS, min_size=1, max_size=70) | json_values},
    optional={
        "max_new_tokens": numbers,
        "temperature": numbers,
        "top_k": numbers,
        "top_p": numbers,
        "repetition_penalty": numbers,
        "n": numbers,
        "seed": numbers | st.integers(0, 2**64),
    },
)


def test_fuzz_generate_never_5xx(language_model):
    with start_server(language_model, LIMITS) as handle:

        @FUZZ
        @given(payload=valid | near_valid | json_values, ensure_ascii=st.booleans())
        def check(payload, ensure_ascii):
            body = json.dumps(payload, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")
            reply = request(handle.port, "POST", "/v1/generate", body, timeout=20)
            assert reply.status < 500, (reply.status, reply.body[:300])
            out = json.loads(reply.body)  # always JSON
            if reply.status >= 400:
                assert set(out) == {"error"} and out["error"]["message"]
                return
            assert len(out["results"]) == (payload.get("n") or 1)
            assert all(0 < r["tokens"] <= LIMITS.max_new_tokens for r in out["results"])

        check()
        stats = handle.state.batcher.stats()
    assert stats["failed_batches"] == 0 and stats["requests"] > 0
