"""agnews-bert, offline: whole runs through the runner with a tiny random BERT (the real bert-base-uncased
vocab) on articles carved from the shared AG News test split; the saved model loads in a transformers
pipeline; it learns; --resume continues bit for bit; 2 processes (torchrun, accelerate launch) and 2
accumulated micro-batches equal 1 process with the same global batch, and a run whose gradients are twice the
global mean (summed over 2 processes or 2 micro-batches instead of averaged) does not."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmlab.config import ConfigError
from llmlab.data.agnews import CLASSES
from llmlab.recipes.agnews_bert import CARVED_NOTE, GlobalBatchSampler, LaunchError, check_world_size
from llmlab.runner import evaluate_run, run
from llmlab.train.callbacks import Callback
from tests.runs import ScaleGradients, torchrun

# The DDP runs: 24 steps of the smoke preset, dropout off (masks are drawn per process), no checkpoints, and
# plain SGD without clipping, so that each update is proportional to the gradient. (The preset's AdamW divides
# by sqrt(v), so a constant gradient scale reaches its steps only through eps, where gradients are ~1e-8, and
# clipping at 1.0 flattens it further: there, gradients summed over 2 processes instead of averaged, or a
# missing 1/grad_accum, moved the weights by 1.7e-3 at most, against 0.10 with SGD.)
# lr 0.05: the loss still falls (1.412 -> 1.391 over the 24 steps), nothing diverges at twice the gradient.
DDP_ARGS = [
    "model.dropout=0",
    "train.max_steps=24",
    "train.checkpoint_every=-1",
    "train.eval_every=0",
    "optim.name=sgd",
    "optim.lr=0.05",
    "train.grad_clip=none",
]


# One intra-op thread for every test here: on 2 shared cores, more threads only contend (and 2 processes get
# one each).
pytestmark = pytest.mark.usefixtures("one_thread")


def _env(data: Path) -> dict[str, str]:
    return {**os.environ, "LLMLAB_DATA": str(data), "LLMLAB_PROGRESS": "0", "OMP_NUM_THREADS": "1"}


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model" / "model.safetensors")


def _assert_same_weights(one: Path, other: Path) -> None:
    """Every weight of the two runs' models within 1e-5.

    The runs (DDP_ARGS: SGD, no clipping) differ only in float32 rounding: the all-reduce and each process's
    half-size matmuls sum in another order than one process. Measured after the 24 steps, 2 processes vs 1:
    at most 1.2e-7 (one float32 ulp of a LayerNorm weight near 1), most weights 3e-8; other CPUs' kernels
    (AVX-512) block sums differently, up to 8e-6 after 32 SGD steps of tests/test_runner.py's MLP. 1e-5 covers
    that, and is 1e4 below the 0.10 a gradient twice the global mean moves the weights by (measured; the
    guard test_the_comparison_catches_gradients_twice_the_mean shows this comparison fails on it)."""
    a, b = _weights(one), _weights(other)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_smoke_run_writes_the_record_and_a_pipeline_ready_model(shared_data, tmp_path):
    out = tmp_path / "run"
    result = run("agnews-bert", "smoke", out=out, device="cpu", data_dir=shared_data)
    for name in ("config.json", "metrics.jsonl", "result.json", "report.md", "curves.png"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert result["status"] == "completed" and result["world_size"] == 1 and result["precision"] == "fp32"
    assert result["target"]["met"], result["metrics"]
    assert any(CARVED_NOTE in n for n in result["notes"])
    assert result["throughput"]["unit"] == "samples/s" and result["throughput"]["value"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "val", "test"}
    train = [r for r in records if r["split"] == "train"]
    assert {"step", "epoch", "time_s", "loss", "accuracy", "lr", "throughput"} <= set(train[0])
    assert [r["step"] for r in train][:3] == [8, 16, 24] and train[-1]["step"] == result["steps"] == 192
    assert [r["split"] for r in records].count("test") == 1 and records[-1]["split"] == "test"

    from transformers import pipeline

    classify = pipeline("text-classification", model=str(out / "model"), device="cpu")
    answers = classify(["Stocks fell as oil prices rose.", "The striker scored twice in the final."])
    assert all(a["label"] in CLASSES and 0 <= a["score"] <= 1 for a in answers)
    assert classify.model.config.id2label == dict(enumerate(CLASSES))
    assert classify.tokenizer.model_max_length == 48  # the training length, what truncation=True cuts to
    assert classify("word " * 2000, truncation=True)[0]["label"] in CLASSES

    # `llmlab eval` reloads model/ and gets the run's own test figure back
    again = evaluate_run(out, "test", device="cpu", data_dir=shared_data)
    assert again["accuracy"] == result["metrics"]["test/accuracy"]
    assert again["loss"] == pytest.approx(result["metrics"]["test/loss"], rel=1e-5)


def test_tiny_bert_learns_agnews(shared_data, tmp_path):
    """1,536 carved articles, 2 epochs of a tiny random BERT: measured 59.2% test accuracy on 512 held-out
    articles (val 64.8%; chance 25%), ~15 s on one core."""
    result = run(
        "agnews-bert",
        "smoke",
        [
            "data.train_size=1536",
            "data.val_size=128",
            "data.test_size=512",
            "model.max_length=64",
            "train.batch_size=16",
            "train.max_epochs=2",
            "train.eval_every=0",
            "train.checkpoint_every=-1",
            "optim.lr=3e-3",
        ],
        out=tmp_path / "run",
        device="cpu",
        data_dir=shared_data,
    )
    assert result["metrics"]["test/accuracy"] > 0.4, result["metrics"]


class _InterruptAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, loss: float) -> None:
        if trainer.step == self.step:
            raise KeyboardInterrupt


def test_resume_after_an_interrupt_equals_an_uninterrupted_run(shared_data, tmp_path):
    args = [
        "train.max_steps=24",
        "train.checkpoint_every=8",
        "train.eval_every=0",
    ]  # dropout on: RNG restored
    straight = run("agnews-bert", "smoke", args, out=tmp_path / "a", device="cpu", data_dir=shared_data)
    with pytest.raises(KeyboardInterrupt):
        run(
            "agnews-bert",
            "smoke",
            args,
            out=tmp_path / "b",
            device="cpu",
            data_dir=shared_data,
            callbacks=[_InterruptAt(13)],
        )
    assert json.loads((tmp_path / "b" / "result.json").read_text())["status"] == "interrupted"
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step-0000008"
    resumed = run(
        "agnews-bert", "smoke", args, out=tmp_path / "b", resume=True, device="cpu", data_dir=shared_data
    )
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resuming"
    assert resumed["metrics"] == straight["metrics"] and resumed["steps"] == 24

    def curve(run_dir: Path) -> list[tuple]:  # metrics.jsonl without the clock
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["split"], r["loss"], r["accuracy"]) for r in lines]

    assert curve(tmp_path / "b") == curve(tmp_path / "a")  # the killed run's lines after step 8 dropped


def test_launch_guards():
    check_world_size(2, {"WORLD_SIZE": "2"})
    check_world_size(1, {})
    with pytest.raises(LaunchError, match="unsynchronised"):
        check_world_size(1, {"WORLD_SIZE": "2"})  # e.g. Accelerator() without cpu=True on a CPU-only machine
    with pytest.raises(LaunchError, match="starts ONE process"):
        check_world_size(1, {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"})  # launch --cpu -n 2
    with pytest.raises(ConfigError, match="smaller than one batch"):
        GlobalBatchSampler(n=10, micro_size=8, accum=2, seed=0)
    sampler = GlobalBatchSampler(n=50, micro_size=8, accum=2, seed=0)
    batches = sampler.global_batches()
    assert len(batches) == len(sampler) == 6 and all(len(b) == 8 for b in batches)
    sampler.skip(2)
    sampler.set_epoch(0)  # as Accelerate's loader does when an iteration starts: the skip stays
    assert list(sampler) == batches[2:] and len(sampler) == 4
    sampler.set_epoch(1)
    sampler.skip(0)
    assert list(sampler) != batches and len(sampler) == 6


# ------------------------------------------------------------------------------------------- 2 processes
_BASELINE: dict[str, Path] = {}


def _one_process(shared_data: Path, tmp_path_factory) -> Path:
    """The 1-process run both launches compare with (made once per test session)."""
    if "one" not in _BASELINE:
        out = tmp_path_factory.mktemp("agnews-ddp") / "one"
        run("agnews-bert", "smoke", DDP_ARGS, out=out, device="cpu", data_dir=shared_data)
        _BASELINE["one"] = out
    return _BASELINE["one"]


def _check_two_match_one(one: Path, two: Path, launched: subprocess.CompletedProcess) -> None:
    assert launched.returncode == 0, launched.stderr[-3000:]
    result = json.loads((two / "result.json").read_text())
    assert result["world_size"] == 2 and result["steps"] == 24
    assert any("2 process(es) x 1 micro-batch(es) x 4 articles" in n for n in result["notes"])
    _assert_same_weights(one, two)  # the tolerance is justified there
    r1 = json.loads((one / "result.json").read_text())
    assert result["metrics"]["test/accuracy"] == pytest.approx(r1["metrics"]["test/accuracy"], abs=1 / 64)


def test_gradient_accumulation_matches_one_big_batch(shared_data, tmp_path, tmp_path_factory):
    """The global batch of 8 as 2 accumulated micro-batches of 4 (Accelerate's `accumulate`) takes the same
    steps as one batch of 8: same comparison as the 2 processes, for the same float reasons (measured here:
    at most 1.2e-7, as 2 processes). Each micro-batch's loss is weighted by its half of the batch; without
    that the gradient is twice the mean, which the comparison catches (the guard below)."""
    one = _one_process(shared_data, tmp_path_factory)
    accum = tmp_path / "accum"
    result = run(
        "agnews-bert",
        "smoke",
        [*DDP_ARGS, "train.grad_accum=2"],
        out=accum,
        device="cpu",
        data_dir=shared_data,
    )
    assert result["steps"] == 24
    assert any("1 process(es) x 2 micro-batch(es) x 4 articles" in n for n in result["notes"])
    _assert_same_weights(one, accum)


def _launch(launcher: list[str], shared_data: Path, out: Path) -> subprocess.CompletedProcess:
    """The DDP smoke run of agnews-bert under `launcher` (torchrun or accelerate launch, up to its `-m`)."""
    args = ["-m", "llmlab", "run", "agnews-bert", "--preset", "smoke", "--device", "cpu", *DDP_ARGS]
    return subprocess.run(
        [*launcher, *args, "--out", str(out)],
        env=_env(shared_data),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_two_processes_under_torchrun_match_one(shared_data, tmp_path, tmp_path_factory):
    one, two = _one_process(shared_data, tmp_path_factory), tmp_path / "two"
    launched = _launch(
        torchrun(2),
        shared_data,
        two,
    )
    _check_two_match_one(one, two, launched)


def test_the_comparison_catches_gradients_twice_the_mean(shared_data, tmp_path, tmp_path_factory):
    """Guard for the 2-process and accumulation tests: a run whose gradients are twice the global mean (what 2
    processes that sum instead of average, or 2 micro-batches without 1/grad_accum, give) ends far outside
    their tolerance (max difference measured 0.10 vs the 1e-5 allowed), so those comparisons can fail."""
    one = _one_process(shared_data, tmp_path_factory)
    doubled = tmp_path / "doubled"
    result = run(
        "agnews-bert",
        "smoke",
        DDP_ARGS,
        out=doubled,
        device="cpu",
        data_dir=shared_data,
        callbacks=[ScaleGradients(2.0)],
    )
    assert result["steps"] == 24
    with pytest.raises(AssertionError):
        _assert_same_weights(one, doubled)
    assert _max_diff(_weights(one), _weights(doubled)) > 1e-2  # measured 0.10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_under_accelerate_launch_match_one(shared_data, tmp_path, tmp_path_factory):
    """`accelerate launch --multi_gpu` is torchrun underneath, and works on CPU with --device cpu. (Its
    `--cpu` mode starts one process only: refused, see test_launch_guards.)"""
    one, two = _one_process(shared_data, tmp_path_factory), tmp_path / "two"
    launched = _launch(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(_free_port()),
        ],
        shared_data,
        two,
    )
    _check_two_match_one(one, two, launched)
