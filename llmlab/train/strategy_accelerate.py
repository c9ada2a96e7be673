"""Hugging Face Accelerate as a training strategy: its data-parallel engine inside the one Trainer loop.

Accelerate usually comes with a loop written around it (`prepare`, `accumulate`, `backward`,
`clip_grad_norm_`, `optimizer.step()`); here it owns those calls and the Trainer owns the loop, as with
DeepSpeed (llmlab/train/strategy_deepspeed.py):

- wrap: `accelerator.prepare(model, optimizer)`: DistributedDataParallel under a launcher (torchrun, or
  `accelerate launch --multi_gpu`), the module itself on one process; autocast for `train.precision` (fp32 →
  Accelerate's "no", bf16, fp16). Our TrainConfig decides: a launcher's `--mixed_precision` or
  `--dynamo_backend` does not override it (compiling is `train.compile`). The data loaders and the LR schedule
  stay the Trainer's (seeded global batches that resume exactly; the schedule steps once per optimizer step),
  so they are not prepared.
- gradient accumulation: the Trainer splits each global batch into micro-batches and weights each loss by its
  share of the batch, so the Accelerator has `gradient_accumulation_steps=1` (its `backward` divides by that
  number) and the micro-batches before the last run under `accelerator.no_sync(model)`: what
  `accelerator.accumulate(model)` does on those steps, and gradients are exchanged once per optimizer step.
- backward: `accelerator.backward`; step: `accelerator.clip_grad_norm_` (it unscales fp16 gradients first),
  then the prepared optimizer's step.
- fp16: one GradScaler, the Trainer's (which checkpoints it and updates it once per step); Accelerate scales
  and unscales with it instead of a scaler of its own.
- state: `accelerator.get_state_dict(model)` / `unwrap_model`: the same full weights and torch optimizer
  state as `ddp`, so checkpoints move between this and every other strategy.

Launch traps turned into errors (LaunchError, a ConfigError, before anything is written): `accelerate launch
--cpu --num_processes N` starts ONE process (accelerate's simple launcher); an Accelerator that does not see
the launcher's processes (a CPU-only machine without `cpu=True`) trains unsynchronised copies; and `accelerate
launch --use_fsdp / --use_deepspeed` (sharding is train.strategy=fsdp2 / deepspeed here).

Reference: the Hugging Face Accelerate docs: the `Accelerator` API (prepare, backward, no_sync,
clip_grad_norm_, get_state_dict, unwrap_model), "Gradient accumulation", "Launching your distributed code".
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from llmlab.config import ConfigError
from llmlab.train.distributed import DistEnv
from llmlab.train.strategy_base import Strategy

# train.precision (resolved) -> Accelerate's mixed_precision
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
LAUNCH_HINT = (
    "On CPU, launch with `torchrun --nproc_per_node N -m llmlab run ...` (or `accelerate launch --multi_gpu "
    "--num_processes N -m llmlab run ... --device cpu`)."
)


class LaunchError(ConfigError):
    """The processes Accelerate sees are not the ones the launcher started."""


def check_world_size(num_processes: int, env: Mapping[str, str]) -> None:
    """Raise LaunchError unless `num_processes` (what Accelerate, or our DistEnv, sees) are the processes the
    launcher started (`env`: the environment)."""
    launched = int(env.get("WORLD_SIZE", "1"))
    if num_processes != launched:
        raise LaunchError(
            f"Accelerate sees {num_processes} process(es) but the launcher started WORLD_SIZE={launched}: "
            f"the processes would train unsynchronised copies. {LAUNCH_HINT}"
        )
    if launched == 1 and env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in env:
        raise LaunchError(
            "`accelerate launch --cpu --num_processes N` starts ONE process on a CPU machine (accelerate's "
            "simple launcher), not N. Launch with `torchrun --nproc_per_node N -m llmlab run ...` (or "
            "`accelerate launch --multi_gpu --num_processes N -m llmlab run ... --device cpu`)."
        )


def check_accelerate(cfg: Any, manual: bool, env: DistEnv, precision: str) -> None:
    """The switches train.strategy=accelerate cannot honour (called by strategy.check_config)."""
    if manual:
        raise ConfigError(
            "train.strategy=accelerate needs an autograd model (this one computes its own gradients)"
        )
    try:
        import accelerate  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            "train.strategy=accelerate needs the accelerate package: pip install accelerate"
        ) from err
    for var, other in (("ACCELERATE_USE_FSDP", "fsdp2"), ("ACCELERATE_USE_DEEPSPEED", "deepspeed")):
        if os.environ.get(var, "").lower() == "true":
            raise ConfigError(
                f"the launcher set {var}=true, but train.strategy=accelerate is Accelerate's data-parallel "
                f"engine: for sharded training set train.strategy={other} (same checkpoints) and launch with "
                "torchrun or `accelerate launch --multi_gpu`"
            )
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            "train.strategy=accelerate with train.precision=fp16 needs a GPU (Accelerate's fp16 is CUDA "
            "autocast with a GradScaler): use bf16 or fp32"
        )
    check_world_size(env.world_size, os.environ)


@contextlib.contextmanager
def _without(name: str, hide: bool):
    """`os.environ` without `name` inside the block (when `hide`), as it was after."""
    saved = os.environ.pop(name, None) if hide else None
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


def new_accelerator(device: torch.device, precision: str, alone: bool) -> Any:
    """A fresh Accelerator (Accelerate's state is a per-process singleton: what an earlier run in this process
    left is dropped) for the Trainer's loop: no device placement, no loss division, our precision. `alone`
    (one process, no group): a LOCAL_RANK in the environment (DeepSpeed sets one; a shell may) would make
    Accelerate try to join a group through env:// that no launcher set up, so it does not see that one."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        with _without("LOCAL_RANK", hide=alone and not torch.distributed.is_initialized()):
            return Accelerator(
                cpu=device.type == "cpu",  # without it, processes on a CPU-only machine form no group
                mixed_precision=MIXED_PRECISION[precision],
                gradient_accumulation_steps=1,  # the Trainer has already weighted each micro-batch's loss
                device_placement=False,  # the Trainer has placed the model (and its batches)
                dynamo_backend="no",  # compiling is train.compile
            )
    except ValueError as err:  # e.g. fp16 on a CPU
        raise ConfigError(f"train.strategy=accelerate: {err}") from err


class AccelerateStrategy(Strategy):
    name = "accelerate"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv, device: torch.device,
                 precision: str) -> None:  # fmt: skip
        self.accelerator = new_accelerator(device, precision, alone=not env.enabled)
        seen = self.accelerator.num_processes
        check_world_size(seen, os.environ)
        if seen != env.world_size:
            raise LaunchError(
                f"Accelerate sees {seen} process(es), the Trainer's process group {env.world_size}. "
                + LAUNCH_HINT
            )
        self.raw_model = model
        self.model, self._prepared = self.accelerator.prepare(model, optimizer)
        self.optimizer = optimizer  # the torch optimizer inside: the LR schedule drives its parameter groups
        # One GradScaler (fp16): the Trainer's, handed to Accelerate at the first backward; the prepared
        # optimizer's own step must then not step and update a second one.
        self.accelerator.scaler = None
        self._prepared.scaler = None

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)

    def backward(self, loss: torch.Tensor, scaler: torch.amp.GradScaler) -> None:
        if scaler.is_enabled():
            self.accelerator.scaler = scaler  # Accelerate scales the loss (and later unscales) with it
        self.accelerator.backward(loss)  # gradient_accumulation_steps=1: the loss as the Trainer weighted it

    def step(self, scaler: torch.amp.GradScaler, max_norm: float | None) -> float | None:
        norm = None
        if max_norm is not None:
            norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm))
        if scaler.is_enabled():
            scaler.step(self._prepared)  # skipped on inf/NaN gradients; the Trainer updates the scale
        else:
            self._prepared.step()
        return norm

    def zero_grad(self) -> None:
        self._prepared.zero_grad(set_to_none=True)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return self.accelerator.get_state_dict(self.model)

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.accelerator.unwrap_model(self.model).load_state_dict(state)

    def optimizer_state_dict(self) -> dict[str, Any]:
        return self._prepared.state_dict()

    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None:
        self._prepared.load_state_dict(state)

    def finish(self) -> nn.Module:
        """The plain module, its forward without Accelerate's autocast wrapper (for saving and serving)."""
        self.raw_model = self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        return self.raw_model
