"""POST /v1/generate: a language model behind the shared HTTP rules (httpapi.py), one generation at a time.

    POST /v1/generate  {"prompt": "ROMEO:", "max_new_tokens": 100, "temperature": 0.8, "top_k": 50,
                        "top_p": 0.95, "repetition_penalty": 1.1, "n": 2, "seed": 0}
      -> {"model": NAME, "results": [{"text", "tokens", "finish_reason"}, ...],
          "usage": {"prompt_tokens", "prompt_tokens_dropped", "completion_tokens", "total_tokens"}, "seed": 0}

The app depends on the small `LanguageModel` protocol, not on an architecture: lm.py adapts llmlab's
language-model runs (GPT today, LLaMA next) to it, and the tests use fakes. Request rules (all bounds are in
/openapi.json, built from the same `PARAMETERS` table the parser checks against):

- `prompt` (required): a string of 1..`max_prompt_chars` characters (code points). Its characters must be
  ones the tokenizer can encode (a char-level vocabulary knows only its training text's characters): anything
  else is 400 unencodable_prompt naming the characters. A prompt longer than the model's context
  (`context_length` tokens, GET /v1/model) is cut from the left: the model sees its last `context_length`
  tokens, as `llmlab generate` does, and `usage.prompt_tokens_dropped` says how many were cut.
- the sampling parameters, named as `llmlab generate`'s flags and HF `generate`'s arguments:
  `max_new_tokens` (1..`max_new_tokens` limit), `temperature` (0 = greedy, or 0.01..100), `top_k` (>= 1),
  `top_p` (0 < p <= 1), `repetition_penalty` (0.01..100), `n` samples (1..`max_n`; `--num-samples` of the
  CLI, OpenAI's `n`) and `seed` (0..2^63-1). The lower bounds of temperature and repetition penalty keep the
  divided logits finite (smaller values overflow to inf and NaN probabilities). Absent or null means the
  default; integers must be JSON integers (2.0 and true are refused), numbers must be finite.
- the same `seed`, prompt and parameters give the same texts; without a seed the server draws one and
  returns it, so any result can be reproduced.

Concurrency: generation is long and its requests do not share model calls (prompts differ in length and
sampling settings), so the MicroBatcher runs with batches of one request: one worker generates one request
at a time (its `n` samples as one batch of rows), at most `max_queue` requests wait behind it (beyond: 503
with Retry-After), and a request that waits longer than `request_timeout_s` in all gets 504 — its generation,
if it had started, stops at the next token.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

import flask

from llmlab.nn.sampling import SampleConfig
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
from llmlab.serve.limits import GenerateLimits, Param

FinishReason = Literal["length", "stop"]

DEFAULT_NEW_TOKENS = 200  # `llmlab generate --max-new-tokens`'s default (capped by the server's limit)
DEFAULT_TEMPERATURE = 0.8  # `llmlab generate --temperature`'s default
MAX_SEED = 2**63 - 1
# Smaller positive values divide the logits into float overflow (inf, then NaN probabilities).
MIN_TEMPERATURE = 0.01
MIN_REPETITION_PENALTY = 0.01


@dataclass(frozen=True)
class Completion:
    """One sample: the new text only (not the prompt), its token count and why it ended."""

    text: str
    tokens: int  # new tokens, the end-of-text token included when finish_reason is "stop"
    finish_reason: FinishReason  # "length": max_new_tokens reached; "stop": the model's end-of-text token


class GenerationCancelled(Exception):
    """Raised by `LanguageModel.generate` when `should_stop()` turned true (its caller has given up)."""


class LanguageModel(Protocol):
    """What the app needs from a language model (lm.RunLanguageModel satisfies it; tests use fakes).

    `encode` raises ValueError, with a message for the client, for text the tokenizer cannot encode.
    `generate` samples `n` continuations of `prompt_ids` (at most `context_length` of them) with `cfg`
    (its eos_id is this model's `eos_id`), drawing from a generator seeded with `seed`; it checks
    `should_stop()` before each token and raises GenerationCancelled when it is true. Optional: `device`, and
    `info() -> dict` with more to show at GET /v1/model (e.g. a char vocabulary's characters).
    """

    name: str
    tokenizer_name: str
    vocab_size: int
    context_length: int  # tokens the model sees; longer prompts are cut from the left
    eos_id: int | None  # the end-of-text token, if the tokenizer has one

    def encode(self, text: str) -> list[int]: ...

    def generate(
        self,
        prompt_ids: list[int],
        cfg: SampleConfig,
        n: int,
        seed: int,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[Completion]: ...


def is_language_model(model: Any) -> bool:
    return callable(getattr(model, "generate", None)) and hasattr(model, "context_length")


def parameters(limits: GenerateLimits) -> list[Param]:
    """The sampling parameters of a request with this server's bounds (parser and OpenAPI share them)."""
    new_tokens = min(DEFAULT_NEW_TOKENS, limits.max_new_tokens)
    return [
        Param(
            "max_new_tokens", "integer", new_tokens, 1, limits.max_new_tokens,
            description="tokens to generate per sample (fewer when the model ends the text); past the "
            "context the window slides",
        ),
        Param(
            "temperature", "number", DEFAULT_TEMPERATURE, 0, 100, min_positive=MIN_TEMPERATURE,
            description="divides the logits; 0 = greedy (argmax), < 1 sharper, > 1 flatter (below 0.01 the "
            "divided logits can overflow: use 0)",
        ),
        Param(
            "top_k", "integer", None, 1, 2**31 - 1,
            description="keep the k most likely tokens (null: all; k >= the vocabulary size keeps all)",
        ),
        Param(
            "top_p", "number", None, 0, 1, exclusive_minimum=True,
            description="nucleus sampling: keep the smallest set of tokens with probability >= p "
            "(null or 1: all)",
        ),
        Param(
            "repetition_penalty", "number", 1.0, MIN_REPETITION_PENALTY, 100,
            description="CTRL's θ on every token already in the text, prompt included (1: off; > 1: "
            "repeats less)",
        ),
        Param(
            "n", "integer", 1, 1, limits.max_n,
            description="samples of the prompt, generated as one batch",
        ),
        Param(
            "seed", "integer", None, 0, MAX_SEED,
            description="seeds the sampling; the same seed, prompt and parameters give the same texts "
            "(null: the server draws one and returns it)",
        ),
    ]  # fmt: skip


# Names other APIs use for the same thing: a 400 for them says which key is meant.
KEY_HINTS = {
    "max_tokens": "max_new_tokens",
    "max_length": "max_new_tokens",
    "num_samples": "n",
    "num_return_sequences": "n",
    "text": "prompt",
    "inputs": "prompt",
    "prompts": "prompt",
}


@dataclass(frozen=True)
class GenerateRequest:
    """A validated /v1/generate body; `seed` None means "draw one"."""

    prompt: str
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    repetition_penalty: float
    n: int
    seed: int | None

    def sample_config(self, eos_id: int | None) -> SampleConfig:
        return SampleConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            eos_id=eos_id,
        )


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(body: dict[str, Any], p: Param) -> Any:
    value = body.get(p.name)
    if value is None:
        return p.default
    wanted = "an integer" if p.type == "integer" else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, "invalid_parameter", f"'{p.name}' must be {wanted}; got {json_type(value)}")
    if p.type == "integer" and not isinstance(value, int):
        raise ApiError(
            400,
            "invalid_parameter",
            f"'{p.name}' must be {wanted}; got {_shown(value)} (write it without a point)",
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise ApiError(400, "invalid_parameter", f"'{p.name}' must be a finite number; got {value}")
    if not p.allows(value):
        raise ApiError(
            400, "parameter_out_of_range", f"'{p.name}'={_shown(value)} is out of range: {p.rule()}"
        )
    return float(value) if p.type == "number" else value


def parse_generate_body(data: bytes, limits: GenerateLimits) -> GenerateRequest:
    """The validated /v1/generate body, or an ApiError(400) saying exactly what is wrong."""
    params = parameters(limits)
    body = parse_json_object(data, '{"prompt": "..."}')
    reject_unknown_keys(body, ["prompt", *(p.name for p in params)], KEY_HINTS)
    if "prompt" not in body:
        raise ApiError(400, "missing_field", "missing key 'prompt' (a string)")
    prompt = body["prompt"]
    if not isinstance(prompt, str):
        hint = "; one prompt per request (use n for several samples)" if isinstance(prompt, list) else ""
        raise ApiError(400, "invalid_prompt", f"'prompt' must be a string; got {json_type(prompt)}{hint}")
    if not prompt:
        raise ApiError(400, "empty_prompt", "'prompt' is empty; give at least one character")
    if len(prompt) > limits.max_prompt_chars:
        raise ApiError(
            400,
            "prompt_too_long",
            f"the prompt has {len(prompt)} characters; at most {limits.max_prompt_chars} are allowed",
        )
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800" in the JSON
        raise ApiError(
            400, "invalid_prompt", "the prompt is not valid Unicode (it contains an unpaired surrogate)"
        ) from None
    values = {p.name: _number(body, p) for p in params}
    return GenerateRequest(prompt=prompt, **values)


@dataclass
class _Job:
    """One request on its way through the queue to the worker."""

    ids: list[int]
    cfg: SampleConfig
    n: int
    seed: int
    cancelled: threading.Event = field(default_factory=threading.Event)


class GenerateEndpoint:
    """The language model's side of the app (app.py's `Endpoint`): route, queue, model info and OpenAPI."""

    path = "/v1/generate"
    kind = "language-model"
    description = "a language model"

    def __init__(self, model: LanguageModel, limits: GenerateLimits) -> None:
        self.model = model
        self.limits = limits
        self.params = parameters(limits)
        # Batches of one request: see the module docstring. max_queue counts requests, not tokens.
        self.batcher: MicroBatcher = MicroBatcher(
            self._run, max_batch_size=1, max_wait_ms=0, max_queue=limits.max_queue, name="llmlab-generate"
        )
        self._lock = threading.Lock()
        self._counts = {
            "requests": 0,
            "samples": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "cancelled": 0,
        }
        self._busy_s = 0.0

    @property
    def ready(self) -> bool:
        return self.model is not None and self.batcher.running

    # -- request thread ----------------------------------------------------------------------------------
    def handle(self, req: flask.Request) -> dict[str, Any]:
        check_request(req, self.limits.max_body_bytes)
        request = parse_generate_body(req.get_data(cache=False), self.limits)
        ids = self._encode(request.prompt)
        dropped = max(0, len(ids) - self.model.context_length)
        ids = ids[dropped:]  # the model sees the last context_length tokens
        if not self.ready:
            raise ApiError(503, "not_ready", "the model is not ready; retry shortly", NOT_READY_HEADERS)
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        job = _Job(ids, request.sample_config(self.model.eos_id), request.n, seed)
        [completions] = run_on_batcher(
            self.batcher, [job], self.limits.request_timeout_s, on_timeout=job.cancelled.set
        )
        completion_tokens = sum(c.tokens for c in completions)
        return {
            "model": self.model.name,
            "results": [asdict(c) for c in completions],
            "usage": {
                "prompt_tokens": len(ids),
                "prompt_tokens_dropped": dropped,
                "completion_tokens": completion_tokens,
                "total_tokens": len(ids) + completion_tokens,
            },
            "seed": seed,
        }

    def _encode(self, prompt: str) -> list[int]:
        try:
            ids = self.model.encode(prompt)
        except ValueError as err:
            raise ApiError(
                400, "unencodable_prompt", f"the model's tokenizer cannot encode the prompt: {err}"
            ) from None
        if not ids:
            raise ApiError(
                400,
                "empty_prompt",
                f"the prompt has no tokens after tokenisation (the {self.model.tokenizer_name} tokenizer "
                "drops what it holds, e.g. whitespace); give at least one character it keeps",
            )
        return ids

    # -- worker thread -----------------------------------------------------------------------------------
    def _run(self, jobs: list[_Job]) -> list[list[Completion] | None]:
        out: list[list[Completion] | None] = []
        for job in jobs:  # one: batches of one request
            start = time.monotonic()
            try:
                completions = self.model.generate(job.ids, job.cfg, job.n, job.seed, job.cancelled.is_set)
            except GenerationCancelled:  # its client got 504 already; nobody reads this result
                completions = None
            with self._lock:
                self._busy_s += time.monotonic() - start
                if completions is None:
                    self._counts["cancelled"] += 1
                else:
                    self._counts["requests"] += 1
                    self._counts["samples"] += len(completions)
                    self._counts["prompt_tokens"] += len(job.ids)
                    self._counts["completion_tokens"] += sum(c.tokens for c in completions)
            out.append(completions)
        return out

    # -- GET endpoints -----------------------------------------------------------------------------------
    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def info(self) -> dict[str, Any]:
        m = self.model
        tokenizer: dict[str, Any] = {"name": m.tokenizer_name, "vocab_size": m.vocab_size, "eos_id": m.eos_id}
        info: dict[str, Any] = {
            "name": m.name,
            "kind": self.kind,
            "tokenizer": tokenizer,
            "context_length": m.context_length,
        }
        device = getattr(m, "device", None)
        if device is not None:
            info["device"] = str(device)
        extra = getattr(m, "info", None)
        if callable(extra):
            tokenizer.update(extra().get("tokenizer", {}))
        info["limits"] = asdict(self.limits)
        info["defaults"] = self.defaults()
        return info

    def stats(self) -> dict[str, Any]:
        with self._lock:
            counts, busy = dict(self._counts), self._busy_s
        counts["busy_seconds"] = busy
        counts["tokens_per_second"] = counts["completion_tokens"] / busy if busy > 0 else 0.0
        return {"model": self.model.name, "batcher": self.batcher.stats(), "generation": counts}

    def openapi(self) -> dict[str, Any]:
        from llmlab.serve.openapi import generate_openapi_document

        return generate_openapi_document(
            self.limits, self.params, model_name=self.model.name, context_length=self.model.context_length
        )

    def default_threads(self) -> int:
        # Each queued request holds a server thread while it waits; a few more answer 503s and GETs at once.
        return max(8, min(64, self.limits.max_queue + 4))

    def banner(self) -> str:
        m = self.model
        device = getattr(m, "device", "?")
        return (
            f"{m.name} (language model, {m.tokenizer_name} tokenizer, context {m.context_length} tokens) on "
            f"{device}; one generation at a time, up to {self.limits.max_queue} requests queued, at most "
            f"{self.limits.max_new_tokens} new tokens x {self.limits.max_n} samples per request"
        )
