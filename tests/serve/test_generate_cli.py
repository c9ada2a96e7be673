"""`llmlab serve` for language-model runs: kind detection, flags, load errors, and a real server process."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path

import pytest

from llmlab.serve.cli import GENERATE_FLAG_DEFAULTS, GENERATE_QUEUE_DEFAULT, SERVE_FLAG_DEFAULTS, main
from llmlab.serve.generate import GenerateLimits
from tests.serve.helpers import generate, request


@pytest.fixture
def no_server(monkeypatch):
    """A `serve` that gets as far as listening fails the test instead of serving forever."""
    from llmlab.serve import app

    def refuse(self):
        self.close()
        raise AssertionError("the server should not have started")

    monkeypatch.setattr(app.ServerHandle, "run", refuse)


def test_llmlab_serve_help_describes_both_kinds(lm_run_dir, capsys):
    from llmlab.cli import main as llmlab_main

    with pytest.raises(SystemExit) as exit_:
        llmlab_main(["serve", str(lm_run_dir), "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "usage: llmlab serve" in out
    assert (
        "at POST /v1/classify, micro-batched" in out
        and "at POST /v1/generate, one generation at a time" in out
    )
    assert "language models (POST /v1/generate):" in out and "classifiers (POST /v1/classify):" in out
    assert "--max-new-tokens MAX_NEW_TOKENS the most new tokens a request may ask for" in out
    assert (
        "--max-n MAX_N samples per request" in out
        and "1024 texts (classifier), 32 requests (language model)" in out
    )
    assert "prompt is cut from the left to the model's context" in out and "/openapi.json" in out


def test_generate_flag_defaults_equal_generate_limits():
    from llmlab.serve.cli import _generate_limits, build_parser

    defaults = {f.name: f.default for f in fields(GenerateLimits)}
    assert defaults == {
        "max_prompt_chars": SERVE_FLAG_DEFAULTS["max_chars"],
        **GENERATE_FLAG_DEFAULTS,
        "max_body_bytes": SERVE_FLAG_DEFAULTS["max_body_bytes"],
        "max_queue": GENERATE_QUEUE_DEFAULT,
        "request_timeout_s": SERVE_FLAG_DEFAULTS["request_timeout_s"],
    }
    parser = build_parser()
    assert _generate_limits(parser.parse_args(["serve", "runs/lm"])) == GenerateLimits()
    args = parser.parse_args(
        ["serve", "runs/lm", "--max-new-tokens", "64", "--max-n", "2", "--max-chars", "99"]
    )
    limits = _generate_limits(args)
    assert (limits.max_new_tokens, limits.max_n, limits.max_prompt_chars) == (64, 2, 99)


def test_detect_model_kind(lm_run_dir, run_dir, model_dir, tmp_path):
    from llmlab.serve.lm import detect_model_kind

    assert detect_model_kind(lm_run_dir) == "language-model"
    assert detect_model_kind(str(lm_run_dir)) == "language-model"
    assert detect_model_kind(run_dir) == "classifier"  # an agnews-bert run: its model/ is an HF classifier
    assert detect_model_kind(model_dir) == "classifier"
    assert detect_model_kind(tmp_path / "missing") == "classifier"  # the classifier loader says what is wrong
    assert detect_model_kind("bert-base-uncased") == "classifier"  # a Hub id
    (tmp_path / "config.json").write_text("{not json")
    assert detect_model_kind(tmp_path) == "classifier"


def test_flags_of_the_other_kind_exit_2(lm_run_dir, model_dir, no_server, capsys):
    assert main(["serve", str(lm_run_dir), "--max-length", "8", "--port", "0"]) == 2
    assert "max_length=8: applies to classifiers" in capsys.readouterr().err
    assert main(["serve", str(model_dir), "--max-new-tokens", "5", "--port", "0"]) == 2
    assert "--max-new-tokens applies to language-model runs" in capsys.readouterr().err
    assert main(["serve", str(lm_run_dir), "--request-timeout", "0", "--port", "0"]) == 2
    assert "request_timeout_s=0.0: must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", str(lm_run_dir), "--max-n", "0"])


def test_runs_that_cannot_be_served_exit_1_with_a_clear_message(lm_run_dir, tmp_path, no_server, capsys):
    from llmlab.config import to_dict
    from llmlab.runner import resolve_config

    _, cfg, _ = resolve_config("mnist-mlp", "smoke", [])
    mlp = tmp_path / "mnist-run"
    mlp.mkdir()
    (mlp / "config.json").write_text(
        json.dumps({"recipe": "mnist-mlp", "preset": "smoke", "config": to_dict(cfg)})
    )
    assert main(["serve", str(mlp), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llmlab: error:") and "is a run of mnist-mlp, not a language model" in err
    assert "serves text classifiers" in err and "language-model runs" in err

    no_weights = tmp_path / "no-weights"
    shutil.copytree(lm_run_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    assert main(["serve", str(no_weights), "--port", "0"]) == 1
    assert "neither model.safetensors nor a checkpoint" in capsys.readouterr().err

    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(lm_run_dir, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    assert main(["serve", str(no_tokenizer), "--port", "0"]) == 1
    assert "tokenizer.json not found" in capsys.readouterr().err


def _read_lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


@pytest.mark.slow
def test_serve_subprocess_serves_a_language_model_run_and_stops_on_sigterm(lm_run_dir: Path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "llmlab.serve.cli", "serve", str(lm_run_dir), "--port", "0", "--max-n", "2"]
    cmd += ["--torch-threads", "1"]
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=root
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
        assert "(POST /v1/generate;" in seen[-1] and "language model, char-" in "".join(seen)
        assert request(port, "GET", "/readyz").status == 200
        reply = generate(port, {"prompt": "The king", "max_new_tokens": 8, "n": 2, "seed": 1})
        assert reply.status == 200 and [r["tokens"] for r in reply.json()["results"]] == [8, 8]
        assert generate(port, {"prompt": "a", "n": 3}).error_code == "parameter_out_of_range"
        assert request(port, "POST", "/v1/classify", '{"texts": ["a"]}').status == 404
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
