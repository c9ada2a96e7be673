"""`llmlab export` as its help text describes it: the help, then a real invocation through llmlab.cli.main."""

from __future__ import annotations

import pytest

from llmlab.cli import main
from tests.export.helpers import read_json


def test_help(capsys):
    with pytest.raises(SystemExit) as done:
        main(["export", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for option in ("RUN_DIR", "--out DIR", "--force", "--push-to-hub REPO_ID", "--base-model", "--merged"):
        assert option in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "export" in capsys.readouterr().out  # listed among the commands


def test_export_through_the_cli(capsys, train, tmp_path):
    run_dir, out = train("imdb-lstm"), tmp_path / "exports" / "imdb"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"to {out}" in printed and "model.safetensors" in printed and "README.md" in printed
    assert {"README.md", "model.safetensors", "config.json", "vocab.json", "llmlab_export.json"} <= {
        p.name for p in out.iterdir()
    }
    manifest = read_json(out / "llmlab_export.json")
    assert manifest["run_dir"] == str(run_dir.resolve()) and manifest["recipe"] == "imdb-lstm"
    with pytest.raises(SystemExit) as done:  # --out is required
        main(["export", str(run_dir)])
    assert done.value.code == 2
