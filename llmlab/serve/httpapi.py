"""HTTP rules shared by every served endpoint (POST /v1/classify, POST /v1/generate): JSON errors, the body.

One place decides what both APIs promise (and openapi.py documents):
- every error is JSON `{"error": {"code": "...", "message": "..."}}` (`ApiError`, `install_error_handlers`);
  404 for an unknown path (naming the endpoint this server does serve when a client asks for the other
  one), 405 with Allow, 413, 415, and 500 only for a bug, logged with its traceback;
- a body is `application/json` (or a `+json` type), at most `max_body_bytes`, UTF-8, and a JSON object whose
  keys are all known (`read_json_object`, `reject_unknown_keys`): a typo is an error, never ignored;
- work goes through a MicroBatcher (batching.py): a full queue is 503 with Retry-After, a stopped one 503
  not_ready, and a request that waits longer than `request_timeout_s` is 504 (`run_on_batcher`).
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import flask
from werkzeug.exceptions import HTTPException

from llmlab.serve.batching import BatcherClosed, MicroBatcher, Overloaded

log = logging.getLogger("llmlab.serve")

NOT_READY_HEADERS = {"Retry-After": "1"}

HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


class ApiError(Exception):
    """An error answered as JSON `{"error": {"code", "message"}}` with the given HTTP status."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def json_type(value: Any) -> str:
    """How a JSON value is named in an error message ("a string", "null", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> flask.Response:
    resp = flask.jsonify({"error": {"code": code, "message": message}})
    resp.status_code = status
    for key, value in (headers or {}).items():
        resp.headers[key] = value
    return resp


def check_request(req: flask.Request, max_body_bytes: int) -> None:
    """413 for a declared body over the limit, 415 for anything but JSON (before the body is read)."""
    if req.content_length is not None and req.content_length > max_body_bytes:
        raise ApiError(
            413,
            "payload_too_large",
            f"the body has {req.content_length} bytes; at most {max_body_bytes} are allowed",
        )
    mimetype = req.mimetype
    if mimetype != "application/json" and not (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    ):
        got = repr(req.content_type) if req.content_type else "no Content-Type"
        raise ApiError(415, "unsupported_media_type", f"the body must be application/json; got {got}")


def parse_json_object(data: bytes, example: str) -> dict[str, Any]:
    """The body as a JSON object, or ApiError(400) invalid_json / invalid_body (`example` shows the shape)."""
    try:
        body = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ApiError(400, "invalid_json", f"the body is not valid UTF-8 (byte {err.start})") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "the JSON body is nested too deeply") from None
    except ValueError as err:  # json.JSONDecodeError, and int() digit limits
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise ApiError(
            400, "invalid_body", f"the JSON body must be an object like {example}; got {json_type(body)}"
        )
    return body


def read_json_object(req: flask.Request, max_body_bytes: int, example: str) -> dict[str, Any]:
    """check_request, then the body (read once, not cached) as a JSON object."""
    check_request(req, max_body_bytes)
    return parse_json_object(req.get_data(cache=False), example)


def reject_unknown_keys(
    body: dict[str, Any], allowed: Sequence[str], hints: dict[str, str] | None = None
) -> None:
    """ApiError(400, unknown_field) naming the unknown keys, a likely intended key, and the accepted ones."""
    unknown = sorted(k for k in body if k not in allowed)
    if not unknown:
        return
    names = ", ".join(repr(k[:40]) for k in unknown[:5])
    guess = (hints or {}).get(unknown[0]) or next(
        iter(difflib.get_close_matches(unknown[0], allowed, 1)), None
    )
    did_you_mean = f" (did you mean {guess!r}?)" if guess and len(allowed) > 1 else ""
    if len(allowed) == 1:
        accepted = f"the only accepted key is {allowed[0]!r}"
    else:
        accepted = "accepted keys: " + ", ".join(allowed)
    raise ApiError(400, "unknown_field", f"unknown key(s) {names}{did_you_mean}; {accepted}")


def run_on_batcher(
    batcher: MicroBatcher,
    items: list[Any],
    timeout_s: float,
    on_timeout: Callable[[], None] | None = None,
) -> list[Any]:
    """Submit `items` as one request and wait for their results: 503 when the queue is full or the batcher
    is closed, 504 after `timeout_s` (the request is dropped if it has not started; `on_timeout` may stop it
    if it has)."""
    try:
        future = batcher.submit(items)
    except Overloaded as err:
        raise ApiError(
            503, "overloaded", str(err), {"Retry-After": str(int(err.retry_after_s) or 1)}
        ) from None
    except BatcherClosed:
        raise ApiError(503, "not_ready", "the server is shutting down", NOT_READY_HEADERS) from None
    try:
        return future.result(timeout=timeout_s)
    except FutureTimeout:
        future.cancel()
        if on_timeout is not None:
            on_timeout()
        raise ApiError(
            504, "timeout", f"no result within request_timeout_s={timeout_s:g}s; retry later"
        ) from None
    except BatcherClosed:
        raise ApiError(503, "not_ready", "the server is shutting down", NOT_READY_HEADERS) from None


def install_error_handlers(
    app: flask.Flask, max_body_bytes: int, not_found_hint: Callable[[str], str | None] | None = None
) -> None:
    """JSON bodies for ApiError, for werkzeug's HTTP errors (404, 405, 413, ...) and for bugs (500).

    `not_found_hint(path)` may add a sentence to a 404 (e.g. "this server serves a language model").
    """

    @app.errorhandler(ApiError)
    def on_api_error(err: ApiError) -> flask.Response:
        return error_response(err.status, err.code, err.message, err.headers)

    @app.errorhandler(HTTPException)
    def on_http_error(err: HTTPException) -> flask.Response:
        status = err.code or 500
        req = flask.request
        if status == 404:
            hint = not_found_hint(req.path) if not_found_hint else None
            message = f"no such endpoint: {req.path}; " + (f"{hint}; " if hint else "")
            message += "the API is described at /openapi.json"
        elif status == 405:
            allowed = ", ".join(sorted(err.valid_methods or [])) if hasattr(err, "valid_methods") else ""
            message = f"{req.method} is not allowed on {req.path}; allowed: {allowed}"
        elif status == 413:
            message = f"the body is larger than {max_body_bytes} bytes"
        else:
            message = err.description or err.name
        headers = {}
        if status == 405 and getattr(err, "valid_methods", None):
            headers["Allow"] = ", ".join(sorted(err.valid_methods))
        code = HTTP_CODES.get(status, err.name.lower().replace(" ", "_").replace("'", ""))
        return error_response(status, code, message, headers)

    @app.errorhandler(Exception)
    def on_unexpected(err: Exception) -> flask.Response:
        # A bug, not a bad request: log it in full, tell the client only that it happened.
        log.exception("unexpected error on %s %s", flask.request.method, flask.request.path)
        return error_response(
            500, "internal_error", f"internal error ({type(err).__name__}); see the server log"
        )
