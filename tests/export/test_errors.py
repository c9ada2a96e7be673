"""Bad input is a clear error through the CLI (exit 1 for a run that cannot be exported, 2 for a command line
that would overwrite something; one `llmlab: error:` paragraph, no traceback) and writes nothing: not a run,
an unfinished or diverged run, missing / truncated / foreign weights, an unknown recipe, an --out that is
not empty (unless --force, and that only over a previous export) or is the run itself. --push-to-hub with
the Hub unreachable or without a token ends with one clear paragraph, quickly, and leaves the folder as it
was exported."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmlab.cli import main
from tests.export.helpers import read_json


@pytest.fixture
def mnist_copy(train, tmp_path) -> Path:
    """A copy of the mnist-mlp run to damage."""
    copy = tmp_path / "run"
    shutil.copytree(train("mnist-mlp"), copy, ignore=shutil.ignore_patterns("tb", "checkpoints"))
    return copy


def _fails(capsys, args: list[str], code: int, *words: str) -> str:
    capsys.readouterr()  # what came before (e.g. a fixture's training log)
    assert main(["export", *args]) == code
    err = capsys.readouterr().err
    assert err.startswith("llmlab: error:") and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp folder


def test_not_a_run(capsys, tmp_path):
    out = tmp_path / "out"
    _fails(capsys, [str(tmp_path / "nope"), "--out", str(out)], 1, "no such run directory")
    (tmp_path / "empty").mkdir()
    _fails(capsys, [str(tmp_path / "empty"), "--out", str(out)], 1, "not an llmlab run directory")
    _nothing_written(out)


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        ("no-result", ["no result.json", "--resume"]),
        ("diverged", ["did not finish", "diverged"]),
        ("interrupted", ["did not finish", "--resume"]),
        ("no-weights", ["no final weights", "model.safetensors"]),
        ("truncated", ["corrupt or truncated"]),
        ("foreign", ["do not fit the run's model config"]),
        ("unknown-recipe", ["does not know", "'mnist-2000'"]),
    ],
)
def test_runs_that_cannot_be_exported(capsys, train, mnist_copy, damage, words):
    weights = mnist_copy / "model.safetensors"
    if damage == "no-result":
        (mnist_copy / "result.json").unlink()
    elif damage in ("diverged", "interrupted"):
        result = read_json(mnist_copy / "result.json")
        (mnist_copy / "result.json").write_text(json.dumps({**result, "status": damage}))
    elif damage == "no-weights":
        weights.unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:200])
    elif damage == "foreign":
        shutil.copyfile(train("imdb-lstm") / "model.safetensors", weights)
    else:
        config = read_json(mnist_copy / "config.json")
        (mnist_copy / "config.json").write_text(json.dumps({**config, "recipe": "mnist-2000"}))
    out = mnist_copy.parent / "out"
    _fails(capsys, [str(mnist_copy), "--out", str(out)], 1, *words)
    _nothing_written(out)


def test_out_is_refused_unless_force_over_a_previous_export(capsys, train, tmp_path):
    run_dir, out = train("mnist-mlp"), tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _fails(capsys, [str(run_dir), "--out", str(out)], 2, "exists and is not empty", "--force")
    _fails(capsys, [str(run_dir), "--out", str(out), "--force"], 2, "not an llmlab export")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    _fails(capsys, [str(run_dir), "--out", str(run_dir)], 2, "is the run directory")
    _fails(capsys, [str(run_dir), "--out", str(run_dir.parent)], 2, "contains it")
    export = tmp_path / "export"
    assert main(["export", str(run_dir), "--out", str(export)]) == 0
    (export / "stale.txt").write_text("from before")
    _fails(capsys, [str(run_dir), "--out", str(export)], 2, "exists and is not empty")
    assert main(["export", str(run_dir), "--out", str(export), "--force"]) == 0
    assert not (export / "stale.txt").exists() and (export / "README.md").is_file()


def _checksums(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_push_with_the_hub_unreachable(capsys, monkeypatch, train, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.setenv("HF_TOKEN", "hf_dummy_token_for_tests")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    out = tmp_path / "export"
    start = time.perf_counter()
    args = [str(train("mnist-mlp")), "--out", str(out), "--push-to-hub", "someone/mnist-mlp"]
    err = _fails(capsys, args, 1, "unreachable", "http://127.0.0.1:9", "hf upload someone/mnist-mlp")
    assert time.perf_counter() - start < 30
    assert err.count("\n") == 1  # one paragraph
    manifest = read_json(out / "llmlab_export.json")
    files = _checksums(out)
    assert {k: files[k] for k in manifest["files"]} == manifest["files"]  # the folder is as exported
    assert set(files) == {*manifest["files"], "llmlab_export.json"}


def test_push_offline_mode_and_bad_repo_ids(capsys, monkeypatch, train, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "export"
    _fails(
        capsys,
        [str(train("mnist-mlp")), "--out", str(out), "--push-to-hub", "someone/x"],
        1,
        "HF_HUB_OFFLINE",
    )
    assert (out / "README.md").is_file()
    bad = tmp_path / "bad"
    _fails(
        capsys,
        [str(train("mnist-mlp")), "--out", str(bad), "--push-to-hub", "not a/repo/id"],
        2,
        "repository id",
    )
    _nothing_written(bad)


def test_push_without_a_token_from_the_command_line(train, tmp_path):
    """As a user runs it: `python -m llmlab export ... --push-to-hub`, logged out (an empty HF_HOME, no
    HF_TOKEN)."""
    out = tmp_path / "export"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE")
    }
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT="http://127.0.0.1:9", LLMLAB_PROGRESS="0")
    cmd = [sys.executable, "-m", "llmlab", "export", str(train("mnist-mlp")), "--out", str(out),
           "--push-to-hub", "someone/mnist-mlp"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "no Hugging Face token" in done.stderr and "hf auth login" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert (out / "README.md").is_file() and (out / "model.safetensors").is_file()
