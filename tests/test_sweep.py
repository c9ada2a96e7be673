"""llmlab sweep: grid × seeds, validated up front, resumable, one table with mean ± std."""

from __future__ import annotations

import json
import re

import pytest

from llmlab.cli import main
from llmlab.config import ConfigError
from llmlab.sweep import plan_sweep


def test_plan_splits_axes_from_fixed_overrides_and_handles_tuple_keys():
    plan = plan_sweep(
        "mnist-mlp",
        "smoke",
        ["optim.lr=0.1,0.2", "optim.betas=0.9,0.99;0.8,0.9", "train.max_epochs=1"],
        seeds=2,
    )
    assert plan.axes == {"optim.lr": ["0.1", "0.2"], "optim.betas": ["0.9,0.99", "0.8,0.9"]}
    assert plan.fixed == ["train.max_epochs=1"]
    runs = plan.runs()
    assert len(runs) == 8 and len({name for name, _ in runs}) == 8
    assert runs[0][1][-1] == "seed=0" and "optim.lr=0.1" in runs[0][1]


@pytest.mark.parametrize(
    "items, message",
    [
        (["optim.lr=0.1,fast"], "expected a number"),
        (["optim.lrr=0.1,0.2"], "Did you mean: optim.lr"),
        (["seed=1,2"], "--seeds"),
    ],
)
def test_bad_sweeps_fail_before_running(items, message):
    with pytest.raises(ConfigError, match=message):
        plan_sweep("mnist-mlp", "smoke", items, seeds=1)


def test_sweep_runs_the_grid_and_writes_mean_and_std(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = [
        "sweep",
        "mnist-mlp",
        "--preset",
        "smoke",
        "--seeds",
        "2",
        "--out",
        str(out),
        "--device",
        "cpu",
        "optim.lr=0.02,0.05",
        "train.max_steps=4",  # the sweep's machinery, not learning: 4 steps, not the epoch's 32 (~3 s a run)
    ]
    assert main(argv) == 0
    table = (out / "sweep.md").read_text()
    assert "optim.lr" in table and "± " in table and "(n=2)" in table.replace("n = 2", "n=2")
    assert re.search(r"\|\s*throughput\s*\|\s*peak memory\s*\|", table)  # the aggregate's last columns
    # one numeric axis: the target metric against it, drawn and linked
    assert (out / "sweep.png").stat().st_size > 0 and "](sweep.png)" in table
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(runs) == 4
    for name in runs:
        assert json.loads((out / name / "result.json").read_text())["status"] == "completed"
    capsys.readouterr()
    assert main(argv) == 0  # a second call finds everything done
    assert capsys.readouterr().out.count("done already") == 4


def test_bad_sweep_on_the_command_line_exits_2(tmp_path, capsys):
    assert main(["sweep", "mnist-mlp", "--out", str(tmp_path / "s"), "model.hidden=64,big"]) == 2
    assert "model.hidden='big'" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_seeds_of_one_grid_point_form_one_group_across_llmlab_versions(tmp_path, capsys):
    """A sweep groups by its own axes only: seeds of one setting stay one row even when an older run's
    config lacks a key added since (seed 0 of runs/s3-lstm-4e3 predates `train.dist_timeout_s`, and the
    table used to split it from seeds 1 and 2)."""
    from llmlab.runner import run
    from llmlab.sweep import run_sweep

    out = tmp_path / "sweep"
    plan = plan_sweep("mnist-mlp", "smoke", ["train.max_steps=2"], seeds=2)
    for name, overrides in plan.runs():  # the runs exist already: the sweep only writes its table
        run("mnist-mlp", "smoke", overrides, out=out / name, device="cpu")
    old = out / "seed=0" / "config.json"
    record = json.loads(old.read_text())
    del record["config"]["train"]["dist_timeout_s"]
    old.write_text(json.dumps(record))
    table = run_sweep(plan, out, device="cpu")
    assert capsys.readouterr().out.count("done already") == 2
    summary = table.split("## Mean ± std over seeds", 1)[1].split("## Every run", 1)[0]
    rows = [line for line in summary.splitlines() if line.startswith("| mnist-mlp")]
    assert len(rows) == 1 and re.search(r"\|\s*0, 1\s*\|", rows[0]), summary
