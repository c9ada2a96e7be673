"""The OpenAPI 3.0 document of the classification API (served at GET /openapi.json).

Reference: OpenAPI Specification 3.0.3 (https://spec.openapis.org/oas/v3.0.3). The limits in the schemas
(maxItems, maxLength, the body size) are the running server's, so the document is the contract clients see.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import llmlab

if TYPE_CHECKING:
    from llmlab.serve.app import ServeLimits

# Error codes per status, as `error.code` in the body (see app.py).
ERROR_CODES: dict[int, list[str]] = {
    400: [
        "invalid_json",
        "invalid_body",
        "missing_field",
        "unknown_field",
        "invalid_texts",
        "empty_texts",
        "too_many_texts",
        "invalid_text",
        "empty_text",
        "text_too_long",
    ],
    404: ["not_found"],
    405: ["method_not_allowed"],
    413: ["payload_too_large"],
    415: ["unsupported_media_type"],
    500: ["internal_error"],
    503: ["overloaded", "not_ready"],
    504: ["timeout"],
}

_ERROR_TEXT = {
    400: "The body is not a valid classification request (see error.code).",
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


def openapi_document(
    limits: ServeLimits, labels: list[str] | None = None, model_name: str | None = None
) -> dict[str, Any]:
    """The document for a server with these limits (and, when given, this model's labels)."""
    label_schema: dict[str, Any] = {"type": "string", "description": "the most probable class"}
    if labels:
        label_schema["enum"] = list(labels)
    retry_after = {
        "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}
    }
    responses: dict[str, Any] = {}
    for status, codes in ERROR_CODES.items():
        resp: dict[str, Any] = {
            "description": f"{_ERROR_TEXT[status]} error.code is one of: {', '.join(codes)}.",
            "content": {"application/json": {"schema": _ref("Error")}},
        }
        if status == 503:
            resp["headers"] = retry_after
        if status == 405:
            resp["headers"] = {"Allow": {"description": "the allowed methods", "schema": {"type": "string"}}}
        responses[f"Error{status}"] = resp

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
                            "enum": sorted({c for codes in ERROR_CODES.values() for c in codes}),
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
        "Limits": {
            "type": "object",
            "properties": {
                "max_texts": {"type": "integer"},
                "max_chars": {"type": "integer"},
                "max_body_bytes": {"type": "integer"},
                "max_batch_size": {"type": "integer"},
                "max_wait_ms": {"type": "number"},
                "max_queue": {"type": "integer"},
                "request_timeout_s": {"type": "number"},
            },
        },
        "ModelInfo": {
            "type": "object",
            "required": ["name", "labels", "max_length", "limits"],
            "properties": {
                "name": {"type": "string"},
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

    paths = {
        "/v1/classify": {
            "post": {
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
                "responses": {
                    "200": _json(_ref("ClassifyResponse"), "one result per text"),
                    **{str(s): _error_response(s) for s in (400, 405, 413, 415, 500, 503, 504)},
                },
            }
        },
        "/healthz": get("Liveness: the process answers", "Status"),
        "/readyz": get(
            "Readiness: the model is loaded and the batcher runs", "Status", {"503": _error_response(503)}
        ),
        "/v1/model": get("The model's name, labels, max_length and the server's limits", "ModelInfo"),
        "/v1/stats": get("Micro-batching statistics", "Stats"),
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
    title = "llmlab text classification API"
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
