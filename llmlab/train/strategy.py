"""How the one Trainer loop spreads a model over processes: a small strategy interface.

The Trainer's step is always: forward and backward of each micro-batch (under `no_sync` except the last),
`after_backward`, clip, `step`, `zero_grad`; checkpoints take `model_state_dict` / `optimizer_state_dict`.
A strategy decides what those mean:

- `ddp` — one process: plain autograd. N processes: `DistributedDataParallel` (gradients all-reduced in
  buckets during backward), or, for a model that computes its own gradients (stage 1's hand-derived MLP), one
  flat all-reduce after backward.
- `zero1` / `zero2` / `zero3` — llmlab.parallel.zero, written from scratch: optimizer states, then gradients,
  then parameters sharded over the processes. Checkpoints hold the *full* weights and the *full* optimizer
  state (gathered, in torch's own state_dict layout), so a ZeRO run resumes under any number of processes or
  under `ddp`, and `ddp` checkpoints resume under ZeRO.

Reference points: PyTorch's DDP notes; DeepSpeed's engine (`backward`, `step`, `save_checkpoint`), of which
this is the minimal shape; FSDP2 and DeepSpeed themselves come in as further strategies.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from llmlab.config import ConfigError
from llmlab.train.distributed import DistEnv, average_gradients_

STRATEGIES = ("ddp", "zero1", "zero2", "zero3")


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
    if stage == 3 and cfg.activation_checkpointing:
        raise ConfigError("train.strategy=zero3 with train.activation_checkpointing is not supported yet")


class DataParallelStrategy:
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

    def clip_grad_norm(self, max_norm: float) -> float:
        return nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm).item()

    def step(self, scaler: torch.amp.GradScaler) -> None:
        scaler.step(self.optimizer)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return self.raw_model.state_dict()

    def optimizer_state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.raw_model.load_state_dict(state)

    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def finish(self) -> None:
        """After training: the raw model is whole and usable on one process."""


class ZeroStrategy:
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

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # stage 1 reduces at the step; 2 and 3 reduce-scatter per micro-batch

    def after_backward(self) -> None:
        pass

    def clip_grad_norm(self, max_norm: float) -> float:
        if self.zero.stage == 1:
            self.zero.sync_grads()
            self._synced = True
        return self.zero.clip_grad_norm_(max_norm)

    def step(self, scaler: torch.amp.GradScaler) -> None:
        if scaler.is_enabled():
            raise ValueError("train.precision=fp16 with ZeRO is not supported: use bf16 or fp32")
        self.zero.step(skip_grad_sync=getattr(self, "_synced", False))
        self._synced = False

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

    def finish(self) -> None:
        self.zero.unshard()


def make_strategy(name: str, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv,
                  device: torch.device, manual: bool) -> DataParallelStrategy | ZeroStrategy:  # fmt: skip
    if name == "ddp":
        return DataParallelStrategy(model, optimizer, env, device, manual)
    if name in ("zero1", "zero2", "zero3"):
        if manual:
            raise ValueError(
                f"train.strategy={name} needs an autograd model (this one computes its own gradients)"
            )
        return ZeroStrategy(int(name[-1]), model, optimizer, env)
    raise ValueError(f"unknown train.strategy {name!r}: one of {', '.join(STRATEGIES)}")
