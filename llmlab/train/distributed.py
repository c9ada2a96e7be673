"""Process groups for data parallelism, as launched by torchrun (or accelerate/deepspeed launchers).

llmlab never starts processes itself: a launcher sets RANK / WORLD_SIZE / LOCAL_RANK and we join the group
(gloo on CPU, NCCL on CUDA). The group is passed around explicitly in a `DistEnv`, never read from a global.

Every group gets the run's timeout (`train.dist_timeout_s`): how long a collective waits for the other
processes before it fails. A collective that fails (a peer died: gloo sees the connection reset at once) or
times out (a peer hangs) is recognised by `is_process_group_failure` and turned into `ProcessGroupError`,
one paragraph naming what happened and how to resume (llmlab/runner.py), instead of a backend traceback.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


class DeviceError(RuntimeError):
    """The requested device is not available."""


class ProcessGroupError(RuntimeError):
    """A collective failed or timed out: another process of the run died or hangs. The message says how to
    resume; the run's last checkpoint is intact (checkpoints are written by one process, atomically)."""


DEFAULT_TIMEOUT_S = 600.0  # train.dist_timeout_s's default, and the group's when a run does not say

# What the backends' errors say when the other side is gone or silent (torch 2.x; gloo raises a plain
# RuntimeError, newer paths raise torch.distributed.DistError subclasses).
_FAILURE_MARKERS = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Connection refused",
    "Broken pipe",
    "Timed out",
    "timed out",
    "Socket Timeout",
    "gloo",
    "NCCL",
    "ProcessGroup",
    "c10d",
)


def is_process_group_failure(err: BaseException) -> bool:
    """Did this exception come from a collective whose peers are gone or silent?"""
    if isinstance(err, ProcessGroupError):
        return True
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in _FAILURE_MARKERS)


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
    timeout_s: float = DEFAULT_TIMEOUT_S  # every group's collective timeout

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


def init_distributed(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Join the process group a launcher describes in the environment; single process otherwise.
    `timeout_s` bounds every collective (and the rendezvous): a silent peer fails the run after it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistEnv(timeout_s=timeout_s)
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ProcessGroupError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: start every process with a launcher "
            "(torchrun, accelerate launch, deepspeed) or set RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT "
            "by hand as the launcher would"
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(backend=backend, timeout=timeout)
        except Exception as err:
            if not is_process_group_failure(err):
                raise
            raise ProcessGroupError(
                f"rank {rank} of {world_size} could not join the process group at "
                f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout_s:g} s "
                f"({_first_line(err)}): are all {world_size} processes started, with the same MASTER_ADDR / "
                "MASTER_PORT, and is the port reachable? Nothing was written."
            ) from err
    else:
        dist.set_timeout(timeout)
    return DistEnv(
        rank=rank, world_size=world_size, local_rank=local_rank, backend=backend, timeout_s=timeout_s
    )


def set_group_timeouts(groups: list[Any], env: DistEnv) -> None:
    """Give groups made after init (a device mesh's rows and columns) the run's timeout: torch's new_group
    takes the backend's default (30 min for gloo), not the world group's."""
    for group in groups:
        dist.set_timeout(timedelta(seconds=env.timeout_s), group)


def _first_line(err: BaseException) -> str:
    """The backend's message without its source path, up to its first sentence: 'Read error
    [127.0.0.1]:50353: Connection reset by peer'."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*", "", text)  # [/…/gloo/…/pair.cc:545]
    text = text.split(". ")[0].rstrip(".")
    return text if len(text) <= 240 else text[:237] + "..."


def describe_failure(err: BaseException, env: DistEnv) -> str:
    """What happened, in words: a dead peer or a silent one (timeout), with the backend's own first line."""
    text = str(err)
    rank = env.rank if env.global_rank is None else env.global_rank
    processes = env.world_size if env.processes is None else env.processes
    if "imed out" in text or "Timeout" in text:
        what = (
            f"a collective on rank {rank} of {processes} waited train.dist_timeout_s = {env.timeout_s:g} s "
            "for another process and got no answer (it hangs, is stopped, or is far slower)"
        )
    else:
        what = (
            f"a collective on rank {rank} of {processes} failed because another process of the run is gone "
            "(killed, out of memory, crashed, or its machine was lost)"
        )
    return f"{what}; the backend said: {_first_line(err)}"


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
