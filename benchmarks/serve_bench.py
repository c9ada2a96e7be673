"""Stage 4 serving: requests/s and p50/p99 latency, micro-batched server vs one pipeline call per request.

    python benchmarks/serve_bench.py --data-dir ../shared/data

Two servers, each in its own process, both on waitress with the same number of threads, one text per request:
  (a) batched:  `llmlab serve`'s app (llmlab.serve.app) with dynamic micro-batching (--max-batch-size,
                --max-wait-ms): concurrent requests share one forward pass;
  (b) pipeline: the naive baseline, a minimal Flask app whose POST /v1/classify makes one
                `transformers.pipeline("text-classification")` call per request (top_k=None, truncation on),
                so every request runs its own forward pass, concurrently with the others.
The model is a tiny random BERT on the CPU, by default the tests' shape (2 layers, hidden 32, 2 heads,
feed-forward 64; `--layers`, `--hidden`, `--heads`, `--intermediate`), with the bert-base-uncased vocab from
the data root when present; `--model PATH` serves a real model directory or run directory instead. Both
servers use `--torch-threads` intra-op threads (default 1: on a small, busy CPU, idle intra-op threads spin
at each op's barrier and a forward pass can take tens of times longer). The texts are AG News test
headlines+descriptions when `ag_news/test.csv.gz` is in the data root, else synthetic sentences of similar
length.

For each concurrency level (default 1, 16, 64) a client in this process runs that many threads, each with its
own keep-alive connection, until `--requests` requests are done or `--seconds` have passed, after a warm-up.
Both servers run at once, the two are measured in turn at each level, and the whole pass is repeated
`--repeats` times, so machine noise hits them alike; the table gives per-cell medians. Latency is per request
at the client. The client shares the machine with the servers, so on a small CPU every figure is lower than
on a dedicated one. Prints a markdown table and the speed-up of (a) over (b) per level (goal at concurrency
16: at least 3x); results go in docs/results.md with the command, machine and date.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import http.client
import json
import os
import queue
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
WORDS = (
    "the a of to in and for on with as by at from after over says said new year market stocks shares bank "
    "oil prices team game season win cup coach league players world president government minister election "
    "war police people software computer internet space science research company deal profit quarter sales "
    "report officials troops talks plan first two three week monday tuesday record high low record"
).split()


# -- the two servers (each run in a child process: `serve_bench.py --serve MODE --model DIR`) --------------
def _pipeline_app(model_dir: str):
    import flask
    from transformers import pipeline

    pipe = pipeline("text-classification", model=model_dir, device="cpu", top_k=None)
    app = flask.Flask("pipeline-baseline")

    @app.post("/v1/classify")
    def classify():
        texts = flask.request.get_json(force=True)["texts"]
        out = pipe(texts, truncation=True)  # one pipeline call (and forward pass per text) per request
        results = [
            {"label": r[0]["label"], "score": r[0]["score"], "scores": {d["label"]: d["score"] for d in r}}
            for r in out
        ]
        return flask.jsonify({"model": "pipeline", "results": results})

    return app


def _serve_child(args: argparse.Namespace) -> None:
    import torch

    from llmlab.serve.app import ServeLimits, ServerHandle, create_app
    from llmlab.serve.model import TextClassifier

    torch.set_num_threads(args.torch_threads)

    if args.serve == "batched":
        limits = ServeLimits(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms)
        app = create_app(TextClassifier.from_path(args.model), limits)
    else:
        app = _pipeline_app(args.model)
    handle = ServerHandle(app, host="127.0.0.1", port=0, threads=args.threads)
    print(f"listening on {handle.url}", flush=True)
    try:
        handle.run()
    except KeyboardInterrupt:
        pass


def _pump(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


class ServerProcess:
    """A child process running one of the servers; the port is read from its first line."""

    def __init__(self, mode: str, model_dir: str, args: argparse.Namespace):
        cmd = [
            sys.executable,
            __file__,
            "--serve",
            mode,
            "--model",
            model_dir,
            "--threads",
            str(args.threads),
            "--max-batch-size",
            str(args.max_batch_size),
            "--max-wait-ms",
            str(args.max_wait_ms),
            "--torch-threads",
            str(args.torch_threads),
        ]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(self.proc.stdout, lines), daemon=True).start()
        deadline = time.monotonic() + 120
        seen = []
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            seen.append(line)
            if line.startswith("listening on http://"):
                self.port = int(line.split()[2].rsplit(":", 1)[1])
                return
        self.close()
        raise RuntimeError(f"the {mode} server did not start:\n{''.join(seen)}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# -- the load generator -------------------------------------------------------------------------------------
def load_texts(data_dir: str | None, n: int, seed: int) -> tuple[list[str], str]:
    from llmlab.data.store import data_root

    path = data_root(data_dir) / "ag_news" / "test.csv.gz"
    if path.is_file():
        with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
            rows = [f"{title}. {desc}".replace("\\", " ") for _, title, desc in csv.reader(f)]
        random.Random(seed).shuffle(rows)
        return rows[:n], f"AG News test ({path})"
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(20, 60))) for _ in range(n)], "synthetic sentences"


def run_load(port: int, texts: list[str], concurrency: int, requests: int, seconds: float) -> dict:
    """`concurrency` threads with keep-alive connections; stop at `requests` done or `seconds` elapsed."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    issued = [0]
    start_gate = threading.Barrier(concurrency + 1)
    deadline = [0.0]

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        start_gate.wait(60)
        i = k
        while True:
            with lock:
                if issued[0] >= requests or time.monotonic() > deadline[0]:
                    break
                issued[0] += 1
            body = json.dumps({"texts": [texts[i % len(texts)]]})
            i += concurrency
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/classify", body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException) as err:
                ok, data = False, str(err).encode()
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            elapsed = time.perf_counter() - t0
            with lock:
                if ok:
                    latencies.append(elapsed)
                else:
                    errors.append(data[:200].decode("utf-8", "replace"))
        conn.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    deadline[0] = time.monotonic() + seconds
    start_gate.wait(60)
    t0 = time.perf_counter()
    for t in threads:
        t.join(seconds + 120)
    wall = time.perf_counter() - t0
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))] * 1000 if lat else float("nan")

    return {
        "done": len(lat),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "rps": len(lat) / wall if wall > 0 else 0.0,
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "mean_ms": statistics.fmean(lat) * 1000 if lat else float("nan"),
    }


def get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def build_tiny_bert(
    out: Path, data_dir: str | None, layers: int = 2, hidden: int = 32, heads: int = 2, intermediate: int = 64
) -> tuple[Path, str]:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
    from transformers.utils import logging as hf_logging

    from llmlab.data.store import data_root

    hf_logging.disable_progress_bar()

    vocab_dir = data_root(data_dir) / "tokenizers" / "bert-base-uncased"
    if (vocab_dir / "vocab.txt").is_file():
        source = f"bert-base-uncased vocab ({vocab_dir})"
    else:
        vocab_dir = out / "vocab"
        vocab_dir.mkdir(parents=True, exist_ok=True)
        chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"()-/&$%#")
        tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars), *WORDS]
        (vocab_dir / "vocab.txt").write_text("\n".join(dict.fromkeys(tokens)) + "\n")
        source = "a small generated vocab (no bert-base-uncased vocab in the data root)"
    tokenizer = BertTokenizerFast.from_pretrained(str(vocab_dir))
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    torch.manual_seed(0)
    model_dir = out / "tiny-bert-agnews"
    BertForSequenceClassification(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    shape = f"{layers} layers, hidden {hidden}, {heads} heads, intermediate {intermediate}"
    return model_dir, f"random BERT ({shape}) with the {source}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", default=None, help="data root (default: $LLMLAB_DATA, else ~/.cache/llmlab)"
    )
    parser.add_argument("--model", default=None, help="serve this model dir / run dir instead of a tiny BERT")
    parser.add_argument("--layers", type=int, default=2, help="tiny BERT: layers")
    parser.add_argument("--hidden", type=int, default=32, help="tiny BERT: hidden size")
    parser.add_argument("--heads", type=int, default=2, help="tiny BERT: attention heads")
    parser.add_argument("--intermediate", type=int, default=64, help="tiny BERT: feed-forward size")
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated client thread counts")
    parser.add_argument("--requests", type=int, default=1000, help="requests per cell (at most)")
    parser.add_argument("--seconds", type=float, default=6.0, help="time per cell (at most)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved passes over all cells")
    parser.add_argument("--warmup", type=int, default=50, help="warm-up requests per server (not timed)")
    parser.add_argument("--threads", type=int, default=64, help="waitress threads, both servers")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads in both servers (1: on a small busy CPU, more threads spin at barriers)",
    )
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--serve", choices=["batched", "pipeline"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve_child(args)
        return

    from llmlab.train.record import hardware_info, now_iso

    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        if args.model:
            model_dir, model_desc = args.model, f"model {args.model}"
        else:
            path, model_desc = build_tiny_bert(
                Path(tmp), args.data_dir, args.layers, args.hidden, args.heads, args.intermediate
            )
            model_dir = str(path)
        texts, text_desc = load_texts(args.data_dir, 2000, seed=0)
        hw = hardware_info()
        print(f"# serve benchmark, {now_iso()}")
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"machine: {hw['cpu']} ({hw['cpu_count']} cores), load average {load:.1f} at start")
        print(f"model: {model_desc}; texts: {text_desc}, one text per request")
        print(
            f"waitress threads {args.threads}, torch threads {args.torch_threads} (both servers); "
            f"batched: max_batch_size {args.max_batch_size}, max_wait_ms {args.max_wait_ms:g}; "
            f"per cell at most {args.requests} requests or {args.seconds:g} s, {args.repeats} repeats\n",
            flush=True,
        )
        runs: dict[tuple[str, int], list[dict]] = {}
        # Both servers up at once and the modes interleaved per level, so machine noise hits them alike.
        servers: dict[str, ServerProcess] = {}
        try:
            for mode in ("batched", "pipeline"):
                servers[mode] = ServerProcess(mode, model_dir, args)
                run_load(servers[mode].port, texts, 4, args.warmup, 60)
            for rep in range(args.repeats):
                for c in levels:
                    for mode, server in servers.items():
                        before = get_json(server.port, "/v1/stats")["batcher"] if mode == "batched" else None
                        r = run_load(server.port, texts, c, args.requests, args.seconds)
                        if before is not None:
                            after = get_json(server.port, "/v1/stats")["batcher"]
                            n = after["batches"] - before["batches"]
                            r["mean_batch"] = (after["texts"] - before["texts"]) / max(n, 1)
                        runs.setdefault((mode, c), []).append(r)
                        print(
                            f"  repeat {rep + 1}  {mode:<8} c={c:<3} {r['done']:>5} req  "
                            f"{r['rps']:8.1f} req/s  p50 {r['p50_ms']:7.1f} ms  "
                            f"p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}",
                            flush=True,
                        )
                        if r["first_error"]:
                            print(f"    first error: {r['first_error']}", flush=True)
        finally:
            for server in servers.values():
                server.close()

    # Per cell, the median over repeats of each figure (a repeat is one interleaved pass over all cells).
    def med(mode: str, c: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode, c])

    print(
        f"\nmedian of {args.repeats} repeats per cell\n"
        "| concurrency | server | req/s | p50 ms | p99 ms | errors | mean batch |\n"
        "|---:|---|---:|---:|---:|---:|---:|"
    )
    for c in levels:
        for mode, name in (("batched", "micro-batched"), ("pipeline", "pipeline per request")):
            errors = sum(r["errors"] for r in runs[mode, c])
            mean_batch = f"{med(mode, c, 'mean_batch'):.1f}" if mode == "batched" else "1"
            print(
                f"| {c} | {name} | {med(mode, c, 'rps'):.1f} | {med(mode, c, 'p50_ms'):.1f} | "
                f"{med(mode, c, 'p99_ms'):.1f} | {errors} | {mean_batch} |"
            )
    print()
    for c in levels:
        ratios = [
            b["rps"] / max(p["rps"], 1e-9)
            for b, p in zip(runs["batched", c], runs["pipeline", c], strict=True)
        ]
        mark = "  (goal >= 3x)" if c == 16 else ""
        each = ", ".join(f"{x:.2f}" for x in ratios)
        print(
            f"speed-up (req/s, micro-batched / pipeline) at concurrency {c}: "
            f"median {statistics.median(ratios):.2f}x (repeats: {each}){mark}"
        )


if __name__ == "__main__":
    main()
