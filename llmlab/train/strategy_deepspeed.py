"""DeepSpeed as a training strategy: its ZeRO stages 0-3 and CPU offload inside the one Trainer loop.

DeepSpeed usually owns the loop (`engine.backward(loss)`, `engine.step()`); here it owns only those two calls.
The DeepSpeed config is generated from ours (`deepspeed_config`): the ZeRO stage, offload, gradient clipping,
bf16, and `managed_gradient_accumulation: false`, so the Trainer decides where a global batch ends (it calls
backward once per micro-batch with the loss already weighted by its share of the batch, then `step`) exactly
as under DDP. The optimizer is the recipe's own torch optimizer ("client optimizer": no JIT-compiled
DeepSpeed Adam; offload keeps it too, `zero_force_ds_cpu_optimizer: false`), and our LR schedule drives its
parameter groups.

Precision: `train.precision=bf16` is DeepSpeed's bf16 mode: bf16 parameters and gradients, fp32 master weights
and Adam states in the optimizer (the ZeRO paper's 2Ψ + 2Ψ + 12Ψ); fp32 trains in fp32 throughout; fp16 is
refused (use bf16).

Checkpoints stay the project's one format: the full fp32 weights and the full optimizer state in torch's own
layout, assembled from DeepSpeed's partitions with its tensor-fragment API (`safe_get_full_fp32_param`,
`safe_get_full_optimizer_state`; collectives at stage 3), so a DeepSpeed run resumes under any stage, any
number of processes, or another strategy.

Reference points: DeepSpeed's docs (config JSON, ZeRO, "ZeRO-Offload"), `deepspeed.runtime.engine`,
`deepspeed.utils.tensor_fragment`; Rajbhandari et al. 2020 (ZeRO), Ren et al. 2021 (ZeRO-Offload).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llmlab.train.distributed import DistEnv
from llmlab.train.strategy_base import Strategy, ensure_process_group, fill_skeleton, meta_skeleton


def deepspeed_config(stage: int, offload: str, grad_clip: float | None, precision: str, grad_accum: int,
                     world_size: int) -> dict[str, Any]:  # fmt: skip
    """Our TrainConfig as a DeepSpeed config dict. The batch sizes are bookkeeping only: the Trainer splits
    batches itself and tells DeepSpeed where a global batch ends."""
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": grad_accum * world_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(grad_clip or 0.0),
        "bf16": {"enabled": precision == "bf16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def _copy(v: Any) -> Any:
    return v.clone() if torch.is_tensor(v) else v


def _shape(p: nn.Parameter) -> tuple[int, ...]:
    """A parameter's full shape (at stage 3 the tensor itself is an empty placeholder)."""
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


class DeepSpeedStrategy(Strategy):
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv, device: torch.device,
                 cfg: Any, precision: str) -> None:  # fmt: skip
        import deepspeed

        stage = cfg.ds_stage

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.name, self.stage, self.device = f"deepspeed{stage}", stage, device
        # DeepSpeed flattens the groups' parameter lists: keep the recipe's order and options first.
        self.param_order = [p for g in optimizer.param_groups for p in g["params"]]
        self.group_sizes = [len(g["params"]) for g in optimizer.param_groups]
        self._own_group = ensure_process_group(device)
        self._skeleton = meta_skeleton(model)
        # Stage 0 in fp32 steps the client optimizer directly and clips without keeping the norm: there the
        # clipping is ours, in a hook that runs inside engine.step() after the all-reduce, before the update.
        self._plain = stage == 0 and precision != "bf16"
        self._norm: float | None = None
        clip = None if self._plain else cfg.grad_clip
        config = deepspeed_config(stage, cfg.offload, clip, precision, cfg.grad_accum, env.world_size)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False
        )
        self.raw_model, self.model = model, self.engine
        self.optimizer = optimizer  # the client optimizer: its param_groups carry the lr DeepSpeed uses
        self._partitioned = not self._plain
        if self._plain and cfg.grad_clip is not None:
            max_norm = cfg.grad_clip

            def clip_before_update(*_: Any) -> None:
                self._norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()

            optimizer.register_step_pre_hook(clip_before_update)

    @property
    def eval_model(self) -> nn.Module:
        return self.engine.module  # stage 3: its hooks gather each block's parameters on every process

    def backward(self, loss: torch.Tensor, scaler: torch.amp.GradScaler) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the Trainer has already weighted the loss

    def _gradient_bytes(self) -> int:
        """The gradients DeepSpeed holds between backward and step: the model's .grad (stage 0/1, and stage 2
        between reductions), the reduced partitions (`averaged_gradients`, `all_grad_tensors`), stage 3's
        flat partition buffer. Its step frees or reuses them, so they are counted here, before it."""
        seen: set[int] = set()
        total = 0

        def add(t: Any) -> None:
            nonlocal total
            if torch.is_tensor(t) and t.numel() and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()

        for p in self.raw_model.parameters():
            add(p.grad)
        opt = self.engine.optimizer
        for attr in ("averaged_gradients", "all_grad_tensors"):
            held = getattr(opt, attr, None) or {}
            for grads in held.values() if isinstance(held, dict) else held:
                for g in grads if isinstance(grads, (list, tuple)) else [grads]:
                    add(g)
        add(getattr(opt, "grad_partitions_flat_buffer", None))
        return total

    def step(self, scaler: torch.amp.GradScaler, max_norm: float | None) -> float | None:
        self._grads_held = self._gradient_bytes()
        self.engine.step()  # reduces (stage 0/1), clips at `gradient_clipping`, updates, zeroes gradients
        if max_norm is None:
            return None
        norm = self._norm if self._plain else self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    # ------------------------------------------------------------------ full state, in torch's layout
    def _fp32(self, p: nn.Parameter) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param

        full = safe_get_full_fp32_param(p) if self._partitioned else None
        return (full if full is not None else p.detach()).float().cpu().view(_shape(p))

    @torch.no_grad()
    def model_state_dict(self) -> dict[str, torch.Tensor]:
        full = {id(p): self._fp32(p).clone() for p in self.raw_model.parameters()}  # in order on every rank
        names = dict(self.raw_model.named_parameters(remove_duplicate=False))
        out = {}
        for name, value in self.raw_model.state_dict().items():
            out[name] = full[id(names[name])] if name in names else value.detach().clone()
        return out

    @torch.no_grad()
    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        names = dict(self.raw_model.named_parameters())
        missing = sorted(set(names) - set(state))
        if missing:
            raise KeyError(f"missing weights: {', '.join(missing[:5])}")
        for name, p in names.items():
            value = state[name]
            shape = _shape(p)
            if tuple(value.shape) != shape:
                raise RuntimeError(f"{name}: checkpoint shape {tuple(value.shape)}, model {shape}")
            if self._partitioned:
                safe_set_full_fp32_param(p, value.to(self.device, torch.float32))  # the fp32 master
            if hasattr(p, "ds_id"):  # stage 3: the partitioned working copy, re-partitioned from rank 0
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if dist.get_rank() == 0:
                        p.data.copy_(value)
            else:
                p.data.copy_(value)
        for name, b in self.raw_model.named_buffers():
            if name in state:
                b.copy_(state[name])

    def _inner(self) -> torch.optim.Optimizer:
        return getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)

    def _flats(self) -> list[torch.Tensor]:
        """The flat fp32 partitions DeepSpeed's optimizer updates (stage 3 swaps them into the client
        optimizer's groups only during its step)."""
        opt = self.engine.optimizer
        for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
            if getattr(opt, attr, None):
                return list(getattr(opt, attr))
        return [p for g in self._inner().param_groups for p in g["params"]]

    def _inner_state(self) -> dict[str, Any]:
        return next(iter(self._inner().state.values()), {})

    def _link_states(self) -> None:
        """Stages 1-2 link each parameter to its slice of the optimizer states once, after the first step's
        first group: with several parameter groups the later groups' states do not exist yet then and stay
        unlinked (DeepSpeed 0.19). Link again now that every group has its states."""
        opt = self.engine.optimizer
        if hasattr(opt, "_hp_optimizer_states_linked"):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()

    def _create_states(self, like: dict[str, Any]) -> None:
        """Before the first step the client optimizer has no state yet: zero states shaped like DeepSpeed's
        flat partitions, with `like`'s keys (a checkpoint entry), for the saved values to be written into."""
        inner = self._inner()
        for flat in self._flats():
            if not inner.state.get(flat):
                inner.state[flat] = {
                    k: torch.zeros_like(flat) if torch.is_tensor(v) and v.dim() > 0 else _copy(v)
                    for k, v in like.items()
                }

    @torch.no_grad()
    def optimizer_state_dict(self) -> dict[str, Any]:
        if not self._partitioned:
            return self.optimizer.state_dict()
        from deepspeed.utils import safe_get_full_optimizer_state

        inner = self._inner_state()
        keys = sorted(k for k, v in inner.items() if torch.is_tensor(v) and v.dim() > 0)
        state = {}
        if inner:
            self._link_states()
            for i, p in enumerate(self.param_order):
                full = {k: safe_get_full_optimizer_state(p, k) for k in keys}
                entry = {k: v.float().cpu().view(_shape(p)).clone() for k, v in full.items()}
                state[i] = {**{k: v for k, v in inner.items() if k not in keys}, **entry}
        groups, start = [], 0
        for g, size in zip(self.optimizer.param_groups, self.group_sizes, strict=True):
            options = {k: v for k, v in g.items() if k not in ("params", "initial_lr")}
            groups.append({**options, "params": list(range(start, start + size))})
            start += size
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None:
        if not self._partitioned:
            self.optimizer.load_state_dict(state)
            return
        from deepspeed.utils import safe_set_full_optimizer_state

        if len(state["param_groups"]) != len(self.group_sizes):
            raise ValueError(
                f"{len(state['param_groups'])} parameter groups, this optimizer has {len(self.group_sizes)}"
            )
        for g, saved in zip(self.optimizer.param_groups, state["param_groups"], strict=True):
            g.update({k: v for k, v in saved.items() if k not in ("params", "initial_lr")})
        entries = state["state"]
        if not entries:
            return
        first = entries[next(iter(entries))]
        self._create_states(first)
        self._link_states()
        for i, p in enumerate(self.param_order):
            entry = entries[i] if i in entries else entries[str(i)]
            for k, v in entry.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    safe_set_full_optimizer_state(p, v.to(self.device, torch.float32), k)
        scalars = {k: v for k, v in first.items() if not (torch.is_tensor(v) and v.dim() > 0)}
        for st in self._inner().state.values():  # one state per flat partition: the step count
            for k, v in scalars.items():
                st[k] = _copy(v)

    def state_bytes(self) -> dict[str, int]:
        """Parameters: this process's working copy (stage 3: its partition); optimizer: the flat fp32
        partitions DeepSpeed's optimizer updates (a master copy) plus their Adam states; gradients: what it
        held before the last step (`_gradient_bytes`)."""
        out = {"params": 0, "grads": getattr(self, "_grads_held", 0), "optimizer": 0}
        own = set()
        for p in self.raw_model.parameters():
            local = p.ds_tensor if hasattr(p, "ds_tensor") else p
            own.add(local.data_ptr())
            out["params"] += local.numel() * local.element_size()
        for p in self._flats():
            if p.numel() and p.data_ptr() not in own:
                out["optimizer"] += p.numel() * p.element_size()
        for st in self._inner().state.values():
            out["optimizer"] += sum(v.nbytes for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
        return out

    def finish(self) -> nn.Module:
        """A plain module with the whole fp32 weights (stage 3 keeps the trained one partitioned, bf16 mode
        keeps it in bf16)."""
        plain = fill_skeleton(self._skeleton, self.model_state_dict(), self.device)
        # The engine is done: drop its hooks and buffers now, while every process group is alive (ZeRO-3's
        # parameter hooks otherwise live on in reference cycles until the interpreter tears down).
        self.engine.destroy()
        if self._own_group:
            dist.destroy_process_group()
        return plain
