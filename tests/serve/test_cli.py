"""`llmlab predict` and `llmlab serve` (through llmlab.serve.cli, which the main CLI registers)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path

import pytest

from llmlab.serve.app import ServeLimits
from llmlab.serve.cli import SERVE_FLAG_DEFAULTS, build_parser, main
from tests.serve.helpers import AG_NEWS_LABELS, TEXTS, classify, request


def test_predict_prints_label_and_score_per_text(run_dir, classifier, capsys):
    assert main(["predict", str(run_dir), TEXTS[0], TEXTS[1]]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    expected = classifier.classify(TEXTS[:2])
    assert len(lines) == 2
    for line, want in zip(lines, expected, strict=True):
        label, score, text = line.split(None, 2)
        assert label == want["label"] and float(score) == pytest.approx(want["score"], abs=1e-4)
    assert lines[0].endswith(TEXTS[0][:40]) or TEXTS[0][:40] in lines[0]


def test_predict_json(model_dir, classifier, capsys):
    assert main(["predict", str(model_dir), TEXTS[2], "--json", "--batch-size", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == classifier.name
    [row] = out["results"]
    assert row["text"] == TEXTS[2] and row["label"] == classifier.classify([TEXTS[2]])[0]["label"]
    assert list(row["scores"]) == AG_NEWS_LABELS


def test_predict_missing_path_exits_1_with_a_clear_message(tmp_path, capsys):
    missing = tmp_path / "runs" / "agnews-bert-nope"
    assert main(["predict", str(missing), "hello"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llmlab: error:") and str(missing) in err and "model/config.json" in err


def test_predict_rejects_blank_text_and_bad_flags(model_dir, capsys):
    assert main(["predict", str(model_dir), "   "]) == 2
    assert "empty or whitespace" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["predict", str(model_dir)])  # no text
    assert err.value.code == 2
    with pytest.raises(SystemExit):
        main(["serve", str(model_dir), "--max-batch-size", "0"])


def test_serve_flag_defaults_equal_serve_limits():
    defaults = {f.name: f.default for f in fields(ServeLimits)}
    assert SERVE_FLAG_DEFAULTS == defaults
    parser = build_parser()
    args = parser.parse_args(["serve", "some/model"])
    assert args.max_batch_size == defaults["max_batch_size"] and args.request_timeout == 30.0
    assert args.host == "127.0.0.1" and args.port == 8000 and args.func.__name__ == "serve_main"


def test_serve_bad_limits_exit_2(model_dir, capsys):
    assert main(["serve", str(model_dir), "--max-texts", "10", "--max-queue", "5", "--port", "0"]) == 2
    assert "could never be queued" in capsys.readouterr().err


def _read_lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


@pytest.mark.slow
def test_serve_subprocess_prints_its_url_answers_and_stops_on_sigterm(run_dir: Path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "-m",
        "llmlab.serve.cli",
        "serve",
        str(run_dir),
        "--port",
        "0",
        "--max-wait-ms",
        "1",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    try:
        port = None
        deadline = time.monotonic() + 90
        while port is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            seen.append(line)
            if line.startswith("listening on http://127.0.0.1:"):
                port = int(line.split()[2].rsplit(":", 1)[1])
        assert port is not None, "".join(seen)
        assert request(port, "GET", "/readyz").status == 200
        reply = classify(port, TEXTS[:2])
        assert reply.status == 200 and len(reply.json()["results"]) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    rest = []
    while (line := lines.get(timeout=5)) is not None:
        rest.append(line)
    assert "llmlab serve: stopped" in "".join(seen + rest)
