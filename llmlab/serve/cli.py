"""`llmlab predict` and `llmlab serve`: classify texts from the command line, or serve a model over HTTP.

`add_predict_parser(sub)` / `add_serve_parser(sub)` register the subcommands (with their `func`) on the main
`llmlab` parser; `main(argv)` is a parser with just these two, so `python -m llmlab.serve.cli` works alone.
Exit codes follow llmlab/cli.py: 0 success, 1 the model could not be loaded, 2 a bad command line or limit.
"""

from __future__ import annotations

import argparse
import json
import sys

from llmlab.config import ConfigError


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        metavar="RUN_DIR_OR_MODEL",
        help="an llmlab run directory (uses its model/), an HF model directory, or a Hub id",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument(
        "--max-length", type=int, default=None, help="token cap; None: the model's maximum (e.g. 512)"
    )


def _load(args: argparse.Namespace):
    from llmlab.serve.model import TextClassifier

    return TextClassifier.from_path(args.model, device=args.device, max_length=args.max_length)


def predict_main(args: argparse.Namespace) -> int:
    """Print `LABEL  SCORE  TEXT` per text, or with --json a list of {text, label, score, scores}."""
    from llmlab.serve.model import ModelLoadError

    texts = list(args.texts)
    for i, text in enumerate(texts):
        if not text.strip():
            raise ConfigError(f"text {i + 1} is empty or whitespace only")
    try:
        classifier = _load(args)
    except ModelLoadError as err:
        print(f"llmlab: error: {err}", file=sys.stderr)
        return 1
    results = []
    for start in range(0, len(texts), args.batch_size):
        results.extend(classifier.classify(texts[start : start + args.batch_size]))
    if args.json:
        rows = [{"text": t, **r} for t, r in zip(texts, results, strict=True)]
        print(json.dumps({"model": classifier.name, "results": rows}, indent=2, ensure_ascii=False))
        return 0
    width = max(len(label) for label in classifier.labels)
    for text, result in zip(texts, results, strict=True):
        shown = text if len(text) <= 70 else text[:67] + "..."
        print(f"{result['label']:<{width}}  {result['score']:.4f}  {shown}")
    return 0


def serve_main(args: argparse.Namespace) -> int:
    from llmlab.serve.app import ServeLimits, serve
    from llmlab.serve.model import ModelLoadError

    limits = ServeLimits(
        max_texts=args.max_texts,
        max_chars=args.max_chars,
        max_body_bytes=args.max_body_bytes,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        request_timeout_s=args.request_timeout,
    )
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: must be 0..65535 (0 picks a free port)")
    try:
        serve(
            args.model,
            host=args.host,
            port=args.port,
            limits=limits,
            threads=args.threads,
            device=args.device,
            max_length=args.max_length,
            torch_threads=args.torch_threads,
        )
    except ModelLoadError as err:
        print(f"llmlab: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # e.g. the port is taken
        print(f"llmlab: error: cannot listen on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 1
    return 0


def add_predict_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "predict",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="classify texts with a trained model (prints label and score per text)",
        description="Classify texts with a sequence-classification model: an llmlab run directory "
        "(RUN_DIR/model/), an HF model directory, or a Hub id. Texts beyond max_length tokens are truncated.",
    )
    _model_args(p)
    p.add_argument("texts", nargs="+", metavar="TEXT")
    p.add_argument("--json", action="store_true", help="print JSON with every label's probability")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="texts per forward pass")
    p.set_defaults(func=predict_main)
    return p


# Defaults of the serve flags, as ServeLimits states them (a test keeps the two equal). Written out here so
# that building the `llmlab` parser does not import Flask.
SERVE_FLAG_DEFAULTS = {
    "max_batch_size": 32,
    "max_wait_ms": 5.0,
    "max_texts": 64,
    "max_chars": 10_000,
    "max_body_bytes": 1_000_000,
    "max_queue": 1024,
    "request_timeout_s": 30.0,
}


def add_serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    d = SERVE_FLAG_DEFAULTS
    p = sub.add_parser(
        "serve",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="serve a model over HTTP (POST /v1/classify; waitress, micro-batched)",
        description="Serve a sequence-classification model over HTTP with waitress and dynamic "
        "micro-batching. Endpoints: POST /v1/classify, GET /healthz, /readyz, /v1/model, /v1/stats, "
        "/openapi.json. Stops on Ctrl-C or SIGTERM.",
    )
    _model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0 picks a free one)")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="waitress threads; None: max(8, 2 x max batch size)",
    )
    p.add_argument(
        "--torch-threads",
        type=_positive_int,
        default=None,
        help="torch intra-op threads; None: torch's default. 1 is often fastest for a small model on a "
        "busy CPU",
    )
    p.add_argument(
        "--max-batch-size", type=_positive_int, default=d["max_batch_size"], help="texts per model call"
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=d["max_wait_ms"],
        help="the most a batch waits for requests already inside the server (ms); a lone request never waits",
    )
    p.add_argument("--max-texts", type=_positive_int, default=d["max_texts"], help="texts per request")
    p.add_argument("--max-chars", type=_positive_int, default=d["max_chars"], help="characters per text")
    p.add_argument(
        "--max-body-bytes", type=_positive_int, default=d["max_body_bytes"], help="request body size (bytes)"
    )
    p.add_argument("--max-queue", type=_positive_int, default=d["max_queue"], help="texts waiting before 503")
    p.add_argument(
        "--request-timeout",
        type=float,
        default=d["request_timeout_s"],
        help="seconds a request may wait before 504",
    )
    p.set_defaults(func=serve_main)
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_predict_parser(sub)
    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"llmlab: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
