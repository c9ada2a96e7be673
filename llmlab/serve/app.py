"""The HTTP server: one Flask app behind waitress, serving a text classifier or a language model.

    llmlab serve RUN_DIR      # a classifier run (RUN_DIR/model/, HF) -> POST /v1/classify
                              # a language-model run (shakespeare-gpt) -> POST /v1/generate

Endpoints (the full contract, error responses and every bound included, is the OpenAPI 3 document at
GET /openapi.json, which describes exactly the endpoints this server serves):
  POST /v1/classify   (classify.py) {"texts": ["...", ...]}
                      -> {"model", "results": [{"label", "score", "scores"}]}
  POST /v1/generate   (generate.py) {"prompt": "...", "max_new_tokens": ..., "temperature": ..., ...}
                      -> {"model", "results": [{"text", "tokens", "finish_reason"}], "usage", "seed"}
  GET  /healthz       the process is alive (always 200 while it answers)
  GET  /readyz        the model is loaded and its worker runs (200), else 503
  GET  /v1/model      name, kind ("classifier" or "language-model"), what the model is, limits (and for a
                      language model: tokenizer, context length, sampling defaults)
  GET  /v1/stats      the worker's counters (batches, requests, queue, rejections; generated tokens)
  GET  /openapi.json  the OpenAPI document

The POST endpoint of the other kind answers 404 like any unknown path, with a message naming the one served.
The rules both endpoints share (JSON bodies, 400/404/405/413/415/500/503/504, all errors as JSON
`{"error": {"code", "message"}}`) live in httpapi.py; each endpoint (`ClassifyEndpoint`, `GenerateEndpoint`)
brings its body parser, its worker (a MicroBatcher), its /v1/model and its OpenAPI paths. Malformed HTTP
itself (not a request line) is answered by waitress.

Served by waitress, a production WSGI server (Flask's own server is for development only). `start_server`
runs it in a background thread (port 0 picks a free port) for tests and benchmarks; `serve` runs it in the
foreground until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import flask

from llmlab.config import ConfigError
from llmlab.serve.batching import MicroBatcher
from llmlab.serve.classify import Classifier, ClassifyEndpoint, ServeLimits, parse_classify_body
from llmlab.serve.generate import GenerateEndpoint, GenerateLimits, LanguageModel, is_language_model
from llmlab.serve.httpapi import NOT_READY_HEADERS, ApiError, install_error_handlers

__all__ = [
    "ApiError",
    "Classifier",
    "Endpoint",
    "GenerateLimits",
    "LanguageModel",
    "ServeLimits",
    "ServeState",
    "ServerHandle",
    "close_app",
    "create_app",
    "parse_classify_body",
    "serve",
    "start_server",
]

STATE_KEY = "llmlab.serve"

# The POST endpoint of each kind, for the 404 that tells a client which one this server has.
ENDPOINTS = {"classifier": "/v1/classify", "language-model": "/v1/generate"}


class Endpoint(Protocol):
    """A served model's side of the app: ClassifyEndpoint (classify.py) or GenerateEndpoint (generate.py)."""

    path: str  # the POST route
    kind: str  # "classifier" or "language-model"
    description: str  # "a text classifier", for messages
    model: Any
    limits: Any  # has max_body_bytes and request_timeout_s
    batcher: MicroBatcher

    @property
    def ready(self) -> bool: ...

    def handle(self, req: flask.Request) -> dict[str, Any]: ...  # the POST's 200 body, or raises ApiError

    def info(self) -> dict[str, Any]: ...  # GET /v1/model

    def stats(self) -> dict[str, Any]: ...  # GET /v1/stats

    def openapi(self) -> dict[str, Any]: ...  # GET /openapi.json

    def default_threads(self) -> int: ...

    def banner(self) -> str: ...  # what `llmlab serve` prints at start


@dataclass
class ServeState:
    endpoint: Endpoint

    @property
    def model(self) -> Any:
        return self.endpoint.model

    @property
    def limits(self) -> Any:
        return self.endpoint.limits

    @property
    def batcher(self) -> MicroBatcher:
        return self.endpoint.batcher

    @property
    def ready(self) -> bool:
        return self.endpoint.ready


def get_state(app: flask.Flask) -> ServeState:
    return app.extensions[STATE_KEY]


def make_endpoint(model: Classifier | LanguageModel, limits: ServeLimits | GenerateLimits | None) -> Endpoint:
    """The endpoint for this kind of model; limits of the other kind are a ConfigError."""
    if is_language_model(model):
        if limits is not None and not isinstance(limits, GenerateLimits):
            raise ConfigError(f"a language model is served with GenerateLimits, not {type(limits).__name__}")
        return GenerateEndpoint(model, limits or GenerateLimits())
    if limits is not None and not isinstance(limits, ServeLimits):
        raise ConfigError(f"a classifier is served with ServeLimits, not {type(limits).__name__}")
    return ClassifyEndpoint(model, limits or ServeLimits())


def create_app(
    model: Classifier | LanguageModel, limits: ServeLimits | GenerateLimits | None = None
) -> flask.Flask:
    """The Flask app with its own worker (closed by `close_app`, or by the server handle)."""
    endpoint = make_endpoint(model, limits)
    app = flask.Flask("llmlab.serve")
    app.config["MAX_CONTENT_LENGTH"] = endpoint.limits.max_body_bytes
    app.json.sort_keys = False  # keep scores in label order, keys in documented order
    state = ServeState(endpoint)
    app.extensions[STATE_KEY] = state

    def post() -> flask.Response:
        return flask.jsonify(endpoint.handle(flask.request))

    app.add_url_rule(endpoint.path, endpoint="post", view_func=post, methods=["POST"])

    @app.get("/healthz")
    def healthz() -> flask.Response:
        return flask.jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz() -> flask.Response:
        if not state.ready:
            raise ApiError(
                503, "not_ready", "the model is not loaded or its worker is stopped", NOT_READY_HEADERS
            )
        return flask.jsonify({"status": "ready", "model": endpoint.model.name})

    @app.get("/v1/model")
    def model_info() -> flask.Response:
        return flask.jsonify(endpoint.info())

    @app.get("/v1/stats")
    def stats() -> flask.Response:
        return flask.jsonify(endpoint.stats())

    @app.get("/openapi.json")
    def openapi() -> flask.Response:
        return flask.jsonify(endpoint.openapi())

    def not_found_hint(path: str) -> str | None:
        for kind, other in ENDPOINTS.items():
            if path == other and kind != endpoint.kind:
                return f"this server serves {endpoint.description}: POST {endpoint.path}"
        return None

    install_error_handlers(app, endpoint.limits.max_body_bytes, not_found_hint)
    return app


def close_app(app: flask.Flask) -> None:
    """Stop the app's worker; requests still waiting get 503."""
    get_state(app).batcher.close()


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
        threads = threads or (state.endpoint.default_threads() if state else 8)
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
    model: Classifier | LanguageModel,
    limits: ServeLimits | GenerateLimits | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    threads: int | None = None,
) -> ServerHandle:
    """create_app + waitress in a background thread; `handle.url` is where it listens. Close it when done."""
    app = create_app(model, limits)
    try:
        return ServerHandle(app, host=host, port=port, threads=threads).start()
    except BaseException:
        close_app(app)
        raise


def load_model(
    path: str | Path, device: str = "cpu", max_length: int | None = None
) -> Classifier | LanguageModel:
    """The model at `path`: a language-model run (lm.detect_model_kind), else a classifier (model.py)."""
    from llmlab.serve.lm import detect_model_kind, load_language_model
    from llmlab.serve.model import TextClassifier

    if detect_model_kind(path) == "language-model":
        if max_length is not None:
            raise ConfigError(
                f"max_length={max_length}: applies to classifiers; {path} is a language-model run, whose "
                "prompts are cut to its context length"
            )
        return load_language_model(path, device=device)
    return TextClassifier.from_path(path, device=device, max_length=max_length)


def serve(
    path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServeLimits | GenerateLimits | None = None,
    threads: int | None = None,
    device: str = "cpu",
    max_length: int | None = None,
    torch_threads: int | None = None,
) -> None:
    """Load the model at `path` (a classifier or a language-model run) and serve it in the foreground until
    Ctrl-C or SIGTERM.

    `torch_threads` sets torch's intra-op threads. On a busy or small CPU, 1 is often much faster for a
    small model: idle intra-op threads spin at every op's barrier, and with the cores oversubscribed a
    forward pass can take tens of times longer (measured: 2-3 ms vs 20-250 ms for a tiny BERT on 2 busy
    cores).
    """
    import torch

    if torch_threads is not None:
        if torch_threads < 1:
            raise ConfigError(f"torch_threads={torch_threads}: must be at least 1")
        torch.set_num_threads(torch_threads)
    model = load_model(path, device=device, max_length=max_length)
    app = create_app(model, limits)
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
    endpoint = get_state(app).endpoint
    print(
        f"llmlab serve: {endpoint.banner()}; {torch.get_num_threads()} torch threads, "
        f"{handle.threads} server threads",
        flush=True,
    )
    # The URL on a line of its own, so scripts (and the tests) can read it, port 0 included.
    print(f"listening on {handle.url}  (POST {endpoint.path}; API at {handle.url}/openapi.json)", flush=True)
    try:
        handle.run()
    except KeyboardInterrupt:
        pass
    finally:
        handle.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        print("llmlab serve: stopped", flush=True)
