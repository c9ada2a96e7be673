"""ZeRO stages 1, 2 and 3 from scratch over torch.distributed (Rajbhandari et al. 2020, "ZeRO: Memory
Optimizations Toward Training Trillion Parameter Models", §5).

Data parallelism keeps on each of N processes a full copy of everything a step needs. For Ψ parameters in
mixed precision with Adam, the paper counts 2Ψ bytes of fp16 parameters, 2Ψ of fp16 gradients and KΨ = 12Ψ
of optimizer states (fp32 master weights, momentum, variance): 16Ψ per process. ZeRO removes the redundancy
in three steps, each process owning 1/N of each kind of state:

    stage 1 (P_os)        optimizer states sharded           2Ψ + 2Ψ + KΨ/N
    stage 2 (P_os+g)      + gradients reduce-scattered        2Ψ + (2 + K)Ψ/N
    stage 3 (P_os+g+p)    + parameters gathered when used     (2 + 2 + K)Ψ/N

Sharding layout (as PyTorch FSDP2's per-parameter sharding): every parameter, flattened, is cut into N
chunks of c = ⌈numel / N⌉ elements; process r owns elements [r·c, (r+1)·c) (the last chunks may be short or
empty). Its optimizer updates only those elements, so its Adam state is 1/N of the whole. Communication:

- stage 1: gradients are all-reduced (averaged, as DDP), each process steps its chunk, then the chunks are
  all-gathered back into the full parameters;
- stage 2: as soon as a parameter's gradient is complete (a post-accumulate-grad hook), it is
  reduce-scattered: each process receives the average of its chunk only, and the full gradient is freed;
- stage 3: parameters live as chunks. Before a unit (a transformer block, or the "root": embeddings, final
  norm and head) runs forward, its parameters are all-gathered into their full storage; after the forward
  the storage is released (resized to 0 bytes — the tensors autograd saved keep pointing at it); before the
  unit's backward it is gathered again into the same storage, and released once its gradients are
  reduce-scattered. The root's parameters stay gathered from the model's forward until the optimizer step.

Each rank's gradient and optimizer-state bytes are what the accounting above says, asserted in
tests/parallel/test_zero.py, where 2 and 4 gloo processes take the same steps as plain AdamW on one process.
Gloo has no reduce-scatter on every torch version: then it is done as an all-reduce followed by taking the
rank's chunk (same result, more traffic); `ZeRO.collectives` says which was used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["ZeRO", "StateBytes"]


@dataclass
class StateBytes:
    """Bytes this process holds right now, by kind (what ZeRO divides)."""

    params: int = 0
    grads: int = 0
    optimizer: int = 0

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


@dataclass
class _Sharded:
    """One model parameter and this rank's chunk of it."""

    param: nn.Parameter  # the model's parameter, full shape (its storage is released between uses in stage 3)
    numel: int
    chunk: int  # c = ⌈numel / N⌉
    start: int  # this rank's first element
    owned: int  # elements this rank owns: min(c, numel - start), >= 0
    shard: Tensor  # [owned] what the optimizer steps: a view of the parameter (stages 1, 2), a copy (3)
    unit: int  # stage 3: the index of the unit that gathers it (-1: root)
    gathered: bool = True


@dataclass
class _Unit:
    params: list[_Sharded] = field(default_factory=list)
    pending: int = 0  # stage 3 backward: gradients still to come before the unit can be released


class ZeRO:
    """Shards `model`'s parameters, gradients and optimizer states over `group` (default: the world).

    `param_groups` is a torch-style list of {"params": [model parameters], **options} (or an iterable of
    parameters); `optimizer_cls(shard_groups, **defaults)` builds the inner optimizer over the chunks, so
    any element-wise torch optimizer (AdamW, Adam, SGD) works. `units` (stage 3) are the submodules gathered
    one at a time, usually the transformer blocks; parameters outside every unit form the root.

    The loop: `loss.backward()` (stage 2/3 hooks reduce-scatter during it), `zero.step()` (stage 1
    all-reduces first; clips when `max_norm` is given), `zero.zero_grad()`. `full_state_dict()` gathers full
    weights for saving."""

    def __init__(
        self,
        model: nn.Module,
        stage: int,
        param_groups: Iterable[Any] | None = None,
        optimizer_cls: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
        group: dist.ProcessGroup | None = None,
        units: Iterable[nn.Module] = (),
        **defaults: Any,
    ) -> None:
        if stage not in (1, 2, 3):
            raise ValueError(f"ZeRO stage must be 1, 2 or 3, got {stage}")
        if not dist.is_initialized():
            raise RuntimeError("ZeRO needs an initialised process group (torchrun, or init_process_group)")
        self.model, self.stage, self.group = model, stage, group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.collectives = {"reduce_scatter": "reduce_scatter_tensor", "all_gather": "all_gather_into_tensor"}

        unit_of: dict[int, int] = {}
        self.units_modules = list(units)
        for u, module in enumerate(self.units_modules):
            for p in module.parameters():
                unit_of[id(p)] = u
        self.units = [_Unit() for _ in self.units_modules]
        self.root = _Unit()

        groups = param_groups if param_groups is not None else model.parameters()
        groups = list(groups)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.sharded: list[_Sharded] = []
        by_param: dict[int, _Sharded] = {}
        shard_groups = []
        for g in groups:
            shards = []
            for p in g["params"]:
                if id(p) in by_param:
                    raise ValueError("a parameter appears in two parameter groups")
                s = self._shard(p, unit_of.get(id(p), -1))
                by_param[id(p)] = s
                self.sharded.append(s)
                shards.append(s.shard)
            shard_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": shards})
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in by_param]
        if missing:
            raise ValueError(f"parameters not given to ZeRO: {missing[:5]}")
        self._by_param = by_param
        self.optimizer = optimizer_cls(shard_groups, **defaults)
        self._hooks: list[Any] = []
        if stage >= 2:
            for s in self.sharded:
                self._hooks.append(s.param.register_post_accumulate_grad_hook(self._grad_ready(s)))
        if stage == 3:
            for s in self.sharded:
                (self.units[s.unit] if s.unit >= 0 else self.root).params.append(s)
                self._release(s)
            self._hooks.append(model.register_forward_pre_hook(lambda *_: self._gather_unit(self.root)))
            for module, unit in zip(self.units_modules, self.units, strict=True):
                self._hooks.append(module.register_forward_pre_hook(self._unit_hook(unit, "gather")))
                self._hooks.append(module.register_forward_hook(self._unit_hook(unit, "release")))
                self._hooks.append(module.register_full_backward_pre_hook(self._unit_hook(unit, "backward")))

    @property
    def param_groups(self) -> list[dict]:
        """The inner optimizer's groups (an LR scheduler may drive them)."""
        return self.optimizer.param_groups

    # ------------------------------------------------------------------------------------------ layout
    def _shard(self, p: nn.Parameter, unit: int) -> _Sharded:
        numel = p.numel()
        chunk = max(1, math.ceil(numel / self.world))
        start = min(self.rank * chunk, numel)
        owned = max(0, min(chunk, numel - start))
        flat = p.detach().view(-1)  # [numel], shares p's storage
        shard = flat[start : start + owned]  # [owned] a view: stepping it updates p (stages 1, 2)
        if self.stage == 3:
            shard = shard.clone()  # p's storage is released between uses
        return _Sharded(p, numel, chunk, start, owned, shard, unit)

    def _padded_chunk(self, s: _Sharded, local: Tensor) -> Tensor:
        out = local.new_zeros(s.chunk)  # [c]
        out[: s.owned] = local
        return out

    # ------------------------------------------------------------------------------------------ collectives
    def _all_gather(self, s: _Sharded, chunk: Tensor | None = None) -> Tensor:
        """The full flat parameter [numel] from every rank's chunk (or the full flat tensor of which each rank
        holds `chunk` [owned], e.g. an optimizer state)."""
        local = self._padded_chunk(s, (s.shard if chunk is None else chunk).detach())  # [c]
        if self.collectives["all_gather"] == "all_gather_into_tensor":
            out = local.new_empty(self.world * s.chunk)  # [N·c]
            try:
                dist.all_gather_into_tensor(out, local, group=self.group)
                return out[: s.numel]
            except (RuntimeError, NotImplementedError):
                self.collectives["all_gather"] = "all_gather"
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts)[: s.numel]

    def _reduce_scatter_mean(self, s: _Sharded, grad: Tensor) -> Tensor:
        """This rank's chunk [owned] of the average over ranks of `grad` (full shape)."""
        full = grad.new_zeros(self.world * s.chunk)  # [N·c]
        full[: s.numel] = grad.reshape(-1)
        if self.collectives["reduce_scatter"] == "reduce_scatter_tensor":
            out = full.new_empty(s.chunk)  # [c]
            try:
                dist.reduce_scatter_tensor(out, full, group=self.group)
                return out[: s.owned].div_(self.world)
            except (RuntimeError, NotImplementedError):
                self.collectives["reduce_scatter"] = "all_reduce + slice"
        dist.all_reduce(full, group=self.group)
        return full[s.start : s.start + s.owned].div_(self.world)

    # ------------------------------------------------------------------------------------------ stage 3
    def _release(self, s: _Sharded) -> None:
        if s.gathered:
            s.param.data.untyped_storage().resize_(0)
            s.gathered = False

    def _gather(self, s: _Sharded) -> None:
        if not s.gathered:
            full = self._all_gather(s)  # [numel]
            storage = s.param.data.untyped_storage()
            storage.resize_(s.numel * s.param.element_size())
            s.param.data.view(-1).copy_(full)
            s.gathered = True

    def _gather_unit(self, unit: _Unit) -> None:
        for s in unit.params:
            self._gather(s)

    def _unit_hook(self, unit: _Unit, what: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            if what == "gather":
                self._gather_unit(unit)
            elif what == "release":
                for s in unit.params:  # after forward; backward gathers again
                    self._release(s)
            elif what == "backward":
                self._gather_unit(unit)
                unit.pending = sum(s.param.requires_grad for s in unit.params)

        return hook

    # ------------------------------------------------------------------------------------------ gradients
    def _grad_ready(self, s: _Sharded) -> Callable[[Tensor], None]:
        def hook(p: Tensor) -> None:
            g = self._reduce_scatter_mean(s, p.grad)  # [owned]
            s.shard.grad = g if s.shard.grad is None else s.shard.grad.add_(g)
            p.grad = None  # the full gradient is freed as soon as it is scattered
            if self.stage == 3 and s.unit >= 0:
                unit = self.units[s.unit]
                unit.pending -= 1
                if unit.pending == 0:
                    for t in unit.params:
                        self._release(t)

        return hook

    def sync_grads(self) -> None:
        """Stage 1: average the full gradients over ranks and point each chunk's .grad at its slice (done by
        `step`, or before it when the caller clips first)."""
        for s in self.sharded:
            p = s.param
            if p.grad is None:
                continue
            dist.all_reduce(p.grad, group=self.group)  # the sum; / N below: the average, as DDP
            p.grad.div_(self.world)
            s.shard.grad = p.grad.detach().view(-1)[s.start : s.start + s.owned]  # [owned] a view

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale the (sharded) gradients so their global L2 norm is at most `max_norm`; returns the norm."""
        sq = torch.zeros((), dtype=torch.float64, device=self.sharded[0].shard.device)
        for s in self.sharded:
            if s.shard.grad is not None:
                sq += s.shard.grad.detach().double().pow(2).sum()
        dist.all_reduce(sq, group=self.group)  # each element is owned by exactly one rank
        norm = float(sq.sqrt())
        coef = max_norm / (norm + 1e-6)
        if coef < 1:
            for s in self.sharded:
                if s.shard.grad is not None:
                    s.shard.grad.mul_(coef)
        return norm

    # ------------------------------------------------------------------------------------------ the step
    def step(self, max_norm: float | None = None, skip_grad_sync: bool = False) -> float | None:
        """Finish the gradients (stage 1: all-reduce, unless `sync_grads` was called), clip, step this rank's
        chunks, and make the full parameters current again (stages 1, 2: all-gather; stage 3: gathered at
        the next forward)."""
        if self.stage == 1 and not skip_grad_sync:
            self.sync_grads()
        norm = self.clip_grad_norm_(max_norm) if max_norm is not None else None
        self.optimizer.step()
        if self.stage == 3:
            for s in self.sharded:  # the root (and any unit whose backward did not run) is released here
                self._release(s)
        else:
            with torch.no_grad():
                for s in self.sharded:
                    s.param.data.view(-1).copy_(self._all_gather(s))
        return norm

    def zero_grad(self) -> None:
        for s in self.sharded:
            s.shard.grad = None
            s.param.grad = None

    # ------------------------------------------------------------------------------------------ state
    def state_bytes(self) -> StateBytes:
        """What this rank holds now: parameter, gradient and optimizer-state bytes."""
        out = StateBytes()
        for s in self.sharded:
            if self.stage == 3:  # the chunk, plus the full storage while gathered
                out.params += s.shard.numel() * s.shard.element_size()
                out.params += s.param.data.untyped_storage().nbytes()
            else:
                out.params += s.numel * s.param.element_size()
            for g in (s.param.grad, s.shard.grad if self.stage >= 2 else None):
                if g is not None:
                    out.grads += g.numel() * g.element_size()
        for state in self.optimizer.state.values():
            for v in state.values():
                if torch.is_tensor(v) and v.dim() > 0:
                    out.optimizer += v.numel() * v.element_size()
        return out

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, Tensor]:
        """The model's full weights under every name they have (a tied weight under both); every rank takes
        part and gets them (stage 3 gathers each parameter once)."""
        full = {}
        for s in self.sharded:
            full[id(s.param)] = self._all_gather(s).view_as(s.param) if self.stage == 3 else s.param.detach()
        return {n: full[id(p)].clone() for n, p in self.model.named_parameters(remove_duplicate=False)}

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        """Set the weights from full tensors (a checkpoint), on every rank; nothing is communicated."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        missing = [names[id(s.param)] for s in self.sharded if names[id(s.param)] not in state]
        if missing:
            raise KeyError(f"weights missing from the state dict: {missing[:5]}")
        for s in self.sharded:
            full = state[names[id(s.param)]].reshape(-1).to(s.shard.dtype)  # [numel]
            if full.numel() != s.numel:
                raise RuntimeError(f"{names[id(s.param)]}: {full.numel()} elements, the model has {s.numel}")
            s.shard.copy_(full[s.start : s.start + s.owned])
            if self.stage < 3 or s.gathered:
                s.param.data.view(-1).copy_(full)

    @torch.no_grad()
    def full_optimizer_state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state_dict with every per-element state gathered to the parameter's full
        shape: exactly the layout the same torch optimizer over the whole model would save (parameter
        indices in the order of the groups given), so it loads under any number of processes, or without
        ZeRO. Every rank takes part."""
        sd = self.optimizer.state_dict()
        state = {}
        for idx, s in enumerate(self.sharded):
            entry = sd["state"].get(idx)
            if entry is None:
                continue
            state[idx] = {
                k: self._all_gather(s, v).view_as(s.param).clone()
                if torch.is_tensor(v) and v.dim() > 0
                else v
                for k, v in entry.items()
            }
        return {"state": state, "param_groups": sd["param_groups"]}

    def load_full_optimizer_state_dict(self, sd: dict[str, Any]) -> None:
        """The inverse: keep this rank's chunk of each full per-element state."""
        state = {}
        for idx, entry in sd["state"].items():
            s = self.sharded[int(idx)]
            chunked = {}
            for k, v in entry.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    if v.numel() != s.numel:
                        raise ValueError(
                            f"optimizer state {k!r} of parameter {idx} has {v.numel()} elements, the "
                            f"parameter {s.numel}"
                        )
                    v = v.reshape(-1)[s.start : s.start + s.owned].clone()
                chunked[k] = v
            state[int(idx)] = chunked
        self.optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})

    def unshard(self) -> None:
        """End of training: every parameter whole again on every rank and the hooks removed, so the model is a
        plain module (e.g. for decoding on one process). The optimizer cannot step after this in stage 3."""
        with torch.no_grad():
            for s in self.sharded:
                self._gather(s)
        self.remove_hooks()

    def release(self) -> None:
        """Stage 3: release every gathered parameter (e.g. after an evaluation forward)."""
        if self.stage == 3:
            for s in self.sharded:
                self._release(s)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
