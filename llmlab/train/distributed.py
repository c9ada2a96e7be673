"""Process groups for data parallelism, as launched by torchrun (or accelerate/deepspeed launchers).

llmlab never starts processes itself: a launcher sets RANK / WORLD_SIZE / LOCAL_RANK and we join the group
(gloo on CPU, NCCL on CUDA). The group is passed around explicitly in a `DistEnv`, never read from a global.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


class DeviceError(RuntimeError):
    """The requested device is not available."""


@dataclass(frozen=True)
class DistEnv:
    """The processes as the Trainer sees them: `rank` / `world_size` among the data-parallel replicas, which
    are all processes unless a model is split over some of them (tensor parallelism,
    llmlab/parallel/layout.py): then `group` is this process's data-parallel group, `global_rank` its rank
    among all `processes`, and only global rank 0 writes files."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    group: Any = None  # the data-parallel process group; None: all processes
    global_rank: int | None = None  # None: the same as rank
    processes: int | None = None  # None: the same as world_size

    @property
    def is_main(self) -> bool:
        return (self.rank if self.global_rank is None else self.global_rank) == 0

    @property
    def enabled(self) -> bool:
        """Several data-parallel replicas (their gradients and statistics are all-reduced)."""
        return self.world_size > 1

    @property
    def multi_process(self) -> bool:
        """Several processes at all (they must agree on when to stop)."""
        return (self.world_size if self.processes is None else self.processes) > 1


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """'auto' → the local CUDA device when there is one, else CPU. 'cuda' without a GPU is an error."""
    if preference not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"unknown device {preference!r}: use auto, cpu or cuda")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(
            "--device cuda was asked for, but torch sees no CUDA device (torch.cuda.is_available())"
        )
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device: torch.device) -> DistEnv:
    """Join the process group a launcher describes in the environment; single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistEnv()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)


def local_rank_from_env() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def all_reduce_sum_(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """In place: the sum over all processes (no-op in a single process)."""
    if env.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=env.group)
    return tensor


def average_gradients_(params: list[torch.nn.Parameter], env: DistEnv) -> None:
    """Average .grad across processes in one flat all-reduce: what DDP does for autograd models, done by hand
    for models that compute their own gradients."""
    if not env.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=env.group)
    flat /= env.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def barrier(env: DistEnv) -> None:
    """Every process (not only the data-parallel group) waits for the others."""
    if env.multi_process:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    if env.multi_process and dist.is_initialized():
        dist.destroy_process_group()
