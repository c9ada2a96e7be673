"""The engines behind `train.strategy`: FSDP2 and DeepSpeed (stages 0-3, offload) inside the one Trainer.

Each runs the smoke GPT recipe for 20 steps on 2 gloo processes under torchrun and must follow the plain
1-process run on the same global batches; its checkpoints (full weights + full optimizer state in torch's
layout) resume bit for bit, and resume under another engine. Tolerances: float32 sums in another order
(all-reduce / reduce-scatter of half-batch gradients, DeepSpeed's flat partitions); measured over 20 steps,
every engine: losses within 2.4e-7, weights within 2.0e-7 in relative norm (the same as our ZeRO, see
tests/recipes/test_gpt_lm.py); the limit 1e-5 leaves 50x. Averaging the wrong number of processes, or a
step on the half batch one rank sees alone, moves both by ~2e-2 (measured there).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from llmlab.cli import main
from llmlab.runner import run
from llmlab.train.checkpoint import load_weights
from tests.runs import relative_diff, torchrun_llmlab, train_rows

ARGS = ["train.max_steps=20", "train.log_every=1", "train.eval_every=10", "train.checkpoint_every=10"]
ARGS += ["optim.lr=1e-3", "train.grad_clip=0.5"]
RUN = ["run", "shakespeare-gpt", "--preset", "smoke", "--device", "cpu", *ARGS]


def _drop_last_checkpoint(run_dir: Path) -> None:
    ckpts = run_dir / "checkpoints"
    (ckpts / "latest").unlink()
    shutil.rmtree(ckpts / "step_00000020")


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain") / "run"
    run("shakespeare-gpt", "smoke", ARGS, out=out, device="cpu")
    return out


def _assert_follows(plain: Path, out: Path) -> None:
    a_rows, b_rows = train_rows(plain), train_rows(out)
    assert len(a_rows) == len(b_rows) == 20
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a_rows, b_rows, strict=True)) < 1e-5
    # the gradient norm before clipping, as each engine computes it over its shards
    assert max(abs(x["grad_norm"] - y["grad_norm"]) for x, y in zip(a_rows, b_rows, strict=True)) < 1e-5
    a, b = load_weights(plain / "model.safetensors"), load_weights(out / "model.safetensors")
    assert a.keys() == b.keys() and relative_diff(a, b) < 1e-5


ENGINES = {
    "fsdp2": ["train.strategy=fsdp2"],
    "deepspeed0": ["train.strategy=deepspeed", "train.ds_stage=0"],
    "deepspeed1": ["train.strategy=deepspeed", "train.ds_stage=1"],
    "deepspeed2": ["train.strategy=deepspeed", "train.ds_stage=2"],
    "deepspeed3": ["train.strategy=deepspeed", "train.ds_stage=3"],
    "deepspeed2-offload": ["train.strategy=deepspeed", "train.ds_stage=2", "train.offload=optimizer"],
    "deepspeed3-offload-all": ["train.strategy=deepspeed", "train.ds_stage=3", "train.offload=all"],
    # parameters gathered again when a checkpointed block is recomputed in backward
    "zero3-checkpointing": ["train.strategy=zero3", "train.activation_checkpointing=true"],
    "fsdp2-checkpointing": ["train.strategy=fsdp2", "train.activation_checkpointing=true"],
    "deepspeed3-checkpointing": [
        "train.strategy=deepspeed",
        "train.ds_stage=3",
        "train.activation_checkpointing=true",
    ],
}
RESUMED = {"fsdp2", "deepspeed0", "deepspeed2", "deepspeed3"}


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(ENGINES))
def test_two_processes_follow_one_and_resume_bit_for_bit(plain, tmp_path, engine):
    out = tmp_path / engine
    torchrun_llmlab([*RUN, *ENGINES[engine], "--out", str(out)])
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["status"] == "completed"
    _assert_follows(plain, out)
    assert (out / "sections" / "samples.md").is_file()  # rank 0 sampled from the whole model after training
    if engine not in RESUMED:
        return
    done = load_weights(out / "model.safetensors")
    _drop_last_checkpoint(out)
    torchrun_llmlab([*RUN, *ENGINES[engine], "--out", str(out), "--resume"])
    again = load_weights(out / "model.safetensors")
    assert all(torch.equal(done[k], again[k]) for k in done)


@pytest.mark.slow
def test_checkpoints_move_between_engines(plain, tmp_path):
    """One format for every engine: an FSDP2 run stopped at step 10 continues under DeepSpeed ZeRO-3, and
    a DeepSpeed ZeRO-2 run's checkpoint continues on one plain process; both end where the plain run does.

    The two moves share nothing, so they run side by side: each launch is mostly start-up (imports,
    rendezvous: ~10 s of a 20-step run's ~12 s), which two launches overlap on 2 cores, and the one-process
    resume runs while the DeepSpeed ZeRO-3 launch starts (measured: 39 s one after another, 31 s so)."""
    from concurrent.futures import ThreadPoolExecutor

    out, out2 = tmp_path / "moved", tmp_path / "to-one"
    with ThreadPoolExecutor(max_workers=1) as pool:
        to_one = pool.submit(torchrun_llmlab, [*RUN, *ENGINES["deepspeed2"], "--out", str(out2)])
        torchrun_llmlab([*RUN, *ENGINES["fsdp2"], "--out", str(out)])
        to_one.result()
        _drop_last_checkpoint(out)
        moved = pool.submit(torchrun_llmlab, [*RUN, *ENGINES["deepspeed3"], "--out", str(out), "--resume"])
        _drop_last_checkpoint(out2)
        assert main([*RUN, "--out", str(out2), "--resume"]) == 0
        moved.result()

    _assert_follows(plain, out)
    record = json.loads((out / "config.json").read_text())  # says what it finished under, and the start
    assert record["config"]["train"]["strategy"] == "deepspeed" and record["config"]["train"]["ds_stage"] == 3
    assert record["resumed_from_engine"] == [{"train.strategy": "fsdp2", "train.ds_stage": 2}]
    _assert_follows(plain, out2)


def test_one_process_engines_equal_plain_training(plain, tmp_path):
    """Without a launcher both engines run on a private group of one, and take the plain run's steps."""
    for engine in ("fsdp2", "deepspeed2"):
        out = tmp_path / engine
        run("shakespeare-gpt", "smoke", [*ARGS, *ENGINES[engine]], out=out, device="cpu")
        _assert_follows(plain, out)
    assert not torch.distributed.is_initialized()  # the private group is gone again


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.offload=optimizer"], "train.strategy=deepspeed"),
        (["train.strategy=deepspeed", "train.ds_stage=2", "train.offload=all"], "ds_stage=3"),
        (["train.strategy=deepspeed", "train.ds_stage=0", "train.offload=optimizer"], "ds_stage >= 1"),
        (["train.strategy=fsdp2", "train.precision=fp16"], "bf16"),
        (["train.strategy=deepspeed", "train.compile=true"], "compile"),
        (["train.strategy=deepspeed", "train.ds_stage=4"], "0, 1, 2 and 3"),
    ],
)
def test_engine_switches_that_cannot_work_are_refused_before_anything_is_written(
    tmp_path, capsys, overrides, message
):
    out = tmp_path / "r"
    assert main(["run", "shakespeare-gpt", "--preset", "smoke", "--out", str(out), *overrides]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_deepspeed_config_is_generated_from_ours():
    from llmlab.train.strategy_deepspeed import deepspeed_config

    cfg = deepspeed_config(3, "all", 1.0, "bf16", grad_accum=4, world_size=2)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu"
    assert cfg["bf16"]["enabled"] and cfg["gradient_clipping"] == 1.0
    assert cfg["managed_gradient_accumulation"] is False  # the Trainer says where a global batch ends
    assert cfg["train_batch_size"] == 8 and cfg["zero_force_ds_cpu_optimizer"] is False
    plain_cfg = deepspeed_config(0, "none", None, "fp32", grad_accum=1, world_size=1)
    assert "offload_optimizer" not in plain_cfg["zero_optimization"] and plain_cfg["gradient_clipping"] == 0
