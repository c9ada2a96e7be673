"""How the one Trainer loop spreads a model over processes: a small strategy interface.

The Trainer's step is always: forward and backward of each micro-batch (under `no_sync` except the last),
`after_backward`, clip, `step`, `zero_grad`; checkpoints take `model_state_dict` / `optimizer_state_dict`.
A strategy decides what those mean:

- `ddp` — one process: plain autograd. N processes: `DistributedDataParallel` (gradients all-reduced in
  buckets during backward), or, for a model that computes its own gradients (stage 1's hand-derived MLP), one
  flat all-reduce after backward.
- `fsdp2` — PyTorch's FSDP2 (llmlab/train/strategy_fsdp.py); `deepspeed` — DeepSpeed's engine at ZeRO stage
  `train.ds_stage` with `train.offload` (llmlab/train/strategy_deepspeed.py). Both checkpoint the same full
  state as the others.
- `zero1` / `zero2` / `zero3` — llmlab.parallel.zero, written from scratch: optimizer states, then gradients,
  then parameters sharded over the processes. Checkpoints hold the *full* weights and the *full* optimizer
  state (gathered, in torch's own state_dict layout), so a ZeRO run resumes under any number of processes or
  under `ddp`, and `ddp` checkpoints resume under ZeRO.
- `accelerate` — Hugging Face Accelerate's engine (`prepare`, `backward`, `no_sync`, `clip_grad_norm_`):
  DDP underneath, the same full state as `ddp` (llmlab/train/strategy_accelerate.py).

Reference points: PyTorch's DDP notes; DeepSpeed's engine (`backward`, `step`, `save_checkpoint`), of which
this is the minimal shape; FSDP2 and DeepSpeed themselves come in as further strategies.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from llmlab.config import ConfigError
from llmlab.train.distributed import DistEnv, average_gradients_
from llmlab.train.strategy_base import (  # noqa: F401 — re-exported: the interface lives below
    Strategy,
    ensure_process_group,
    fill_skeleton,
    meta_skeleton,
    tensor_bytes,
)

STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp2", "deepspeed", "accelerate")


def check_config(cfg: Any, model: nn.Module, env: DistEnv, precision: str) -> None:
    """The switches of a TrainConfig that this model and launch cannot honour, as a ConfigError: the runner
    calls this before it writes anything, the Trainer again for library users."""
    manual = bool(getattr(model, "computes_own_gradients", False))
    if manual and precision != "fp32":
        raise ConfigError(
            f"{type(model).__name__} computes its own gradients in fp32; set train.precision=fp32"
        )
    if cfg.activation_checkpointing and not hasattr(model, "set_activation_checkpointing"):
        raise ConfigError(
            f"train.activation_checkpointing: {type(model).__name__} has no per-block checkpointing "
            "(the GPT models have)"
        )
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"unknown train.strategy {cfg.strategy!r}: one of {', '.join(STRATEGIES)}")
    if cfg.offload != "none" and cfg.strategy != "deepspeed":
        raise ConfigError(f"train.offload={cfg.offload} is a DeepSpeed feature: set train.strategy=deepspeed")
    if getattr(model, "parallel_layout", None) is not None and cfg.strategy != "ddp":
        raise ConfigError(
            f"train.strategy={cfg.strategy} with a tensor-parallel model: TP × DP uses train.strategy=ddp "
            "(gradients averaged over the data-parallel group); ZeRO / FSDP / DeepSpeed on top of TP are not "
            "supported"
        )
    if cfg.strategy == "accelerate":
        from llmlab.train.strategy_accelerate import check_accelerate

        check_accelerate(cfg, manual, env, precision)
        return
    if cfg.strategy in ("fsdp2", "deepspeed"):
        _check_engine(cfg, model, manual, precision)
        return
    if not cfg.strategy.startswith("zero"):
        return
    stage = int(cfg.strategy[-1])
    if not env.enabled:
        raise ConfigError(
            f"train.strategy={cfg.strategy} shards over processes: launch with torchrun "
            "(--nproc_per_node N, N >= 2), or use train.strategy=ddp on one process"
        )
    if manual:
        raise ConfigError(
            f"train.strategy={cfg.strategy} needs an autograd model (this one computes its own gradients)"
        )
    if precision == "fp16":
        raise ConfigError(f"train.strategy={cfg.strategy} with train.precision=fp16: use bf16 or fp32")
    if cfg.compile:
        raise ConfigError(f"train.strategy={cfg.strategy} with train.compile is not supported")
    if stage == 3 and not hasattr(model, "shard_units"):
        raise ConfigError(
            f"train.strategy=zero3: {type(model).__name__} does not name the blocks to gather one at a time "
            "(a `shard_units()` method; the GPT models have it)"
        )


def _check_engine(cfg: Any, model: nn.Module, manual: bool, precision: str) -> None:
    """FSDP2 and DeepSpeed run on one process too (a group of one), so no launcher is required."""
    name = cfg.strategy
    if manual:
        raise ConfigError(f"train.strategy={name} needs an autograd model (this one computes its own grads)")
    if precision == "fp16":
        raise ConfigError(f"train.strategy={name} with train.precision=fp16: use bf16 or fp32")
    if cfg.compile:
        raise ConfigError(f"train.strategy={name} with train.compile is not supported")
    if name == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError as err:
            raise ConfigError(
                "train.strategy=deepspeed needs the deepspeed package: pip install deepspeed"
            ) from err
        if cfg.offload == "optimizer" and cfg.ds_stage == 0:
            raise ConfigError("train.offload=optimizer needs train.ds_stage >= 1 (DeepSpeed's ZeRO-Offload)")
        if cfg.offload == "all" and cfg.ds_stage != 3:
            raise ConfigError("train.offload=all (parameters too) needs train.ds_stage=3")


class DataParallelStrategy(Strategy):
    name = "ddp"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv, device: torch.device,
                 manual: bool) -> None:  # fmt: skip
        self.raw_model, self.optimizer, self.env, self.manual = model, optimizer, env, manual
        self.model: nn.Module = model
        if env.enabled and not manual:
            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=ids)
        self._ddp = self.model if isinstance(self.model, DistributedDataParallel) else None

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        return self._ddp.no_sync() if self._ddp is not None and not last else contextlib.nullcontext()

    def after_backward(self) -> None:
        if self.manual:
            average_gradients_(list(self.raw_model.parameters()), self.env)


class ZeroStrategy(Strategy):
    """ZeRO stage 1, 2 or 3 (llmlab.parallel.zero) with the recipe's optimizer class and parameter groups."""

    def __init__(self, stage: int, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> None:
        from llmlab.parallel.zero import ZeRO

        units = list(model.shard_units()) if stage == 3 else []
        self.name = f"zero{stage}"
        self.raw_model = self.model = model
        self._param_order = [p for g in optimizer.param_groups for p in g["params"]]
        groups = [{**g, "params": list(g["params"])} for g in optimizer.param_groups]
        for g in groups:
            g.pop(
                "initial_lr", None
            )  # set by LR schedulers on the outer optimizer; the Trainer builds its own
        # Every group already carries all of the optimizer's options; lr is passed for the constructor.
        lr = optimizer.defaults.get("lr", 1e-3)
        self.zero = ZeRO(model, stage, groups, type(optimizer), units=units, lr=lr)
        self.optimizer = self.zero.optimizer  # the LR schedule drives the inner optimizer over the chunks

    # no_sync: stage 1 reduces at the step; 2 and 3 reduce-scatter per micro-batch (the base class's no-op)

    def step(self, scaler: torch.amp.GradScaler, max_norm: float | None) -> float | None:
        if scaler.is_enabled():
            raise ValueError("train.precision=fp16 with ZeRO is not supported: use bf16 or fp32")
        norm, synced = None, False
        if max_norm is not None:
            if self.zero.stage == 1:
                self.zero.sync_grads()
                synced = True
            norm = self.zero.clip_grad_norm_(max_norm)
        self.zero.step(skip_grad_sync=synced)
        return norm

    def zero_grad(self) -> None:
        self.zero.zero_grad()

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The full weights, under the model's state_dict names (buffers included); every rank takes part."""
        full = self.zero.full_state_dict()
        return {name: full.get(name, value) for name, value in self.raw_model.state_dict().items()}

    def optimizer_state_dict(self) -> dict[str, Any]:
        return self.zero.full_optimizer_state_dict()

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.zero.load_full_state_dict(state)

    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None:
        self.zero.load_full_optimizer_state_dict(state)

    def state_bytes(self) -> dict[str, int]:
        return dataclasses.asdict(self.zero.state_bytes())

    def finish(self) -> nn.Module:
        self.zero.unshard()
        return self.raw_model


def make_strategy(cfg: Any, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv,
                  device: torch.device, manual: bool, precision: str = "fp32") -> Strategy:  # fmt: skip
    """The strategy `cfg.strategy` names (a TrainConfig; a bare name is accepted for the plain ones)."""
    name = cfg if isinstance(cfg, str) else cfg.strategy
    if name == "ddp" and getattr(model, "parallel_layout", None) is not None:
        from llmlab.train.strategy_tp import TensorParallelStrategy

        return TensorParallelStrategy(model, optimizer, env, device, precision)
    if name == "ddp":
        return DataParallelStrategy(model, optimizer, env, device, manual)
    if manual:
        raise ValueError(f"train.strategy={name} needs an autograd model (this one computes its own grads)")
    if name in ("zero1", "zero2", "zero3"):
        return ZeroStrategy(int(name[-1]), model, optimizer, env)
    if name == "fsdp2":
        from llmlab.train.strategy_fsdp import FSDP2Strategy

        return FSDP2Strategy(model, optimizer, env, device)
    if name == "deepspeed":
        from llmlab.train.strategy_deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(model, optimizer, env, device, cfg, precision)
    if name == "accelerate":
        from llmlab.train.strategy_accelerate import AccelerateStrategy

        return AccelerateStrategy(model, optimizer, env, device, precision)
    raise ValueError(f"unknown train.strategy {name!r}: one of {', '.join(STRATEGIES)}")
