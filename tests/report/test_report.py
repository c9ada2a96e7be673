"""Tests for llmlab.report: loading run directories, curves.png, report.md, comparison and seed aggregation.

Every run directory here is synthetic, written in tmp_path in the trainer's format.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread

from llmlab.config import flatten
from llmlab.report import (
    RunDirError,
    RunRecord,
    aggregate_metrics,
    aggregate_runs,
    compare_runs,
    load_run,
    write_curves,
    write_report,
)
from llmlab.report.markdown import fmt_duration, fmt_metric, fmt_params, md_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(lr: float = 1e-3, seed: int = 0, hidden: int = 256) -> dict[str, Any]:
    return {
        "seed": seed,
        "model": {"hidden": hidden, "layers": 2, "dims": [784, hidden, 10]},
        "data": {"batch_size": 64, "dataset": "mnist"},
        "train": {"epochs": 2, "eval_every": 50},
        "optim": {"name": "adamw", "lr": lr, "weight_decay": 0.0},
        "schedule": {"name": "cosine", "warmup": 10},
    }


def _metrics_lines(steps: int = 120, test_acc: float = 0.9842) -> list[dict[str, Any]]:
    lines = []
    for step in range(1, steps + 1):
        loss = 2.3 * math.exp(-step / 30) + 0.05
        lines.append(
            {
                "step": step,
                "epoch": step / 60,
                "split": "train",
                "time_s": step * 0.1,
                "loss": loss,
                "accuracy": min(0.99, 1 - loss / 2.5),
                "lr": 1e-3 * (1 - step / steps),
                "throughput": 1000.0,
            }
        )
        if step % 30 == 0:
            lines.append(
                {
                    "step": step,
                    "epoch": step / 60,
                    "split": "val",
                    "time_s": step * 0.1,
                    "loss": loss * 1.1,
                    "accuracy": min(0.99, 1 - loss / 2.4),
                }
            )
    lines.append(
        {
            "step": steps,
            "epoch": steps / 60,
            "split": "test",
            "time_s": steps * 0.1 + 1,
            "loss": 0.06,
            "accuracy": test_acc,
        }
    )
    return lines


def _result(test_acc: float = 0.9842, target: float = 0.98, seed: int = 0) -> dict[str, Any]:
    return {
        "recipe": "mnist-mlp",
        "preset": "cpu",
        "status": "completed",
        "metrics": {
            "val/loss": 0.065,
            "val/accuracy": test_acc + 0.001,
            "test/loss": 0.06,
            "test/accuracy": test_acc,
        },
        "target": {
            "metric": "test/accuracy",
            "value": target,
            "higher_is_better": True,
            "achieved": test_acc,
            "met": test_acc >= target,
        },
        "wall_time_s": 83.4,
        "train_time_s": 80.1,
        "steps": 120,
        "epochs": 2.0,
        "throughput": {"value": 1234.5, "unit": "samples/s"},
        "peak_memory_mb": 312.7,
        "peak_memory_kind": "cpu_max_rss",
        "n_params": 203530,
        "seed": seed,
        "device": "cpu",
        "precision": "fp32",
        "world_size": 1,
        "hardware": {
            "platform": "Linux-6.1-x86_64",
            "cpu": "x86_64",
            "cpu_count": 2,
            "gpu": None,
            "gpu_count": 0,
        },
        "versions": {"python": "3.11.7", "torch": "2.5.0", "numpy": "2.1.0", "llmlab": "0.1.0"},
        "git_commit": "abc1234",
        "started_at": "2025-01-01T10:00:00",
        "finished_at": "2025-01-01T10:01:23",
        "notes": ["synthetic run for tests"],
        "data": "MNIST (real, 55000 train / 5000 val / 10000 test)",
    }


def make_run(
    root: Path,
    name: str,
    *,
    lr: float = 1e-3,
    seed: int = 0,
    test_acc: float = 0.9842,
    with_result: bool = True,
    metrics: list[dict[str, Any]] | None = None,
    raw_tail: str = "",
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    config = {
        "recipe": "mnist-mlp",
        "preset": "cpu",
        "overrides": [f"optim.lr={lr}"],
        "config": _config(lr=lr, seed=seed),
        "llmlab_version": "0.1.0",
    }
    (run / "config.json").write_text(json.dumps(config))
    lines = _metrics_lines(test_acc=test_acc) if metrics is None else metrics
    text = "".join(json.dumps(line) + "\n" for line in lines) + raw_tail
    (run / "metrics.jsonl").write_text(text)
    if with_result:
        (run / "result.json").write_text(json.dumps(_result(test_acc=test_acc, seed=seed)))
    return run


def _table_rows(table: str) -> list[list[str]]:
    """Data rows of the first markdown table in `table`, cells stripped."""
    lines = [line for line in table.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[2:]]


def _header(table: str) -> list[str]:
    first = next(line for line in table.splitlines() if line.startswith("|"))
    return [c.strip() for c in first.strip("|").split(" | ")]


# ---------------------------------------------------------------------------------------------------------
# load_run
# ---------------------------------------------------------------------------------------------------------


def test_load_run_reads_all_three_files(tmp_path):
    run = load_run(str(make_run(tmp_path, "r0")))
    assert isinstance(run, RunRecord)
    assert run.name == "r0" and run.recipe == "mnist-mlp" and run.preset == "cpu"
    assert run.result is not None and run.status == "completed"
    assert len(run.metrics) == 120 + 4 + 1
    assert run.flat_config()["optim.lr"] == 1e-3
    assert run.final_metrics()["test/accuracy"] == pytest.approx(0.9842)


def test_missing_dir_raises_run_dir_error(tmp_path):
    with pytest.raises(RunDirError, match="does not exist") as info:
        load_run(tmp_path / "nope")
    assert isinstance(info.value, FileNotFoundError)


def test_dir_without_config_is_not_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="is not an llmlab run directory: config.json missing"):
        load_run(tmp_path / "empty")


@pytest.mark.parametrize("filename", ["config.json", "result.json"])
def test_corrupt_json_names_the_file(tmp_path, filename):
    run = make_run(tmp_path, "r0")
    (run / filename).write_text('{"recipe": "mnist-mlp", "stat')
    with pytest.raises(RunDirError, match=filename):
        load_run(run)


def test_malformed_metrics_lines_are_skipped_with_a_warning(tmp_path):
    good = _metrics_lines(steps=30)
    tail = '[1, 2]\n{"split": "train"}\n{"step": 31, "split": "tr'  # not an object, no step, truncated
    run = make_run(tmp_path, "r0", metrics=good, raw_tail=tail)
    with pytest.warns(UserWarning, match="malformed metrics line") as caught:
        record = load_run(run)
    assert len(caught) == 3
    assert len(record.metrics) == len(good)


def test_flatten_uses_dotted_keys_and_keeps_lists():
    flat = flatten({"seed": 1, "optim": {"lr": 0.1, "betas": [0.9, 0.99]}, "x": {"y": {"z": None}}})
    assert flat == {"seed": 1, "optim.lr": 0.1, "optim.betas": [0.9, 0.99], "x.y.z": None}


# ---------------------------------------------------------------------------------------------------------
# curves.png
# ---------------------------------------------------------------------------------------------------------


def test_write_curves_makes_a_real_png(tmp_path):
    run = make_run(tmp_path, "r0")
    out = write_curves(run)
    assert out == run / "curves.png"
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert out.stat().st_size > 20_000
    pixels = imread(out)
    height, width = pixels.shape[:2]
    assert width >= 800 and height >= 400  # loss, accuracy and lr panels
    assert pixels[..., :3].std() > 0.05  # not a blank canvas


def test_write_curves_without_metrics_returns_none(tmp_path):
    run = make_run(tmp_path, "r0", metrics=[], with_result=False)
    assert write_curves(run) is None
    assert not (run / "curves.png").exists()


def test_write_curves_discovers_other_metrics_and_survives_nan(tmp_path):
    lines = [
        {
            "step": s,
            "epoch": 0.0,
            "split": "train",
            "time_s": 0.0,
            "loss": float("nan") if s == 5 else 1.0 / s,
        }
        for s in range(1, 10)
    ]
    lines.append(
        {
            "step": 9,
            "epoch": 1.0,
            "split": "val",
            "time_s": 1.0,
            "loss": 0.2,
            "perplexity": 1.22,
            "bleu": 21.3,
        }
    )
    run = make_run(tmp_path, "r0", metrics=lines, with_result=False)
    out = write_curves(load_run(run))
    assert out is not None and out.read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------------------------------------


def test_report_has_headline_verdict_config_and_image(tmp_path):
    run = make_run(tmp_path, "r0")
    out = write_report(run)
    text = out.read_text()
    assert out == run / "report.md"
    assert text.startswith("# mnist-mlp · cpu")
    assert "test accuracy 98.42% — target ≥98.00% met ✅" in text
    assert "MNIST (real, 55000 train / 5000 val / 10000 test)" in text
    assert "203,530 (203.5K)" in text
    for key in ("`seed`", "`model.hidden`", "`optim.lr`", "`schedule.warmup`", "`model.dims`"):
        assert key in text
    assert "`optim.lr=0.001`" in text
    assert "![curves](curves.png)" in text
    assert "1,234 samples/s" in text and "313 MB (CPU max RSS)" in text
    assert "`abc1234`" in text and "2025-01-01T10:00:00" in text and "synthetic run for tests" in text
    png = (run / "curves.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 20_000


def test_recipe_sections_come_after_the_results_in_name_order(tmp_path):
    run = make_run(tmp_path, "r0")
    (run / "sections").mkdir()
    (run / "sections" / "20-second.md").write_text("## Second\n\nbody two\n")
    (run / "sections" / "10-first.md").write_text("## First\n\nbody one\n")
    (run / "sections" / "notes.txt").write_text("not markdown: ignored")
    text = write_report(run).read_text()
    assert (
        text.index("## Results") < text.index("## First") < text.index("## Second") < text.index("## Curves")
    )
    assert "not markdown" not in text


def test_heatmap_is_a_png_and_checks_its_labels(tmp_path):
    import torch

    from llmlab.report.heatmap import write_heatmap

    weights = torch.softmax(torch.randn(3, 4), dim=-1)
    path = write_heatmap(tmp_path / "a.png", weights, ["a", "b", "c", "</s>"], ["x", " ", "</s>"], title="t")
    assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="rows"):
        write_heatmap(tmp_path / "b.png", weights, ["a"], ["x"])


def test_report_target_not_met(tmp_path):
    text = write_report(make_run(tmp_path, "r0", test_acc=0.9712)).read_text()
    assert "test accuracy 97.12% — target ≥98.00% not met ❌" in text


def test_report_without_result_uses_metrics_log(tmp_path):
    run = make_run(tmp_path, "killed", with_result=False, raw_tail='{"step": 121, "split": "train", "lo')
    with pytest.warns(UserWarning, match="malformed"):
        text = write_report(run).read_text()
    assert "no result.json" in text
    assert "`test/accuracy`" in text and "98.42%" in text  # last logged test value
    assert "![curves](curves.png)" in text and (run / "curves.png").is_file()
    assert "`optim.lr`" in text
    assert "120 steps" in text  # progress taken from the log


def test_report_with_sparse_result_shows_dashes(tmp_path):
    run = make_run(tmp_path, "r0", metrics=[])
    (run / "result.json").write_text(json.dumps({"status": "interrupted"}))
    text = write_report(run).read_text()
    assert "status: **interrupted**" in text
    assert "—" in text
    assert "no metrics recorded yet" in text
    assert "_No metrics logged yet._" in text
    assert not (run / "curves.png").exists()


def test_report_refreshes_stale_curves(tmp_path):
    run = make_run(tmp_path, "r0")
    (run / "curves.png").write_bytes(b"old")
    os.utime(run / "curves.png", (1, 1))
    write_report(run)
    assert (run / "curves.png").read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------------------------------------------------
# compare_runs and aggregate_runs
# ---------------------------------------------------------------------------------------------------------


def test_compare_runs_shows_differing_config_keys_only(tmp_path):
    lrs = [1e-2, 1e-3, 1e-4]
    runs = [make_run(tmp_path, f"lr{i}", lr=lr, test_acc=0.97 + i / 100) for i, lr in enumerate(lrs)]
    table = compare_runs([load_run(r) for r in runs])
    header = _header(table)
    rows = _table_rows(table)
    assert "optim.lr" in header
    assert "model.hidden" not in header and "seed" not in header and "optim.name" not in header
    assert header[:6] == ["run", "recipe", "preset", "status", "test/accuracy (target)", "met"]
    assert "val/accuracy" in header and "params" in header and "throughput" in header
    assert {row[header.index("time/epoch")] for row in rows} == {"40.0s"}  # 80.1 s of training / 2 epochs
    assert {row[header.index("peak memory")] for row in rows} == {"313 MB"}
    assert [row[0] for row in rows] == ["lr0", "lr1", "lr2"]
    lr_col = header.index("optim.lr")
    assert [row[lr_col] for row in rows] == ["0.01", "0.001", "0.0001"]
    assert [row[5] for row in rows] == ["❌", "✅", "✅"]
    assert rows[2][4] == "**99.00%**"  # best target value in bold
    assert compare_runs(runs) == table  # paths work as well as records, same stable order


def test_compare_runs_needs_runs():
    with pytest.raises(ValueError):
        compare_runs([])


def _sweep(tmp_path: Path) -> tuple[list[Path], dict[float, list[float]]]:
    accs = {1e-3: [0.981, 0.984, 0.979], 1e-2: [0.962, 0.971, 0.958]}
    runs = [
        make_run(tmp_path, f"lr{lr}-s{seed}", lr=lr, seed=seed, test_acc=acc)
        for lr, values in accs.items()
        for seed, acc in enumerate(values)
    ]
    return runs, accs


def test_aggregate_metrics_match_numpy(tmp_path):
    runs, accs = _sweep(tmp_path)
    groups = aggregate_metrics(runs)
    # one group per lr, sorted ascending; seed is not a grouping key
    assert [g.key for g in groups] == [{"optim.lr": 1e-3}, {"optim.lr": 1e-2}]
    for g in groups:
        values = np.array(accs[g.key["optim.lr"]])
        stats = g.metrics["test/accuracy"]
        assert stats.n == 3 and len(g.runs) == 3
        assert stats.mean == pytest.approx(values.mean(), abs=1e-12)
        assert stats.std == pytest.approx(values.std(ddof=1), abs=1e-12)
    assert (groups[0].met, groups[0].evaluated) == (2, 3)


def test_aggregate_runs_table(tmp_path):
    runs, accs = _sweep(tmp_path)
    table = aggregate_runs(runs)
    header, rows = _header(table), _table_rows(table)
    assert header[:7] == ["recipe", "preset", "optim.lr", "runs", "seeds", "target met", "test/accuracy"]
    assert "seed" not in header
    assert len(rows) == 2
    for row, lr in zip(rows, [1e-3, 1e-2], strict=True):
        values = np.array(accs[lr])
        expected = f"{values.mean() * 100:.2f} ± {values.std(ddof=1) * 100:.2f}% (n=3)"
        assert row[header.index("test/accuracy")] == expected
        assert row[header.index("seeds")] == "0, 1, 2"
        assert row[header.index("runs")] == "3"


def test_aggregate_runs_explicit_group_by_and_unknown_key(tmp_path):
    runs, _ = _sweep(tmp_path)
    groups = aggregate_metrics(runs, group_by=["model.hidden"])
    assert len(groups) == 1 and len(groups[0].runs) == 6
    single = aggregate_metrics(runs[:1])
    assert single[0].metrics["test/accuracy"].std is None
    assert "(n=1)" in aggregate_runs(runs[:1])
    with pytest.raises(ValueError, match="did you mean 'optim.lr'"):
        aggregate_metrics(runs, group_by=["optim.lrr"])


# ---------------------------------------------------------------------------------------------------------
# Formatting helpers
# ---------------------------------------------------------------------------------------------------------


def test_formatting_helpers():
    assert fmt_metric("test/accuracy", 0.98421) == "98.42%"
    assert fmt_metric("test/accuracy", 98.4) == "98.4"  # already a percentage: left alone
    assert fmt_metric("val/loss", 0.053214) == "0.05321"
    assert fmt_metric("test/bleu", 25.71) == "25.71"
    assert fmt_metric("val/loss", None) == "—"
    assert fmt_params(124_439_808) == "124.4M"
    assert fmt_duration(83.4) == "1m 23s" and fmt_duration(7322) == "2h 02m" and fmt_duration(None) == "—"
    table = md_table(["name", "value"], [["a|b", "1.5"], ["c", "—"]])
    assert "a\\|b" in table and table.splitlines()[1].endswith(": |")


def test_compare_runs_with_a_killed_run_and_a_missing_key(tmp_path):
    done = make_run(tmp_path, "done")
    killed = make_run(tmp_path, "killed", with_result=False)
    config = json.loads((killed / "config.json").read_text())
    del config["config"]["schedule"]["warmup"]
    (killed / "config.json").write_text(json.dumps(config))
    table = compare_runs([done, killed])
    header, rows = _header(table), _table_rows(table)
    assert "schedule.warmup" in header and "optim.lr" not in header
    assert rows[1][header.index("status")] == "running/killed"
    assert rows[1][header.index("schedule.warmup")] == "—"
    assert rows[1][header.index("test/accuracy (target)")] == "—"  # no target without result.json


def test_report_of_a_diverged_run(tmp_path):
    run = make_run(tmp_path, "diverged")
    result = _result()
    result.update(
        status="diverged",
        metrics={"val/loss": float("nan")},
        target={
            "metric": "test/accuracy",
            "value": 0.98,
            "higher_is_better": True,
            "achieved": None,
            "met": None,
        },
    )
    (run / "result.json").write_text(json.dumps(result))
    text = write_report(run).read_text()
    assert "status **diverged**" in text
    assert "test accuracy not measured — target ≥98.00% not evaluated" in text
    assert "| `val/loss`" in text and "nan" in text
    assert "- synthetic run for tests" in text
