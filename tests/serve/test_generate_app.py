"""POST /v1/generate over real HTTP to a waitress server on 127.0.0.1: a tiny GPT run (char-level, context 16)
and fakes for the edges (overload, timeout, failure). Each test starts its own server and stops it at the end.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from llmlab.config import ConfigError
from llmlab.nn.sampling import SampleConfig
from llmlab.serve.app import start_server
from llmlab.serve.generate import GenerateLimits
from tests.serve.helpers import LM_CHARS, FakeLanguageModel, generate, request

LIMITS = GenerateLimits(max_prompt_chars=200, max_new_tokens=40, max_n=4, max_body_bytes=4_000, max_queue=4)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

GENERATE_PATHS = {"/v1/generate", "/healthz", "/readyz", "/v1/model", "/v1/stats", "/openapi.json"}


@pytest.fixture
def server(language_model):
    with start_server(language_model, LIMITS) as handle:
        yield handle


@pytest.fixture(scope="module")
def generator(lm_run_dir):
    from llmlab.recipes.gpt_lm import Generator

    return Generator.from_run(lm_run_dir)


def test_generate_happy_path(server, language_model):
    reply = generate(server.port, {"prompt": "The king", "max_new_tokens": 12, "n": 2, "seed": 0})
    assert reply.status == 200 and reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert list(body) == ["model", "results", "usage", "seed"]
    assert body["model"] == language_model.name == "shakespeare-gpt-tiny" and body["seed"] == 0
    assert len(body["results"]) == 2
    for result in body["results"]:
        assert result["tokens"] == 12 and result["finish_reason"] == "length"
        assert len(result["text"]) == 12 and set(result["text"]) <= set(LM_CHARS)  # one character per token
    assert body["usage"] == {
        "prompt_tokens": 8,
        "prompt_tokens_dropped": 0,
        "completion_tokens": 24,
        "total_tokens": 32,
    }
    # Defaults: max_new_tokens min(200, limit), one sample; a +json type and a charset are fine.
    reply = request(
        server.port, "POST", "/v1/generate", '{"prompt": "a"}', content_type="application/json; charset=utf-8"
    )
    assert reply.status == 200
    [result] = reply.json()["results"]
    assert result["tokens"] == LIMITS.max_new_tokens
    body = json.dumps({"prompt": "a", "top_k": None, "top_p": None, "seed": None, "temperature": None})
    assert (
        request(server.port, "POST", "/v1/generate", body, content_type="application/vnd.api+json").status
        == 200
    )


def test_same_seed_same_texts_and_a_drawn_seed_is_returned(server):
    body = {"prompt": "ROMEO:", "max_new_tokens": 16, "temperature": 1.0, "n": 3, "seed": 5}
    first, second = generate(server.port, body).json(), generate(server.port, body).json()
    assert first["results"] == second["results"]
    texts = [r["text"] for r in first["results"]]
    other = generate(server.port, {**body, "seed": 6}).json()
    assert [r["text"] for r in other["results"]] != texts
    unseeded = generate(server.port, {k: v for k, v in body.items() if k != "seed"}).json()
    again = generate(server.port, {**body, "seed": unseeded["seed"]}).json()
    assert isinstance(unseeded["seed"], int) and again["results"] == unseeded["results"]


def test_greedy_equals_generator_sample(server, generator):
    for prompt in ("The king", "a", "Hello, world!"):
        reply = generate(server.port, {"prompt": prompt, "max_new_tokens": 20, "temperature": 0, "seed": 9})
        want = generator.sample(prompt, SampleConfig(max_new_tokens=20, temperature=0.0), count=1, seed=0)
        assert [r["text"] for r in reply.json()["results"]] == want


def test_sampling_equals_generator_sample_and_llmlab_generate(server, generator, lm_run_dir, capsys):
    options = {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.3}
    body = {"prompt": "To be", "max_new_tokens": 25, "n": 3, "seed": 7, **options}
    reply = generate(server.port, body)
    got = [r["text"] for r in reply.json()["results"]]
    want = generator.sample("To be", SampleConfig(max_new_tokens=25, **options), count=3, seed=7)
    assert got == want and len(set(got)) > 1

    from llmlab.cli import main

    args = ["generate", str(lm_run_dir), "To be", "--max-new-tokens", "25", "--num-samples", "3"]
    args += ["--seed", "7", "--temperature", "0.9", "--top-k", "20", "--top-p", "0.9"]
    assert main([*args, "--repetition-penalty", "1.3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["samples"] == got


def test_a_prompt_longer_than_the_context_is_cut_from_the_left(server, language_model):
    context = language_model.context_length
    prompt = "Now is the winter of our discontent"  # 35 characters, context 16
    long_reply = generate(server.port, {"prompt": prompt, "max_new_tokens": 10, "temperature": 0})
    short_reply = generate(server.port, {"prompt": prompt[-context:], "max_new_tokens": 10, "temperature": 0})
    assert long_reply.status == 200
    assert long_reply.json()["usage"]["prompt_tokens"] == context
    assert long_reply.json()["usage"]["prompt_tokens_dropped"] == len(prompt) - context
    assert long_reply.json()["results"] == short_reply.json()["results"]


def test_a_sample_stops_at_the_end_of_text_token(lm_run_dir, generator):
    from llmlab.serve.lm import load_language_model

    lm = load_language_model(lm_run_dir)
    greedy = generator.sample("The king", SampleConfig(max_new_tokens=10, temperature=0.0))[0]
    lm.eos_id = lm.tokenizer.encode(greedy[3])[0]  # as if the 4th greedy character ended the text
    end = greedy.index(greedy[3])
    with start_server(lm, LIMITS) as handle:
        body = {"prompt": "The king", "max_new_tokens": 10, "temperature": 0}
        [result] = generate(handle.port, body).json()["results"]
        info = request(handle.port, "GET", "/v1/model").json()
    assert result == {"text": greedy[:end], "tokens": end + 1, "finish_reason": "stop"}
    assert info["tokenizer"]["eos_id"] == lm.eos_id


def _post(port, body, content_type="application/json"):
    return request(port, "POST", "/v1/generate", body, content_type=content_type)


BAD_BODIES = [
    # (body, status, error code, words in the message)
    ('{"prompt": "a"', 400, "invalid_json", "not valid JSON"),
    ("", 400, "invalid_json", "not valid JSON"),
    (b"\xff\xfe{}", 400, "invalid_json", "UTF-8"),
    ("[" * 1500 + "]" * 1500, 400, "invalid_json", "nested too deeply"),
    ('["a"]', 400, "invalid_body", 'must be an object like {"prompt": "..."}'),
    ("null", 400, "invalid_body", "got null"),
    ("{}", 400, "missing_field", "missing key 'prompt'"),
    ('{"prompt": "a", "max_tokens": 5}', 400, "unknown_field", "did you mean 'max_new_tokens'?"),
    ('{"prompt": "a", "num_samples": 2}', 400, "unknown_field", "did you mean 'n'?"),
    ('{"prompt": "a", "temprature": 1}', 400, "unknown_field", "did you mean 'temperature'?"),
    ('{"texts": ["a"]}', 400, "unknown_field", "accepted keys: prompt, max_new_tokens, temperature"),
    ('{"prompt": 3}', 400, "invalid_prompt", "'prompt' must be a string; got a number"),
    ('{"prompt": ["a", "b"]}', 400, "invalid_prompt", "one prompt per request (use n"),
    ('{"prompt": null}', 400, "invalid_prompt", "got null"),
    ('{"prompt": "\\ud800 lone"}', 400, "invalid_prompt", "unpaired surrogate"),
    ('{"prompt": ""}', 400, "empty_prompt", "'prompt' is empty"),
    (json.dumps({"prompt": "a" * 201}), 400, "prompt_too_long", "201 characters; at most 200"),
    ('{"prompt": "Th\\u00e9 king"}', 400, "unencodable_prompt", "1 character is not in its vocabulary of 62"),
    (
        '{"prompt": "Th\\u00e9 king"}',
        400,
        "unencodable_prompt",
        "(char-62, the characters of its training text): 'é'",
    ),
    (
        json.dumps({"prompt": "漢字 and 🙂"}),
        400,
        "unencodable_prompt",
        "3 characters are not in its vocabulary",
    ),
    (
        '{"prompt": "a", "max_new_tokens": true}',
        400,
        "invalid_parameter",
        "must be an integer; got a boolean",
    ),
    ('{"prompt": "a", "max_new_tokens": 10.0}', 400, "invalid_parameter", "must be an integer; got 10.0"),
    ('{"prompt": "a", "max_new_tokens": "10"}', 400, "invalid_parameter", "got a string"),
    ('{"prompt": "a", "top_k": [5]}', 400, "invalid_parameter", "'top_k' must be an integer; got an array"),
    ('{"prompt": "a", "temperature": false}', 400, "invalid_parameter", "must be a number; got a boolean"),
    ('{"prompt": "a", "temperature": NaN}', 400, "invalid_parameter", "finite number; got nan"),
    ('{"prompt": "a", "top_p": Infinity}', 400, "invalid_parameter", "finite number; got inf"),
    ('{"prompt": "a", "repetition_penalty": 1e999}', 400, "invalid_parameter", "finite number"),
    ('{"prompt": "a", "max_new_tokens": 0}', 400, "parameter_out_of_range", "an integer >= 1 and <= 40"),
    ('{"prompt": "a", "max_new_tokens": 41}', 400, "parameter_out_of_range", "'max_new_tokens'=41"),
    ('{"prompt": "a", "temperature": -0.1}', 400, "parameter_out_of_range", "0, or >= 0.01 and <= 100"),
    ('{"prompt": "a", "temperature": 1e-300}', 400, "parameter_out_of_range", "'temperature'=1e-300"),
    ('{"prompt": "a", "temperature": 101}', 400, "parameter_out_of_range", "'temperature'=101"),
    ('{"prompt": "a", "top_k": 0}', 400, "parameter_out_of_range", "'top_k'=0"),
    ('{"prompt": "a", "top_p": 0}', 400, "parameter_out_of_range", "a number > 0 and <= 1"),
    ('{"prompt": "a", "top_p": 1.5}', 400, "parameter_out_of_range", "'top_p'=1.5"),
    ('{"prompt": "a", "repetition_penalty": 0}', 400, "parameter_out_of_range", ">= 0.01 and <= 100"),
    ('{"prompt": "a", "repetition_penalty": 1e-300}', 400, "parameter_out_of_range", ">= 0.01 and <= 100"),
    ('{"prompt": "a", "n": 0}', 400, "parameter_out_of_range", "'n'=0"),
    ('{"prompt": "a", "n": 5}', 400, "parameter_out_of_range", "an integer >= 1 and <= 4"),
    ('{"prompt": "a", "seed": -1}', 400, "parameter_out_of_range", "'seed'=-1"),
    ('{"prompt": "a", "seed": 9223372036854775808}', 400, "parameter_out_of_range", "<= 9223372036854775807"),
    ('{"prompt": "a", "top_k": 1' + "0" * 100 + "}", 400, "parameter_out_of_range", "..."),
    (json.dumps({"prompt": "z" * 5_000}), 413, "payload_too_large", "at most 4000"),
    (json.dumps({"prompt": "z" * 100_000}), 413, "payload_too_large", "at most 4000"),
]


@pytest.mark.parametrize(
    "body, status, code, words", BAD_BODIES, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD_BODIES)]
)
def test_bad_bodies_get_a_clear_json_error(server, body, status, code, words):
    reply = _post(server.port, body)
    assert reply.status == status, reply.body[:300]
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()["error"]
    assert error["code"] == code and words in error["message"], error


def test_a_prompt_with_no_tokens_is_400():
    with start_server(FakeLanguageModel(), LIMITS) as handle:  # its tokenizer drops whitespace
        reply = generate(handle.port, {"prompt": " \n\t "})
        kept = generate(handle.port, {"prompt": " a "})
    assert reply.status == 400 and reply.error_code == "empty_prompt"
    assert "no tokens after tokenisation (the fake-ascii tokenizer" in reply.json()["error"]["message"]
    assert kept.status == 200


@pytest.mark.parametrize(
    "content_type, words",
    [
        (None, "no Content-Type"),
        ("text/plain", "'text/plain'"),
        ("application/x-www-form-urlencoded", "form"),
    ],
)
def test_wrong_content_type_is_415(server, content_type, words):
    reply = _post(server.port, '{"prompt": "a"}', content_type=content_type)
    assert reply.status == 415 and reply.error_code == "unsupported_media_type"
    assert words in reply.json()["error"]["message"]


def test_only_the_served_endpoint_exists(server, classifier):
    reply = request(server.port, "POST", "/v1/classify", '{"texts": ["a"]}')
    assert reply.status == 404 and reply.error_code == "not_found"
    assert "this server serves a language model: POST /v1/generate" in reply.json()["error"]["message"]
    reply = request(server.port, "GET", "/v1/generate")
    assert reply.status == 405 and "POST" in reply.headers["allow"]
    for path in ("/", "/v1/generate/", "/v2/generate", "/v1/completions"):
        reply = request(server.port, "GET", path)
        assert reply.status == 404 and "/openapi.json" in reply.json()["error"]["message"], path
    with start_server(classifier) as handle:
        reply = request(handle.port, "POST", "/v1/generate", '{"prompt": "a"}')
        doc = request(handle.port, "GET", "/openapi.json").json()
    assert reply.status == 404 and reply.error_code == "not_found"
    assert "this server serves a text classifier: POST /v1/classify" in reply.json()["error"]["message"]
    assert "/v1/generate" not in doc["paths"] and "/v1/classify" in doc["paths"]


def test_health_ready_model_and_stats(server, language_model):
    assert request(server.port, "GET", "/healthz").json() == {"status": "ok"}
    ready = request(server.port, "GET", "/readyz").json()
    assert ready == {"status": "ready", "model": language_model.name}
    info = request(server.port, "GET", "/v1/model").json()
    assert info["name"] == language_model.name and info["kind"] == "language-model"
    assert info["tokenizer"] == {
        "name": f"char-{len(LM_CHARS)}",
        "vocab_size": len(LM_CHARS),
        "eos_id": None,
        "kind": "char",
        "characters": "".join(sorted(LM_CHARS)),
    }
    assert info["context_length"] == 16 and info["device"] == "cpu"
    assert info["limits"]["max_new_tokens"] == 40 and info["limits"]["max_n"] == 4
    assert info["limits"]["max_prompt_chars"] == 200 and info["limits"]["max_queue"] == 4
    assert info["defaults"] == {
        "max_new_tokens": 40,  # min(200, the limit)
        "temperature": 0.8,
        "top_k": None,
        "top_p": None,
        "repetition_penalty": 1.0,
        "n": 1,
        "seed": None,
    }
    generate(server.port, {"prompt": "abc", "max_new_tokens": 5, "n": 2})
    stats = request(server.port, "GET", "/v1/stats").json()
    assert stats["batcher"]["requests"] == 1 and stats["batcher"]["max_batch_size"] == 1
    gen = stats["generation"]
    assert (gen["requests"], gen["samples"], gen["prompt_tokens"], gen["completion_tokens"]) == (1, 2, 3, 10)
    assert gen["cancelled"] == 0 and gen["tokens_per_second"] > 0


def test_openapi_describes_the_generate_endpoint_with_every_bound(server):
    doc = request(server.port, "GET", "/openapi.json").json()
    assert doc["openapi"].startswith("3.") and set(doc["paths"]) == GENERATE_PATHS
    assert "generation" in doc["info"]["title"]
    post = doc["paths"]["/v1/generate"]["post"]
    assert {"200", "400", "405", "413", "415", "500", "503", "504"} <= set(post["responses"])
    schemas = doc["components"]["schemas"]
    req = schemas["GenerateRequest"]
    assert req["additionalProperties"] is False and req["required"] == ["prompt"]
    props = req["properties"]
    assert set(props) == {
        "prompt",
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "repetition_penalty",
    } | {
        "n",
        "seed",
    }
    assert props["prompt"]["maxLength"] == 200 and props["prompt"]["minLength"] == 1
    assert (
        "cut from the left" in props["prompt"]["description"]
        and "16 tokens" in props["prompt"]["description"]
    )
    bounds = {
        k: (v["minimum"], v["maximum"], v.get("exclusiveMinimum", False))
        for k, v in props.items()
        if k != "prompt"
    }
    assert bounds == {
        "max_new_tokens": (1, 40, False),
        "temperature": (0, 100, False),
        "top_k": (1, 2**31 - 1, False),
        "top_p": (0, 1, True),
        "repetition_penalty": (0.01, 100, False),
        "n": (1, 4, False),
        "seed": (0, 2**63 - 1, False),
    }
    assert props["max_new_tokens"]["default"] == 40 and props["temperature"]["default"] == 0.8
    gap = props["temperature"]["not"]  # 0 < temperature < 0.01 is refused: the logits would overflow
    assert (gap["minimum"], gap["exclusiveMinimum"], gap["maximum"], gap["exclusiveMaximum"]) == (
        0,
        True,
        0.01,
        True,
    )
    assert all(props[k]["nullable"] for k in bounds)
    assert "max_new_tokens an integer >= 1 and <= 40" in post["description"]
    assert set(schemas["Completion"]["properties"]["finish_reason"]["enum"]) == {"length", "stop"}
    codes = set(schemas["Error"]["properties"]["error"]["properties"]["code"]["enum"])
    assert {"unencodable_prompt", "prompt_too_long", "invalid_parameter", "parameter_out_of_range"} <= codes
    assert not codes & {"invalid_texts", "too_many_texts", "text_too_long"}
    assert set(schemas["Limits"]["properties"]) == set(
        request(server.port, "GET", "/v1/model").json()["limits"]
    )
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
    for ref in refs:
        _, section, kind, name = ref.split("/")
        assert name in doc[section][kind], ref
    from openapi_spec_validator import validate  # in the test extra: CI always validates

    validate(doc)


def test_overloaded_is_503_with_retry_after():
    gate = threading.Event()
    fake = FakeLanguageModel(gate=gate)
    limits = GenerateLimits(max_queue=1, request_timeout_s=10)
    with start_server(fake, limits) as handle:
        replies = {}
        first = threading.Thread(
            target=lambda: replies.setdefault("first", generate(handle.port, {"prompt": "a"}))
        )
        first.start()
        assert fake.entered.wait(10)  # the worker is busy with the first request
        second = threading.Thread(
            target=lambda: replies.setdefault("second", generate(handle.port, {"prompt": "b"}))
        )
        second.start()
        deadline = time.monotonic() + 10
        while handle.state.batcher.stats()["queued_requests"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        reply = generate(handle.port, {"prompt": "c"})
        gate.set()
        first.join(10)
        second.join(10)
    assert reply.status == 503 and reply.error_code == "overloaded"
    assert int(reply.headers["retry-after"]) >= 1
    assert replies["first"].status == 200 and replies["second"].status == 200


def test_a_timed_out_request_is_504_and_its_generation_stops():
    gate = threading.Event()
    fake = FakeLanguageModel(gate=gate)
    with start_server(fake, GenerateLimits(request_timeout_s=0.2)) as handle:
        try:
            reply = generate(handle.port, {"prompt": "waits forever"})
            assert fake.stopped.wait(5)  # the worker was told, and gave up at its next token
            fake.gate = None
            after = generate(handle.port, {"prompt": "next", "max_new_tokens": 3})
        finally:
            gate.set()
        stats = request(handle.port, "GET", "/v1/stats").json()
    assert reply.status == 504 and reply.error_code == "timeout"
    assert "request_timeout_s=0.2" in reply.json()["error"]["message"]
    assert after.status == 200 and after.json()["results"][0]["text"] == "aba"
    assert stats["generation"]["cancelled"] == 1 and stats["batcher"]["failed_batches"] == 0


def test_the_smallest_allowed_temperature_and_penalty_give_finite_samples(server):
    body = {"prompt": "aaaa", "max_new_tokens": 20, "temperature": 0.01, "repetition_penalty": 0.01, "n": 2}
    reply = generate(server.port, body)
    assert reply.status == 200 and all(r["tokens"] == 20 for r in reply.json()["results"])


def test_the_real_model_stops_generating_when_asked(language_model):
    from llmlab.serve.generate import GenerationCancelled

    asked = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) > 3

    with pytest.raises(GenerationCancelled):
        language_model.generate([1, 2, 3], SampleConfig(max_new_tokens=50), 1, 0, should_stop)
    assert len(asked) == 4


def test_not_ready_after_the_worker_stops():
    with start_server(FakeLanguageModel(), GenerateLimits()) as handle:
        assert request(handle.port, "GET", "/readyz").status == 200
        handle.state.batcher.close()
        ready = request(handle.port, "GET", "/readyz")
        reply = generate(handle.port, {"prompt": "hello"})
        alive = request(handle.port, "GET", "/healthz")
    assert ready.status == 503 and ready.error_code == "not_ready" and "retry-after" in ready.headers
    assert reply.status == 503 and reply.error_code == "not_ready"
    assert alive.status == 200


def test_a_model_failure_is_a_logged_json_500_and_the_server_carries_on(caplog):
    with start_server(FakeLanguageModel(fail_on="boom"), GenerateLimits()) as handle:
        with caplog.at_level(logging.ERROR, logger="llmlab.serve"):
            reply = generate(handle.port, {"prompt": "boom"})
        after = generate(handle.port, {"prompt": "fine", "max_new_tokens": 2})
    assert reply.status == 500 and reply.error_code == "internal_error"
    assert (
        "RuntimeError" in reply.json()["error"]["message"] and "boom" not in reply.json()["error"]["message"]
    )
    assert any(
        "unexpected error on POST /v1/generate" in r.getMessage() and r.exc_info for r in caplog.records
    )
    assert after.status == 200 and after.json()["results"][0]["text"] == "ab"


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"max_n": 2.5}, "positive integer"),
        ({"max_queue": True}, "positive integer"),
        ({"request_timeout_s": 0}, "request_timeout_s"),
        ({"request_timeout_s": float("nan")}, "request_timeout_s"),
    ],
)
def test_bad_limits_are_config_errors(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        GenerateLimits(**kwargs)


def test_limits_of_the_other_kind_are_refused(language_model, classifier):
    from llmlab.serve.app import ServeLimits, create_app

    with pytest.raises(ConfigError, match="GenerateLimits, not ServeLimits"):
        create_app(language_model, ServeLimits())
    with pytest.raises(ConfigError, match="ServeLimits, not GenerateLimits"):
        create_app(classifier, GenerateLimits())
