"""train.strategy=accelerate: HF Accelerate's engine in the one Trainer (llmlab/train/strategy_accelerate.py).

A tiny MLP in float64 (so the order of sums is the only possible difference): on one process Accelerate
takes exactly the steps of `ddp` (accumulation, clipping and dropout included); its checkpoints are the same
full state, so a run resumes under the other strategy; on 2 gloo processes under torchrun (no_sync on all but
the last micro-batch, one all-reduce per step; dropout off, its masks are drawn per process) it follows the
1-process run. The launch traps and impossible
combinations are ConfigErrors before anything is written. (agnews-bert, tests/recipes/, runs it on BERT.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmlab.config import ConfigError
from llmlab.data.loader import TensorLoader
from llmlab.models.mlp import MLPConfig, build_mlp
from llmlab.train.callbacks import Callback
from llmlab.train.config import OptimConfig, ScheduleConfig, TrainConfig
from llmlab.train.distributed import DistEnv
from llmlab.train.optim import build_optimizer
from llmlab.train.strategy import check_config
from llmlab.train.strategy_accelerate import LaunchError
from llmlab.train.tasks import ClassificationTask
from llmlab.train.trainer import Trainer

TRAIN = {"batch_size": 32, "grad_accum": 2, "grad_clip": 0.5, "max_epochs": 2, "log_every": 1}


def _data(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(3, 12, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 3, (n,), generator=g)
    return protos[y] + torch.randn(n, 12, generator=g, dtype=torch.float64), y


def make_trainer(strategy: str, env: DistEnv | None = None, checkpoint_dir: Path | None = None,
                 callbacks: tuple = (), dtype: torch.dtype = torch.float64, dropout: float = 0.0,
                 **train: object) -> Trainer:  # fmt: skip
    env = env or DistEnv()
    torch.manual_seed(0)
    model = build_mlp(MLPConfig(in_features=12, hidden=16, depth=2, num_classes=3, dropout=dropout)).to(dtype)
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=3e-2, weight_decay=1e-2))
    cfg = TrainConfig(**{**TRAIN, "precision": "fp32", "strategy": strategy, **train})
    x, y = _data()
    loader = TensorLoader((x.to(dtype), y), cfg.batch_size, shuffle=True, drop_last=True, seed=7,
                          rank=env.rank, world_size=env.world_size)  # fmt: skip
    vx, vy = _data(64, seed=1)
    val = TensorLoader((vx.to(dtype), vy), 64, rank=env.rank, world_size=env.world_size)
    return Trainer(model, ClassificationTask(), opt, loader, cfg, ScheduleConfig(warmup_steps=2),
                   eval_loaders={"val": val}, dist_env=env, checkpoint_dir=checkpoint_dir,
                   callbacks=list(callbacks))  # fmt: skip


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.raw_model.state_dict().items()}


class _Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.norms: list[float] = []

    def on_step_end(self, trainer, loss: float) -> None:
        self.losses.append(loss)

    def on_log(self, trainer, record: dict) -> None:
        if record["split"] == "train":
            self.norms.append(record.get("grad_norm"))


def test_one_process_takes_the_steps_of_ddp():
    runs = {}
    for strategy in ("ddp", "accelerate"):
        seen = _Losses()
        trainer = make_trainer(strategy, callbacks=(seen,), dropout=0.2)  # the same masks: same RNG use
        metrics = trainer.fit()
        runs[strategy] = (trainer, seen, metrics)
    (ddp, a, ma), (acc, b, mb) = runs["ddp"], runs["accelerate"]
    assert acc.strategy.name == "accelerate" and acc.step == ddp.step == 16
    assert b.losses == a.losses and b.norms == a.norms and mb == ma
    assert all(torch.equal(v, _weights(acc)[k]) for k, v in _weights(ddp).items())
    assert mb["val/accuracy"] > 0.5  # chance: 1/3


def test_checkpoints_move_between_accelerate_and_ddp(tmp_path):
    """The same full state as ddp: an accelerate run stopped after its step-8 checkpoint ends under ddp
    exactly where an uninterrupted accelerate run does."""
    straight = make_trainer("accelerate", dropout=0.2)  # dropout on: the RNG state travels too
    straight.fit()

    class StopAt(Callback):
        def on_step_end(self, trainer, loss: float) -> None:
            if trainer.step == 10:
                raise KeyboardInterrupt

    first = make_trainer(
        "accelerate", checkpoint_dir=tmp_path, callbacks=(StopAt(),), dropout=0.2, checkpoint_every=8
    )
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    resumed = make_trainer("ddp", checkpoint_dir=tmp_path, dropout=0.2, checkpoint_every=8)
    resumed.fit(resume=True)
    assert resumed.step == straight.step == 16
    assert all(torch.equal(v, _weights(resumed)[k]) for k, v in _weights(straight).items())


def test_mixed_precision_and_the_plain_module_after_training():
    """bf16 is Accelerate's autocast around the forward; `finish` hands back the module without it."""
    trainer = make_trainer("accelerate", dtype=torch.float32, precision="bf16", max_epochs=0.25)
    assert trainer.strategy.accelerator.mixed_precision == "bf16"
    trainer.fit()
    assert "_original_forward" not in vars(trainer.raw_model)  # Accelerate's autocast wrapper removed
    assert torch.isfinite(next(trainer.raw_model.parameters())).all()


def test_one_process_with_a_stray_local_rank(monkeypatch):
    """A LOCAL_RANK without a launcher (DeepSpeed's one-process group leaves one behind; so may a shell) must
    not make Accelerate try to join a group that does not exist."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    trainer = make_trainer("accelerate", max_epochs=0.25)
    trainer.fit()
    assert trainer.strategy.accelerator.num_processes == 1 and os.environ["LOCAL_RANK"] == "0"


def test_impossible_combinations_are_config_errors(monkeypatch):
    model = build_mlp(MLPConfig(in_features=4, hidden=4, depth=1, num_classes=2))
    cfg = TrainConfig(strategy="accelerate")
    check_config(cfg, model, DistEnv(), "fp32")
    manual = build_mlp(MLPConfig(in_features=4, hidden=4, depth=1, num_classes=2, impl="manual"))
    with pytest.raises(ConfigError, match="autograd"):
        check_config(cfg, manual, DistEnv(), "fp32")
    with pytest.raises(ConfigError, match="DeepSpeed feature"):
        check_config(TrainConfig(strategy="accelerate", offload="optimizer"), model, DistEnv(), "fp32")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="fp16 needs a GPU"):
            check_config(cfg, model, DistEnv(), "fp16")
    with monkeypatch.context() as m:  # `accelerate launch --use_fsdp`: sharding is train.strategy=fsdp2
        m.setenv("ACCELERATE_USE_FSDP", "true")
        with pytest.raises(ConfigError, match="train.strategy=fsdp2"):
            check_config(cfg, model, DistEnv(), "fp32")
    with monkeypatch.context() as m:  # `accelerate launch --cpu --num_processes 2`: one process started
        m.setenv("ACCELERATE_USE_CPU", "True")
        m.setenv("MASTER_ADDR", "127.0.0.1")
        with pytest.raises(LaunchError, match="starts ONE process"):
            check_config(cfg, model, DistEnv(), "fp32")
    with monkeypatch.context() as m:  # the launcher started 2, this process sees itself alone
        m.setenv("WORLD_SIZE", "2")
        with pytest.raises(LaunchError, match="unsynchronised"):
            check_config(cfg, model, DistEnv(), "fp32")


# ------------------------------------------------------------------------------------------- 2 processes
def _worker(out: str) -> None:
    """Under torchrun: the accelerate run on this process's half of each global batch; rank 0 saves."""
    from llmlab.train.distributed import init_distributed, shutdown

    torch.set_num_threads(1)
    env = init_distributed(torch.device("cpu"))
    trainer = make_trainer("accelerate", env=env)
    trainer.fit()
    assert trainer.strategy.accelerator.num_processes == 2
    if env.is_main:
        torch.save(_weights(trainer), out)
    shutdown(env)


@pytest.mark.slow
def test_two_processes_under_torchrun_follow_one(tmp_path):
    one = make_trainer("ddp")
    one.fit()
    out = tmp_path / "two.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*cmd, __file__, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = torch.load(out)
    for k, v in _weights(one).items():  # float64: the all-reduce's order of sums only
        torch.testing.assert_close(two[k], v, rtol=0, atol=1e-10)


if __name__ == "__main__":
    _worker(sys.argv[1])
