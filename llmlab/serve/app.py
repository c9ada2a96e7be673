"""The HTTP API of a text classifier: a Flask app behind waitress, with micro-batched inference.

Endpoints (the full contract, error responses included, is the OpenAPI 3 document at GET /openapi.json):
  POST /v1/classify   {"texts": ["...", ...]} -> {"model": NAME, "results": [{"label", "score", "scores"}]}
  GET  /healthz       the process is alive (always 200 while it answers)
  GET  /readyz        the model is loaded and the batcher runs (200), else 503
  GET  /v1/model      name, labels, max_length (tokens; longer texts are truncated), device, limits
  GET  /v1/stats      micro-batcher counters: batches, requests, texts, batch-size histogram, rejections
  GET  /openapi.json  the OpenAPI document

Request rules (decided here, documented in /openapi.json): the body must be `application/json` (or a
`+json` type), UTF-8, at most `max_body_bytes`; it is an object with exactly one key, `texts` (unknown keys
are rejected, so a typo such as "text" is not silently ignored); `texts` is a non-empty list of at most
`max_texts` strings, each with at least one non-whitespace character and at most `max_chars` characters
(Unicode code points). Token truncation to the model's max_length is normal and not an error.

Every error is JSON, `{"error": {"code": "...", "message": "..."}}`: 400 for a bad body (codes below), 404
unknown path, 405 wrong method (with Allow), 413 body too large, 415 wrong content type, 503 overloaded or
not ready (with Retry-After), 504 the request waited longer than `request_timeout_s`, and 500 only for a
bug, which is logged with its traceback. Malformed HTTP itself (not a request line) is answered by waitress.

Served by waitress, a production WSGI server (Flask's own server is for development only). `start_server`
runs it in a background thread (port 0 picks a free port) for tests and benchmarks; `serve` runs it in the
foreground until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import flask
from werkzeug.exceptions import HTTPException

from llmlab.config import ConfigError
from llmlab.serve.batching import BatcherClosed, MicroBatcher, Overloaded
from llmlab.serve.openapi import openapi_document

log = logging.getLogger("llmlab.serve")

STATE_KEY = "llmlab.serve"


class Classifier(Protocol):
    """What the app needs from a model (TextClassifier satisfies it; tests use small fakes)."""

    name: str
    labels: list[str]
    max_length: int

    def classify(self, texts: list[str]) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class ServeLimits:
    """Per-request limits and batching knobs. Defaults suit a BERT-base classifier on one machine."""

    max_texts: int = 64  # texts per request
    max_chars: int = 10_000  # characters (code points) per text, checked before tokenizing
    max_body_bytes: int = 1_000_000  # request body; larger -> 413
    max_batch_size: int = 32  # texts per model call
    max_wait_ms: float = 5.0  # the most a batch waits for requests already inside the server
    max_queue: int = 1024  # texts waiting for the model; beyond -> 503 + Retry-After
    request_timeout_s: float = 30.0  # a request waiting longer gets 504

    def __post_init__(self) -> None:
        for name in ("max_texts", "max_chars", "max_body_bytes", "max_batch_size", "max_queue"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r}: must be a positive integer")
        if self.max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms={self.max_wait_ms}: must be >= 0")
        if self.request_timeout_s <= 0:
            raise ConfigError(f"request_timeout_s={self.request_timeout_s}: must be > 0")
        if self.max_queue < self.max_texts:
            raise ConfigError(
                f"max_queue={self.max_queue} < max_texts={self.max_texts}: a full-size request could never "
                "be queued"
            )


class ApiError(Exception):
    """An error answered as JSON `{"error": {"code", "message"}}` with the given HTTP status."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


@dataclass
class ServeState:
    classifier: Classifier
    limits: ServeLimits
    batcher: MicroBatcher

    @property
    def ready(self) -> bool:
        return self.classifier is not None and self.batcher.running


def get_state(app: flask.Flask) -> ServeState:
    return app.extensions[STATE_KEY]


def parse_classify_body(data: bytes, limits: ServeLimits) -> list[str]:
    """The validated `texts` of a /v1/classify body, or an ApiError(400) saying exactly what is wrong."""
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
            400,
            "invalid_body",
            f'the JSON body must be an object like {{"texts": ["..."]}}; got {_json_type(body)}',
        )
    unknown = sorted(k for k in body if k != "texts")
    if unknown:
        names = ", ".join(repr(k[:40]) for k in unknown[:5])
        raise ApiError(400, "unknown_field", f"unknown key(s) {names}; the only accepted key is 'texts'")
    if "texts" not in body:
        raise ApiError(400, "missing_field", "missing key 'texts' (a list of strings)")
    texts = body["texts"]
    if not isinstance(texts, list):
        hint = '; wrap a single text in a list: {"texts": ["..."]}' if isinstance(texts, str) else ""
        raise ApiError(
            400, "invalid_texts", f"'texts' must be a list of strings; got {_json_type(texts)}{hint}"
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
            raise ApiError(400, "invalid_text", f"texts[{i}] must be a string; got {_json_type(text)}")
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


def _json_type(value: Any) -> str:
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


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> flask.Response:
    resp = flask.jsonify({"error": {"code": code, "message": message}})
    resp.status_code = status
    for key, value in (headers or {}).items():
        resp.headers[key] = value
    return resp


_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def create_app(classifier: Classifier, limits: ServeLimits | None = None) -> flask.Flask:
    """The Flask app with its own MicroBatcher (closed by `close_app`, or by the server handle)."""
    limits = limits or ServeLimits()
    app = flask.Flask("llmlab.serve")
    app.config["MAX_CONTENT_LENGTH"] = limits.max_body_bytes
    app.json.sort_keys = False  # keep scores in label order
    batcher: MicroBatcher = MicroBatcher(
        classifier.classify,
        max_batch_size=limits.max_batch_size,
        max_wait_ms=limits.max_wait_ms,
        max_queue=limits.max_queue,
        adaptive=True,
    )
    state = ServeState(classifier, limits, batcher)
    app.extensions[STATE_KEY] = state
    not_ready_headers = {"Retry-After": "1"}

    @app.post("/v1/classify")
    def classify() -> flask.Response:
        # Announced before parsing, so an open batch waits for this request (see batching.py).
        with batcher.arriving():
            return _classify()

    def _classify() -> flask.Response:
        req = flask.request
        if req.content_length is not None and req.content_length > limits.max_body_bytes:
            raise ApiError(
                413,
                "payload_too_large",
                f"the body has {req.content_length} bytes; at most {limits.max_body_bytes} are allowed",
            )
        mimetype = req.mimetype
        if mimetype != "application/json" and not (
            mimetype.startswith("application/") and mimetype.endswith("+json")
        ):
            got = repr(req.content_type) if req.content_type else "no Content-Type"
            raise ApiError(415, "unsupported_media_type", f"the body must be application/json; got {got}")
        texts = parse_classify_body(req.get_data(cache=False), limits)
        if not state.ready:
            raise ApiError(503, "not_ready", "the model is not ready; retry shortly", not_ready_headers)
        try:
            future = batcher.submit(texts)
        except Overloaded as err:
            raise ApiError(
                503, "overloaded", str(err), {"Retry-After": str(int(err.retry_after_s) or 1)}
            ) from None
        except BatcherClosed:
            raise ApiError(503, "not_ready", "the server is shutting down", not_ready_headers) from None
        try:
            results = future.result(timeout=limits.request_timeout_s)
        except FutureTimeout:
            future.cancel()
            raise ApiError(
                504,
                "timeout",
                f"no result within request_timeout_s={limits.request_timeout_s:g}s; retry later",
            ) from None
        except BatcherClosed:
            raise ApiError(503, "not_ready", "the server is shutting down", not_ready_headers) from None
        return flask.jsonify({"model": classifier.name, "results": results})

    @app.get("/healthz")
    def healthz() -> flask.Response:
        return flask.jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz() -> flask.Response:
        if not state.ready:
            raise ApiError(
                503, "not_ready", "the model is not loaded or the batcher is stopped", not_ready_headers
            )
        return flask.jsonify({"status": "ready", "model": classifier.name})

    @app.get("/v1/model")
    def model_info() -> flask.Response:
        info = {
            "name": classifier.name,
            "labels": list(classifier.labels),
            "max_length": classifier.max_length,
        }
        device = getattr(classifier, "device", None)
        if device is not None:
            info["device"] = str(device)
        info["limits"] = asdict(limits)
        return flask.jsonify(info)

    @app.get("/v1/stats")
    def stats() -> flask.Response:
        return flask.jsonify({"model": classifier.name, "batcher": batcher.stats()})

    @app.get("/openapi.json")
    def openapi() -> flask.Response:
        return flask.jsonify(
            openapi_document(limits, labels=list(classifier.labels), model_name=classifier.name)
        )

    @app.errorhandler(ApiError)
    def on_api_error(err: ApiError) -> flask.Response:
        return _error(err.status, err.code, err.message, err.headers)

    @app.errorhandler(HTTPException)
    def on_http_error(err: HTTPException) -> flask.Response:
        status = err.code or 500
        req = flask.request
        if status == 404:
            message = f"no such endpoint: {req.path}; the API is described at /openapi.json"
        elif status == 405:
            allowed = ", ".join(sorted(err.valid_methods or [])) if hasattr(err, "valid_methods") else ""
            message = f"{req.method} is not allowed on {req.path}; allowed: {allowed}"
        elif status == 413:
            message = f"the body is larger than {limits.max_body_bytes} bytes"
        else:
            message = err.description or err.name
        headers = {}
        if status == 405 and getattr(err, "valid_methods", None):
            headers["Allow"] = ", ".join(sorted(err.valid_methods))
        code = _HTTP_CODES.get(status, err.name.lower().replace(" ", "_").replace("'", ""))
        return _error(status, code, message, headers)

    @app.errorhandler(Exception)
    def on_unexpected(err: Exception) -> flask.Response:
        # A bug, not a bad request: log it in full, tell the client only that it happened.
        log.exception("unexpected error on %s %s", flask.request.method, flask.request.path)
        return _error(500, "internal_error", f"internal error ({type(err).__name__}); see the server log")

    return app


def close_app(app: flask.Flask) -> None:
    """Stop the app's batcher; requests still waiting get 503."""
    get_state(app).batcher.close()


def default_threads(limits: ServeLimits) -> int:
    # Request threads mostly wait on the batcher; a full batch needs max_batch_size of them in flight.
    return max(8, 2 * limits.max_batch_size)


class ServerHandle:
    """A waitress server for one app. `start()` runs it in a daemon thread; `close()` stops it for good."""

    def __init__(
        self,
        app: flask.Flask,
        host: str = "127.0.0.1",
        port: int = 0,
        threads: int | None = None,
        max_body_bytes: int | None = None,
    ):
        from waitress.server import create_server

        self.app = app
        state = app.extensions.get(STATE_KEY)
        limit = max_body_bytes or (state.limits.max_body_bytes if state else ServeLimits().max_body_bytes)
        threads = threads or (default_threads(state.limits) if state else 8)
        # waitress buffers each body (spooling to a temp file past 512 KB) before the app sees it. Its own
        # cap, answered with a plain-text 413, sits well above the app's so that oversize bodies up to 4x
        # the limit still get the app's JSON 413; beyond that waitress refuses without reading them.
        self._server = create_server(
            app,
            host=host,
            port=port,
            threads=threads,
            max_request_body_size=max(4 * limit, limit + 2**20),
            ident="llmlab-serve",
            clear_untrusted_proxy_headers=True,
        )
        self.host = host
        self.port: int = int(self._server.effective_port)
        self.threads = threads
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def state(self) -> ServeState | None:
        return self.app.extensions.get(STATE_KEY)

    def start(self) -> ServerHandle:
        self._thread = threading.Thread(target=self._server.run, name="llmlab-waitress", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """Serve in the calling thread until close() (from another thread or a signal handler)."""
        try:
            self._server.run()
        finally:
            self.close()

    def close(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        from waitress import wasyncore

        srv = self._server
        loop_running = self._thread is not None and self._thread.is_alive()
        if loop_running:
            # Close every socket from inside the event loop (via waitress's trigger), so the loop sees an
            # empty map and returns, instead of racing it from this thread.
            try:
                srv.trigger.pull_trigger(lambda: wasyncore.close_all(srv._map))
            except OSError:
                pass  # another wake-up (a finished response) ran our thunk first and closed the trigger
            self._thread.join(timeout)
        else:
            wasyncore.close_all(srv._map)
        if self.state is not None:
            self.state.batcher.close()  # waiting requests answer 503 and free their threads
        srv.task_dispatcher.shutdown(timeout=timeout)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_server(
    classifier: Classifier,
    limits: ServeLimits | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    threads: int | None = None,
) -> ServerHandle:
    """create_app + waitress in a background thread; `handle.url` is where it listens. Close it when done."""
    app = create_app(classifier, limits)
    try:
        return ServerHandle(app, host=host, port=port, threads=threads).start()
    except BaseException:
        close_app(app)
        raise


def serve(
    path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServeLimits | None = None,
    threads: int | None = None,
    device: str = "cpu",
    max_length: int | None = None,
    torch_threads: int | None = None,
) -> None:
    """Load the model at `path` and serve it in the foreground until Ctrl-C or SIGTERM.

    `torch_threads` sets torch's intra-op threads. On a busy or small CPU, 1 is often much faster for a
    small model: idle intra-op threads spin at every op's barrier, and with the cores oversubscribed a
    forward pass can take tens of times longer (measured: 2-3 ms vs 20-250 ms for a tiny BERT on 2 busy
    cores).
    """
    import torch

    from llmlab.serve.model import TextClassifier

    if torch_threads is not None:
        if torch_threads < 1:
            raise ConfigError(f"torch_threads={torch_threads}: must be at least 1")
        torch.set_num_threads(torch_threads)
    classifier = TextClassifier.from_path(path, device=device, max_length=max_length)
    limits = limits or ServeLimits()
    app = create_app(classifier, limits)
    try:
        handle = ServerHandle(app, host=host, port=port, threads=threads)
    except BaseException:
        close_app(app)
        raise

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # waitress's loop closes its sockets on it; run() then closes the rest

    previous = (
        signal.signal(signal.SIGTERM, on_sigterm)
        if threading.current_thread() is threading.main_thread()
        else None
    )
    labels = ", ".join(classifier.labels)
    print(
        f"llmlab serve: {classifier.name} [{labels}] on {classifier.device} ({torch.get_num_threads()} "
        f"torch threads), max_length {classifier.max_length} tokens; {handle.threads} server threads, "
        f"batches of up to {limits.max_batch_size} texts, wait {limits.max_wait_ms:g} ms",
        flush=True,
    )
    # The URL on a line of its own, so scripts (and the tests) can read it, port 0 included.
    print(f"listening on {handle.url}  (POST /v1/classify; API at {handle.url}/openapi.json)", flush=True)
    try:
        handle.run()
    except KeyboardInterrupt:
        pass
    finally:
        handle.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        print("llmlab serve: stopped", flush=True)
