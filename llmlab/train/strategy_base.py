"""The strategy interface and the helpers its implementations share (llmlab/train/strategy.py explains the
strategies and picks one; each lives in its own module and imports only this one, so imports point down).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


class Strategy:
    """The interface (and the single-process behaviour). `model` is what the training forward calls;
    `eval_model` what evaluation calls on every process; `optimizer` what the LR schedule drives."""

    name = "base"
    model: nn.Module
    raw_model: nn.Module
    optimizer: torch.optim.Optimizer

    @property
    def eval_model(self) -> nn.Module:
        return self.raw_model

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Around the forward and backward of a micro-batch: no gradient exchange unless `last`."""
        return contextlib.nullcontext()

    def evaluating(self) -> contextlib.AbstractContextManager:
        """Around an evaluation (e.g. to keep its communication out of the training figures)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, scaler: torch.amp.GradScaler) -> None:
        scaler.scale(loss).backward()

    def after_backward(self) -> None:
        """After the last micro-batch's backward."""

    def step(self, scaler: torch.amp.GradScaler, max_norm: float | None) -> float | None:
        """Clip to `max_norm` (when set) and take the optimizer step; returns the pre-clip gradient norm."""
        norm = None
        if max_norm is not None:
            scaler.unscale_(self.optimizer)
            norm = nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm).item()
        scaler.step(self.optimizer)
        return norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The full weights under the model's own names (every process must call it: it may gather)."""
        return self.raw_model.state_dict()

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.raw_model.load_state_dict(state)

    def optimizer_state_dict(self) -> dict[str, Any]:
        """The full optimizer state in torch's own layout (every process must call it)."""
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def state_bytes(self) -> dict[str, int]:
        """Bytes this process holds for parameters, gradients and optimizer states."""
        return tensor_bytes(self.raw_model.parameters(), self.optimizer)

    def finish(self) -> nn.Module:
        """After training: the whole model, usable on one process (for decoding and saving)."""
        return self.raw_model

    def log_fields(self, steps: int, seconds: float, units: float) -> dict[str, float]:
        """Extra figures for the train log line closing an interval of `steps` steps, `seconds` of training
        and `units` units (summed over the data-parallel replicas)."""
        return {}


def tensor_bytes(params: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the parameter, gradient and optimizer-state storages (DTensors by their local shard)."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    params = list(params)
    out = {"params": 0, "grads": 0, "optimizer": 0}
    for p in params:
        out["params"] += local(p).nbytes
        if p.grad is not None:
            out["grads"] += local(p.grad).nbytes
    for st in optimizer.state.values():
        out["optimizer"] += sum(local(v).nbytes for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    return out


def ensure_process_group(device: torch.device) -> bool:
    """FSDP2 and DeepSpeed need a process group even on one process: without a launcher, a private group of
    one (nothing listens on a port). Returns whether it was created here (and is to be destroyed by us)."""
    import os

    import torch.distributed as dist

    if dist.is_initialized():
        return False
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asserts a launcher's variable
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters live on the meta device (no memory): its structure, buffers and
    weight ties, to be filled with the whole weights after a sharded training (`fill_skeleton`)."""
    memo: dict[int, Any] = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    return copy.deepcopy(model, memo)


@torch.no_grad()
def fill_skeleton(plain: nn.Module, full: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """`meta_skeleton`'s copy with real parameters from a full state dict (a tied weight stays tied)."""
    new: dict[int, nn.Parameter] = {}
    for prefix, module in plain.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in new:
                value = full[f"{prefix}.{pname}" if prefix else pname].to(device)
                new[id(p)] = nn.Parameter(value.clone(), requires_grad=p.requires_grad)
            module._parameters[pname] = new[id(p)]
    for name, b in plain.named_buffers():
        if name in full:
            b.copy_(full[name])
    return plain.to(device)
