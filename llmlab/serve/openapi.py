"""The OpenAPI 3.0 documents of the served APIs (GET /openapi.json): classification or generation.

Reference: OpenAPI Specification 3.0.3 (https://spec.openapis.org/oas/v3.0.3). A server documents exactly what
it serves: the POST endpoint of its kind (/v1/classify or /v1/generate), the GET endpoints both kinds share,
and the error codes its endpoint can answer. The bounds in the schemas (maxItems, maxLength, minimum,
maximum, the body size, the defaults) are the running server's, so the document is the contract clients see.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import llmlab
from llmlab.serve.limits import GenerateLimits, Param, ServeLimits

# Error codes per status, as `error.code` in the body (httpapi.py), for every status but 400.
COMMON_ERROR_CODES: dict[int, list[str]] = {
    404: ["not_found"],
    405: ["method_not_allowed"],
    413: ["payload_too_large"],
    415: ["unsupported_media_type"],
    500: ["internal_error"],
    503: ["overloaded", "not_ready"],
    504: ["timeout"],
}
BODY_ERROR_CODES = ["invalid_json", "invalid_body", "missing_field", "unknown_field"]

# POST /v1/classify (classify.py)
ERROR_CODES: dict[int, list[str]] = {
    400: [
        *BODY_ERROR_CODES,
        "invalid_texts",
        "empty_texts",
        "too_many_texts",
        "invalid_text",
        "empty_text",
        "text_too_long",
    ],
    **COMMON_ERROR_CODES,
}

# POST /v1/generate (generate.py)
GENERATE_ERROR_CODES: dict[int, list[str]] = {
    400: [
        *BODY_ERROR_CODES,
        "invalid_prompt",
        "empty_prompt",
        "prompt_too_long",
        "unencodable_prompt",
        "invalid_parameter",
        "parameter_out_of_range",
    ],
    **COMMON_ERROR_CODES,
}

_ERROR_TEXT = {
    404: "No such endpoint.",
    405: "Method not allowed on this path (the Allow header lists the allowed ones).",
    413: "The body is larger than the server's max_body_bytes.",
    415: "The Content-Type is not application/json.",
    500: "A server bug; it is logged with its traceback.",
    503: "Overloaded (the queue is full) or not ready (model not loaded, or shutting down); retry after the "
    "Retry-After header's seconds.",
    504: "The request waited longer than request_timeout_s for the model.",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error_response(status: int) -> dict[str, str]:
    return {"$ref": f"#/components/responses/Error{status}"}


def _limits_schema(limits: Any) -> dict[str, Any]:
    """{"type": "object", "properties": {field: integer or number}} of a limits dataclass."""
    props = {
        f.name: {"type": "integer" if isinstance(getattr(limits, f.name), int) else "number"}
        for f in dataclasses.fields(limits)
    }
    return {"type": "object", "properties": props}


def _document(
    *,
    title: str,
    model_name: str | None,
    post_path: str,
    post: dict[str, Any],
    error_codes: dict[int, list[str]],
    bad_request: str,
    schemas: dict[str, Any],
    model_summary: str,
    stats_summary: str,
) -> dict[str, Any]:
    """The document: `post` at `post_path`, the shared GET endpoints, the errors and the common schemas."""
    retry_after = {
        "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}
    }
    texts = {400: bad_request, **_ERROR_TEXT}
    responses: dict[str, Any] = {}
    for status, codes in error_codes.items():
        resp: dict[str, Any] = {
            "description": f"{texts[status]} error.code is one of: {', '.join(codes)}.",
            "content": {"application/json": {"schema": _ref("Error")}},
        }
        if status == 503:
            resp["headers"] = retry_after
        if status == 405:
            resp["headers"] = {"Allow": {"description": "the allowed methods", "schema": {"type": "string"}}}
        responses[f"Error{status}"] = resp

    schemas = {
        **schemas,
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {
                            "type": "string",
                            "enum": sorted({c for codes in error_codes.values() for c in codes}),
                        },
                        "message": {"type": "string", "description": "what was wrong, for a human"},
                    },
                }
            },
        },
        "Status": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"type": "string"}, "model": {"type": "string"}},
        },
    }

    def get(summary: str, schema: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "get": {
                "summary": summary,
                "responses": {
                    "200": _json(_ref(schema), "OK"),
                    "405": _error_response(405),
                    **(extra or {}),
                },
            }
        }

    post = {
        **post,
        "responses": {
            **post["responses"],
            **{str(s): _error_response(s) for s in (400, 405, 413, 415, 500, 503, 504)},
        },
    }
    paths = {
        post_path: {"post": post},
        "/healthz": get("Liveness: the process answers", "Status"),
        "/readyz": get(
            "Readiness: the model is loaded and its worker runs", "Status", {"503": _error_response(503)}
        ),
        "/v1/model": get(model_summary, "ModelInfo"),
        "/v1/stats": get(stats_summary, "Stats"),
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {
                    "200": {"description": "OpenAPI 3.0 document", "content": {"application/json": {}}},
                    "405": _error_response(405),
                },
            }
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": title,
            "version": llmlab.__version__,
            "description": (f"Serving {model_name}. " if model_name else "")
            + 'Every error is JSON: {"error": {"code": ..., "message": ...}}; any other path answers 404.',
        },
        "paths": paths,
        "components": {"schemas": schemas, "responses": responses},
    }


# ------------------------------------------------------------------------------------------- classification
def openapi_document(
    limits: ServeLimits, labels: list[str] | None = None, model_name: str | None = None
) -> dict[str, Any]:
    """The classification API of a server with these limits (and, when given, this model's labels)."""
    label_schema: dict[str, Any] = {"type": "string", "description": "the most probable class"}
    if labels:
        label_schema["enum"] = list(labels)
    schemas: dict[str, Any] = {
        "ClassifyRequest": {
            "type": "object",
            "required": ["texts"],
            "additionalProperties": False,
            "properties": {
                "texts": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": limits.max_texts,
                    "items": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": limits.max_chars,
                        "pattern": r"\S",
                        "description": "a text with at least one non-whitespace character; its tokens beyond "
                        "the model's max_length (GET /v1/model) are truncated",
                    },
                }
            },
            "example": {"texts": ["Stocks rallied after the central bank held rates."]},
        },
        "Result": {
            "type": "object",
            "required": ["label", "score", "scores"],
            "properties": {
                "label": label_schema,
                "score": {"type": "number", "minimum": 0, "maximum": 1, "description": "its probability"},
                "scores": {
                    "type": "object",
                    "additionalProperties": {"type": "number", "minimum": 0, "maximum": 1},
                    "description": "probability of every label (softmax over the model's logits)",
                },
            },
        },
        "ClassifyResponse": {
            "type": "object",
            "required": ["model", "results"],
            "properties": {
                "model": {"type": "string"},
                "results": {
                    "type": "array",
                    "items": _ref("Result"),
                    "description": "one result per input text, in input order",
                },
            },
        },
        "Limits": _limits_schema(limits),
        "ModelInfo": {
            "type": "object",
            "required": ["name", "kind", "labels", "max_length", "limits"],
            "properties": {
                "name": {"type": "string"},
                "kind": {"type": "string", "enum": ["classifier"]},
                "labels": {"type": "array", "items": {"type": "string"}},
                "max_length": {"type": "integer", "description": "tokens; longer texts are truncated"},
                "device": {"type": "string"},
                "limits": _ref("Limits"),
            },
        },
        "Stats": {
            "type": "object",
            "required": ["model", "batcher"],
            "properties": {
                "model": {"type": "string"},
                "batcher": {
                    "type": "object",
                    "description": "micro-batcher counters since start: batches, requests, texts, "
                    "failed_batches, rejected_requests, queued_texts, queued_requests, mean_batch_size, "
                    "mean_requests_per_batch, max_batch_size_seen, batch_size_histogram (texts per batch "
                    "-> number of batches), busy_seconds, and the batching settings",
                    "additionalProperties": True,
                },
            },
        },
    }
    post = {
        "summary": "Classify texts",
        "description": (
            f"Up to {limits.max_texts} texts per request, each at most {limits.max_chars} "
            f"characters, body at most {limits.max_body_bytes} bytes. Requests from all clients are "
            f"micro-batched (up to {limits.max_batch_size} texts; a batch waits at most "
            f"{limits.max_wait_ms:g} ms, and only for requests already received); a text's result "
            "does not depend on its batch."
        ),
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref("ClassifyRequest")}},
        },
        "responses": {"200": _json(_ref("ClassifyResponse"), "one result per text")},
    }
    return _document(
        title="llmlab text classification API",
        model_name=model_name,
        post_path="/v1/classify",
        post=post,
        error_codes=ERROR_CODES,
        bad_request="The body is not a valid classification request (see error.code).",
        schemas=schemas,
        model_summary="The model's name, labels, max_length and the server's limits",
        stats_summary="Micro-batching statistics",
    )


# ------------------------------------------------------------------------------------------- generation
def _param_schema(p: Param) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": p.type, "nullable": True, "minimum": p.minimum, "maximum": p.maximum}
    if p.exclusive_minimum:
        schema["exclusiveMinimum"] = True
    if p.min_positive is not None:  # the minimum itself, or at least min_positive
        schema["not"] = {
            "type": p.type,
            "minimum": p.minimum,
            "exclusiveMinimum": True,
            "maximum": p.min_positive,
            "exclusiveMaximum": True,
        }
    if p.default is not None:
        schema["default"] = p.default
    schema["description"] = p.description + (
        f"; absent or null: {p.default}" if p.default is not None else ""
    )
    return schema


def generate_openapi_document(
    limits: GenerateLimits,
    params: Sequence[Param],
    model_name: str | None = None,
    context_length: int | None = None,
) -> dict[str, Any]:
    """The generation API of a server with these limits and request parameters (generate.parameters)."""
    context = f"{context_length} tokens" if context_length else "GET /v1/model's context_length"
    request_props: dict[str, Any] = {
        "prompt": {
            "type": "string",
            "minLength": 1,
            "maxLength": limits.max_prompt_chars,
            "description": f"the text to continue, at most {limits.max_prompt_chars} characters (code "
            "points); every character must be one the tokenizer can encode (else 400 unencodable_prompt). "
            f"Beyond the model's context ({context}) the prompt is cut from the left: the model sees its "
            "last tokens (usage.prompt_tokens_dropped says how many were cut)",
        },
        **{p.name: _param_schema(p) for p in params},
    }
    schemas: dict[str, Any] = {
        "GenerateRequest": {
            "type": "object",
            "required": ["prompt"],
            "additionalProperties": False,
            "properties": request_props,
            "example": {
                "prompt": "ROMEO:",
                "max_new_tokens": 100,
                "temperature": 0.8,
                "top_k": 50,
                "seed": 0,
            },
        },
        "Completion": {
            "type": "object",
            "required": ["text", "tokens", "finish_reason"],
            "properties": {
                "text": {"type": "string", "description": "the new text only (the prompt is not repeated)"},
                "tokens": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "new tokens, the end-of-text token included when finish_reason is stop",
                },
                "finish_reason": {
                    "type": "string",
                    "enum": ["length", "stop"],
                    "description": "length: max_new_tokens reached; stop: the model produced its end-of-text "
                    "token (tokenizers that have one, e.g. GPT-2's)",
                },
            },
        },
        "Usage": {
            "type": "object",
            "required": ["prompt_tokens", "prompt_tokens_dropped", "completion_tokens", "total_tokens"],
            "properties": {
                "prompt_tokens": {"type": "integer", "description": "prompt tokens the model saw"},
                "prompt_tokens_dropped": {
                    "type": "integer",
                    "description": "tokens cut from the left of a prompt longer than the context",
                },
                "completion_tokens": {"type": "integer", "description": "new tokens over all samples"},
                "total_tokens": {"type": "integer", "description": "prompt_tokens + completion_tokens"},
            },
        },
        "GenerateResponse": {
            "type": "object",
            "required": ["model", "results", "usage", "seed"],
            "properties": {
                "model": {"type": "string"},
                "results": {"type": "array", "items": _ref("Completion"), "description": "n samples"},
                "usage": _ref("Usage"),
                "seed": {
                    "type": "integer",
                    "description": "the seed used (the request's, or one the server drew): send it back to "
                    "get the same texts",
                },
            },
        },
        "Limits": _limits_schema(limits),
        "ModelInfo": {
            "type": "object",
            "required": ["name", "kind", "tokenizer", "context_length", "limits", "defaults"],
            "properties": {
                "name": {"type": "string"},
                "kind": {"type": "string", "enum": ["language-model"]},
                "tokenizer": {
                    "type": "object",
                    "required": ["name", "vocab_size"],
                    "properties": {
                        "name": {"type": "string"},
                        "vocab_size": {"type": "integer"},
                        "eos_id": {"type": "integer", "nullable": True},
                        "kind": {"type": "string"},
                        "characters": {
                            "type": "string",
                            "description": "a char-level vocabulary: every character a prompt may use",
                        },
                    },
                },
                "context_length": {"type": "integer", "description": "tokens; longer prompts are cut"},
                "device": {"type": "string"},
                "limits": _ref("Limits"),
                "defaults": {
                    "type": "object",
                    "description": "the value of each absent or null request parameter (null: off, or for "
                    "seed: drawn by the server)",
                    "additionalProperties": True,
                },
            },
        },
        "Stats": {
            "type": "object",
            "required": ["model", "batcher", "generation"],
            "properties": {
                "model": {"type": "string"},
                "batcher": {
                    "type": "object",
                    "description": "queue counters since start (one request per batch): batches, requests, "
                    "rejected_requests, queued_requests, failed_batches, busy_seconds, max_queue, running",
                    "additionalProperties": True,
                },
                "generation": {
                    "type": "object",
                    "description": "requests and samples generated, prompt_tokens, completion_tokens, "
                    "cancelled (timed out while generating), busy_seconds, tokens_per_second",
                    "additionalProperties": True,
                },
            },
        },
    }
    bounds = ", ".join(f"{p.name} {p.rule()}" for p in params)
    post = {
        "summary": "Generate text after a prompt",
        "description": (
            f"A prompt of at most {limits.max_prompt_chars} characters; {bounds}; body at most "
            f"{limits.max_body_bytes} bytes. One worker generates one request at a time (its n samples as "
            f"one batch); at most {limits.max_queue} requests wait (beyond: 503 with Retry-After), and a "
            f"request that waits more than {limits.request_timeout_s:g} s in all gets 504 (its generation "
            "stops). The same seed, prompt and parameters give the same texts."
        ),
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref("GenerateRequest")}},
        },
        "responses": {"200": _json(_ref("GenerateResponse"), "n samples and the token counts")},
    }
    return _document(
        title="llmlab text generation API",
        model_name=model_name,
        post_path="/v1/generate",
        post=post,
        error_codes=GENERATE_ERROR_CODES,
        bad_request="The body is not a valid generation request (see error.code).",
        schemas=schemas,
        model_summary="The model's name, tokenizer, context length, sampling defaults and the server's "
        "limits",
        stats_summary="Queue and generation statistics",
    )
