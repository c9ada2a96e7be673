"""How N processes split into tensor-parallel × data-parallel groups (Megatron-LM §3; Narayanan et al. 2021,
"Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", §3).

The N = dp · tp processes form a [dp, tp] device mesh (torch's `init_device_mesh`): the tp ranks of a row
hold the parts of one model and read the same batch; the dp rows are replicas, each with its own share of the
global batch, whose gradients are averaged over the column (the data-parallel group) only. Consecutive ranks
form a tensor-parallel group, so on a multi-GPU node the chatty TP all-reduces (4 per layer per step) stay on
NVLink and only the DP all-reduce (once per step) crosses nodes.

`check_tp_layout` refuses a layout that cannot be built — before any process group exists (exit 2), naming
the quantity that does not divide and what would: TP must divide the number of processes, the heads, the
MLP's 4·h and the vocabulary padding (so that the padded vocabulary splits evenly whatever the tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llmlab.config import ConfigError
from llmlab.parallel.collectives import CommMeter, TPGroup
from llmlab.train.distributed import DistEnv, set_group_timeouts

__all__ = ["ParallelLayout", "build_layout", "check_tp_layout"]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_tp_layout(tp: int, world_size: int, n_head: int, n_embd: int, pad_vocab_multiple: int) -> None:
    """A ConfigError naming each quantity `tp` does not divide, and the TP sizes that would fit."""
    if tp < 1:
        raise ConfigError(f"parallel.tp={tp}: must be >= 1")
    if pad_vocab_multiple < 1:
        raise ConfigError(f"parallel.pad_vocab_multiple={pad_vocab_multiple}: must be >= 1")
    problems = []
    for what, n in (
        (f"the number of processes ({world_size}; launch with torchrun --nproc_per_node)", world_size),
        (f"model.n_head={n_head}", n_head),
        (f"the MLP width 4·model.n_embd={4 * n_embd}", 4 * n_embd),
        (f"parallel.pad_vocab_multiple={pad_vocab_multiple} (the vocabulary is padded to a multiple of it)",
         pad_vocab_multiple),
    ):  # fmt: skip
        if n % tp:
            problems.append(what)
    if problems:
        fit = [d for d in _divisors(world_size) if n_head % d == 0 and (4 * n_embd) % d == 0]
        fit = [d for d in fit if pad_vocab_multiple % d == 0]
        raise ConfigError(
            f"parallel.tp={tp} does not divide {'; nor '.join(problems)}. TP sizes that fit this model and "
            f"{world_size} process(es): {', '.join(map(str, fit))}"
            + ("" if pad_vocab_multiple % tp == 0 else f"; or set parallel.pad_vocab_multiple={128 * tp}")
        )


@dataclass
class ParallelLayout:
    """The groups of one process: `tp` (its model-parallel group), `dp` (its data-parallel group: the
    processes holding the same part of the model), the torch DeviceMesh when there is one, and the meter
    both groups' collectives report to."""

    tp: TPGroup
    dp: TPGroup
    mesh: Any = None
    meter: CommMeter | None = None

    def data_env(self, env: DistEnv) -> DistEnv:
        """What the Trainer and the data loaders see: the data-parallel replicas (rank and size within the
        data-parallel group), while writing files stays with global rank 0."""
        return DistEnv(
            rank=self.dp.rank,
            world_size=self.dp.size,
            local_rank=env.local_rank,
            backend=env.backend,
            group=self.dp.group,
            global_rank=env.rank,
            processes=env.world_size,
            timeout_s=env.timeout_s,
        )


def build_layout(env: DistEnv, tp: int, device: torch.device, meter: CommMeter | None = None,
                 need_mesh: bool = False) -> ParallelLayout:  # fmt: skip
    """The [dp, tp] mesh over the processes `env` describes (call `check_tp_layout` first). A single process
    needs no process group unless `need_mesh` (DTensor wants a mesh even for one process)."""
    if env.world_size % tp:
        raise ConfigError(f"parallel.tp={tp} does not divide the number of processes ({env.world_size})")
    dp = env.world_size // tp
    if env.world_size == 1 and not need_mesh:
        return ParallelLayout(TPGroup(meter=meter), TPGroup(meter=meter), None, meter)
    from torch.distributed.device_mesh import init_device_mesh

    if env.world_size == 1:
        from llmlab.train.strategy_base import ensure_process_group

        ensure_process_group(device)
    mesh = init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"))
    set_group_timeouts([mesh.get_group("tp"), mesh.get_group("dp")], env)
    tp_group = TPGroup(mesh.get_group("tp"), mesh.get_local_rank("tp"), tp, meter)
    dp_group = TPGroup(mesh.get_group("dp"), mesh.get_local_rank("dp"), dp, meter)
    return ParallelLayout(tp_group, dp_group, mesh, meter)
