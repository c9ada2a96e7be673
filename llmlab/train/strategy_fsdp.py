"""PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`) as a training strategy: ZeRO-3 the PyTorch-native way.

`fully_shard` is applied to each unit the model names (`shard_units()`: the transformer blocks) and then to
the root (embeddings, final norm, head). Every parameter becomes a DTensor sharded on dim 0 over the
processes; before a unit's forward (and again in backward) its parameters are all-gathered, after it they
are freed, and gradients are reduce-scattered (averaged) so each process keeps the gradient of its shard.
The optimizer is rebuilt over the sharded parameters with the recipe's class and groups (matched by name).
Gradient accumulation: `set_requires_gradient_sync(False)` for all but the last micro-batch keeps unsharded
gradients locally and reduce-scatters their sum once.

Checkpoints stay the project's one format: the full weights and the full optimizer state in torch's own
layout (each DTensor gathered with `full_tensor()`), so an FSDP2 run resumes under ddp, our ZeRO, DeepSpeed,
or FSDP2 on another number of processes. After training `finish()` returns a plain, whole copy of the model
(the sharded module cannot run a forward on one process alone).

Reference points: the FSDP2 tutorial (pytorch.org/tutorials/intermediate/FSDP_tutorial) and torchtitan's
`apply_fsdp`; the ZeRO paper (Rajbhandari et al. 2020) for what stage 3 means.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmlab.train.distributed import DistEnv, set_group_timeouts
from llmlab.train.strategy_base import (
    Strategy,
    ensure_process_group,
    fill_skeleton,
    meta_skeleton,
    tensor_bytes,
)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every process (a collective for a DTensor: call in the same order everywhere)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class FSDP2Strategy(Strategy):
    name = "fsdp2"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv,
                 device: torch.device) -> None:  # fmt: skip
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        names = {id(p): n for n, p in model.named_parameters()}
        order = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        self._skeleton = meta_skeleton(model)
        self.device = device
        self._own_group = ensure_process_group(device)
        self.mesh = init_device_mesh(device.type, (env.world_size,))
        if env.multi_process:
            set_group_timeouts([self.mesh.get_group()], env)
        units = list(model.shard_units()) if hasattr(model, "shard_units") else []
        for unit in units:
            fully_shard(unit, mesh=self.mesh)
        fully_shard(model, mesh=self.mesh)
        self.raw_model = self.model = model
        params = dict(model.named_parameters())  # the same names, now DTensor parameters
        groups = []
        for g, group_names in zip(optimizer.param_groups, order, strict=True):
            options = {k: v for k, v in g.items() if k not in ("params", "initial_lr")}
            groups.append({**options, "params": [params[n] for n in group_names]})
        self.param_order = [p for g in groups for p in g["params"]]
        self.optimizer = type(optimizer)(groups, lr=optimizer.defaults.get("lr", 1e-3))

    def no_sync(self, last: bool):  # noqa: ANN201 - a context manager
        import contextlib

        self.raw_model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def step(self, scaler: torch.amp.GradScaler, max_norm: float | None) -> float | None:
        norm = None
        if max_norm is not None:
            total = nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm)
            norm = _full(total).item()  # the norm over all shards (a DTensor reduced over the mesh)
        self.optimizer.step()
        return norm

    @torch.no_grad()
    def model_state_dict(self) -> dict[str, torch.Tensor]:
        param_of = {n: id(p) for n, p in self.raw_model.named_parameters(remove_duplicate=False)}
        gathered: dict[Any, torch.Tensor] = {}
        out = {}
        for name, value in self.raw_model.state_dict().items():  # tied weights: one gather, both names
            key = param_of.get(name, name)
            if key not in gathered:
                gathered[key] = _full(value).detach().clone()
            out[name] = gathered[key]
        return out

    @torch.no_grad()
    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.tensor import distribute_tensor

        own = self.raw_model.state_dict()
        missing = sorted(set(own) - set(state))
        if missing:
            raise KeyError(f"missing weights: {', '.join(missing[:5])}")
        for name, p in self.raw_model.named_parameters():
            full = state[name].to(self.device, p.dtype)
            if tuple(full.shape) != tuple(p.shape):
                raise RuntimeError(f"{name}: checkpoint shape {tuple(full.shape)}, model {tuple(p.shape)}")
            shard = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
            p.to_local().copy_(shard.to_local())
        for name, b in self.raw_model.named_buffers():
            if name in state:
                b.copy_(state[name])

    @torch.no_grad()
    def optimizer_state_dict(self) -> dict[str, Any]:
        sd = self.optimizer.state_dict()
        state = {}
        for i in sorted(sd["state"]):
            entry = sorted(sd["state"][i].items())
            state[i] = {k: _full(v).clone() if torch.is_tensor(v) else v for k, v in entry}
        return {"state": state, "param_groups": sd["param_groups"]}

    @torch.no_grad()
    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.tensor import distribute_tensor

        sharded = {}
        for i, entry in state["state"].items():
            p = self.param_order[int(i)]
            sharded[i] = {
                k: distribute_tensor(v.to(self.device), p.device_mesh, p.placements, src_data_rank=None)
                if torch.is_tensor(v) and v.dim() > 0
                else v
                for k, v in entry.items()
            }
        self.optimizer.load_state_dict({"state": sharded, "param_groups": state["param_groups"]})

    def state_bytes(self) -> dict[str, int]:
        return tensor_bytes(self.raw_model.parameters(), self.optimizer)

    @torch.no_grad()
    def finish(self) -> nn.Module:
        """A plain module with the whole weights on every process (the sharded one stays behind)."""
        plain = fill_skeleton(self._skeleton, self.model_state_dict(), self.device)
        if self._own_group:
            import torch.distributed as dist

            dist.destroy_process_group()
        return plain
