"""The command line: listing, clear errors with exit codes (and nothing written), eval/report/data/demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmlab.cli import main


def test_python_dash_m_and_help():
    out = subprocess.run(
        [sys.executable, "-m", "llmlab", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "run" in out.stdout and "report" in out.stdout


def test_list_shows_recipes_presets_and_targets(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert (
        "mnist-mlp" in out and "smoke" in out and "test/accuracy >= 0.98" in out and "dataset: mnist" in out
    )


def test_config_prints_resolved_overrides(capsys):
    assert main(["config", "mnist-mlp", "--preset", "smoke", "optim.lr=0.3"]) == 0
    assert json.loads(capsys.readouterr().out)["optim"]["lr"] == 0.3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "mnist-mlp", "optim.lrr=0.1"], "did you mean: optim.lr"),
        (["run", "mnist-mlp", "train.batch_size=big"], "train.batch_size='big': expected an integer"),
        (["run", "mnist-mlp", "model.impl=gpu"], "expected one of autograd, manual"),
        (["run", "mnist-mlp", "model.impl=manual", "optim.name=adamw"], "hand-written SGD"),
        (["run", "mnist-mlp", "train.batch_size=0"], "batch_size"),
        (["run", "mnist-mlpp"], "did you mean: mnist-mlp"),
        (["run", "mnist-mlp", "--preset", "smok"], "did you mean: smoke"),
    ],
)
def test_bad_config_exits_2_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert main([*argv, "--out", str(out)]) == 2
    assert message.lower() in capsys.readouterr().err.lower()
    assert not out.exists()


def test_unknown_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as err:
        main(["run", "mnist-mlp", "--presett", "x"])
    assert err.value.code == 2


def test_missing_data_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "mnist-mlp", "--data-dir", str(tmp_path / "empty"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert "train-images-idx3-ubyte" in err and "llmlab data status" in err
    assert not out.exists()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "smoke"
    assert main(["run", "mnist-mlp", "--preset", "smoke", "--out", str(out), "--device", "cpu"]) == 0
    return out


def test_existing_run_is_never_overwritten(smoke_run, capsys):
    before = (smoke_run / "result.json").read_text()
    assert main(["run", "mnist-mlp", "--preset", "smoke", "--out", str(smoke_run)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (smoke_run / "result.json").read_text() == before


def test_resume_with_a_different_config_is_refused(smoke_run, capsys):
    assert (
        main(["run", "mnist-mlp", "--preset", "smoke", "--out", str(smoke_run), "--resume", "optim.lr=0.2"])
        == 2
    )
    assert "optim.lr: 0.05 -> 0.2" in capsys.readouterr().err


def test_resume_of_a_run_written_before_a_setting_existed(smoke_run, tmp_path, capsys):
    """A run's config.json lacks settings added to llmlab later: it ran as their default, so it resumes;
    only an override that moves such a setting off the preset's default is a change."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(smoke_run, old)
    stored = json.loads((old / "config.json").read_text())
    del stored["config"]["train"]["grad_clip"]
    (old / "config.json").write_text(json.dumps(stored))
    args = ["run", "mnist-mlp", "--preset", "smoke", "--out", str(old), "--resume"]
    assert main([*args, "train.grad_clip=123.0"]) == 2
    assert "train.grad_clip" in capsys.readouterr().err
    assert main(args) == 0


def test_resume_of_a_finished_run_changes_nothing(smoke_run):
    from llmlab.train.checkpoint import load_weights

    before = load_weights(smoke_run / "model.safetensors")
    assert main(["run", "mnist-mlp", "--preset", "smoke", "--out", str(smoke_run), "--resume"]) == 0
    after = load_weights(smoke_run / "model.safetensors")
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_eval_reproduces_the_recorded_test_metrics(smoke_run, capsys):
    assert main(["eval", str(smoke_run), "--split", "test", "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    recorded = json.loads((smoke_run / "result.json").read_text())["metrics"]
    assert metrics["test/accuracy"] == recorded["test/accuracy"]
    assert metrics["test/loss"] == pytest.approx(recorded["test/loss"], rel=1e-6)
    assert main(["eval", str(smoke_run), "--split", "nope"]) == 2


def test_eval_and_report_of_a_non_run_dir(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 1
    assert "not an llmlab run directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 1


def test_report_one_and_several_runs(smoke_run, tmp_path, capsys):
    assert main(["report", str(smoke_run)]) == 0
    assert "# mnist-mlp" in capsys.readouterr().out
    other = tmp_path / "other"
    assert (
        main(
            [
                "run",
                "mnist-mlp",
                "--preset",
                "smoke",
                "--out",
                str(other),
                "optim.lr=0.1",
                "train.max_epochs=1",
            ]
        )
        == 0
    )
    capsys.readouterr()
    table = tmp_path / "table.md"
    assert main(["report", str(smoke_run), str(other), "--out", str(table)]) == 0
    out = capsys.readouterr().out
    assert "optim.lr" in out and "smoke" in out and table.read_text().strip() == out.strip()


def test_data_status_and_bundled_download(tmp_path, capsys):
    assert main(["data", "status", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mnist" in out and "missing" in out
    assert main(["data", "download", "digits"]) == 0
    assert main(["data", "status", "cifar100"]) == 2


def test_data_status_on_the_real_data(shared_data, capsys):
    assert main(["data", "status", "mnist", "--data-dir", str(shared_data)]) == 0
    out = capsys.readouterr().out
    assert "present" in out


def test_demo_falls_back_to_bundled_digits(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--data-dir", str(tmp_path / "no-data"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "digits" in printed and str(out / "report.md") in printed
    result = json.loads((out / "result.json").read_text())
    assert result["preset"] == "digits" and result["target"]["met"]
    assert Path(out / "curves.png").exists()


def test_resume_from_a_corrupt_checkpoint_is_a_clear_error(smoke_run, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(smoke_run, run_dir)
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    state = latest / "state.safetensors"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated, as by a full disk
    code = main(["run", "mnist-mlp", "--preset", "smoke", "--out", str(run_dir), "--resume"])
    err = capsys.readouterr().err
    assert code == 1
    assert "is corrupt" in err and "state.safetensors" in err and "Traceback" not in err
