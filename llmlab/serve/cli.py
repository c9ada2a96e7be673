"""`llmlab predict` and `llmlab serve`: classify texts from the command line, or serve a model over HTTP.

`llmlab serve RUN_DIR` serves a classifier (an HF model directory, a run with model/, a Hub id) at
POST /v1/classify, or a language-model run (shakespeare-gpt) at POST /v1/generate; it tells which from the
directory (llmlab/serve/lm.py: detect_model_kind). The classifier's batching flags are ignored for a
language model; --max-length (classifiers) and --max-new-tokens / --max-n (language models) default to None
and are an error for the other kind.

`add_predict_parser(sub)` / `add_serve_parser(sub)` register the subcommands (with their `func`) on the main
`llmlab` parser; `main(argv)` is a parser with just these two, so `python -m llmlab.serve.cli` works alone.
Exit codes follow llmlab/cli.py: 0 success, 1 the model could not be loaded, 2 a bad command line or limit.
"""

from __future__ import annotations

import argparse
import json
import sys

from llmlab.config import ConfigError


def _model_args(p: argparse.ArgumentParser, language_models: bool = False) -> None:
    what = "a classifier run's model/, or a language-model run" if language_models else "uses its model/"
    p.add_argument(
        "model",
        metavar="RUN_DIR_OR_MODEL",
        help=f"an llmlab run directory ({what}), an HF model directory, or a Hub id",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="classifiers: token cap; None: the model's maximum (e.g. 512)",
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
    from llmlab.serve.app import serve
    from llmlab.serve.lm import detect_model_kind
    from llmlab.serve.model import ModelLoadError

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: must be 0..65535 (0 picks a free port)")
    kind = detect_model_kind(args.model)
    limits = _generate_limits(args) if kind == "language-model" else _classifier_limits(args)
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


def _classifier_limits(args: argparse.Namespace):
    from llmlab.serve.app import ServeLimits

    for flag in GENERATE_FLAG_DEFAULTS:
        if getattr(args, flag, None) is not None:
            option = "--" + flag.replace("_", "-")
            raise ConfigError(f"{option} applies to language-model runs; {args.model} is a classifier")
    queue = args.max_queue if args.max_queue is not None else SERVE_FLAG_DEFAULTS["max_queue"]
    return ServeLimits(
        max_texts=args.max_texts,
        max_chars=args.max_chars,
        max_body_bytes=args.max_body_bytes,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=queue,
        request_timeout_s=args.request_timeout,
    )


def _generate_limits(args: argparse.Namespace):
    from llmlab.serve.generate import GenerateLimits

    def given(name: str) -> int:
        value = getattr(args, name)
        return value if value is not None else GENERATE_FLAG_DEFAULTS[name]

    return GenerateLimits(
        max_prompt_chars=args.max_chars,
        max_new_tokens=given("max_new_tokens"),
        max_n=given("max_n"),
        max_body_bytes=args.max_body_bytes,
        max_queue=args.max_queue if args.max_queue is not None else GENERATE_QUEUE_DEFAULT,
        request_timeout_s=args.request_timeout,
    )


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
# The language-model limits of the serve flags, as GenerateLimits states them (a test keeps them equal); the
# flags default to None so that giving one for a classifier is an error. The prompt's character limit is
# --max-chars, the body, timeout and queue flags are shared (the queue counts requests for a language model).
GENERATE_FLAG_DEFAULTS = {"max_new_tokens": 512, "max_n": 8}
GENERATE_QUEUE_DEFAULT = 32


def add_serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    d, g = SERVE_FLAG_DEFAULTS, GENERATE_FLAG_DEFAULTS
    p = sub.add_parser(
        "serve",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="serve a model over HTTP (POST /v1/classify or /v1/generate; waitress)",
        description="Serve a model over HTTP with waitress: a sequence-classification model (an HF model "
        "directory, an llmlab run with model/, or a Hub id) at POST /v1/classify, micro-batched; or a "
        "language-model run (e.g. shakespeare-gpt) at POST /v1/generate, one generation at a time behind a "
        "bounded queue. Both: GET /healthz, /readyz, /v1/model, /v1/stats, /openapi.json (the API with every "
        "bound). Stops on Ctrl-C or SIGTERM.",
    )
    _model_args(p, language_models=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0 picks a free one)")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="waitress threads; None: max(8, 2 x max batch size) for a classifier, max(8, min(64, max queue "
        "+ 4)) for a language model",
    )
    p.add_argument(
        "--torch-threads",
        type=_positive_int,
        default=None,
        help="torch intra-op threads; None: torch's default. 1 is often fastest for a small model on a "
        "busy CPU",
    )
    p.add_argument(
        "--max-chars",
        type=_positive_int,
        default=d["max_chars"],
        help="characters per text (classifier) or per prompt (language model)",
    )
    p.add_argument(
        "--max-body-bytes", type=_positive_int, default=d["max_body_bytes"], help="request body size (bytes)"
    )
    p.add_argument(
        "--max-queue",
        type=_positive_int,
        default=None,
        help=f"waiting work before 503; None: {d['max_queue']} texts (classifier), {GENERATE_QUEUE_DEFAULT} "
        "requests (language model)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=d["request_timeout_s"],
        help="seconds a request may wait (queue and model) before 504",
    )
    c = p.add_argument_group("classifiers (POST /v1/classify)")
    c.add_argument(
        "--max-batch-size", type=_positive_int, default=d["max_batch_size"], help="texts per model call"
    )
    c.add_argument(
        "--max-wait-ms",
        type=float,
        default=d["max_wait_ms"],
        help="the most a batch waits for requests already inside the server (ms); a lone request never waits",
    )
    c.add_argument("--max-texts", type=_positive_int, default=d["max_texts"], help="texts per request")
    lm = p.add_argument_group(
        "language models (POST /v1/generate)",
        "A request's prompt is cut from the left to the model's context; request parameters and their "
        "bounds: GET /openapi.json",
    )
    lm.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=None,
        help=f"the most new tokens a request may ask for (its default: min(200, this)); None: "
        f"{g['max_new_tokens']}",
    )
    lm.add_argument(
        "--max-n", type=_positive_int, default=None, help=f"samples per request (its n); None: {g['max_n']}"
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
