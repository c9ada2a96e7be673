"""The strategy of a tensor-parallel model (llmlab/parallel/): TP inside the model, data parallelism around.

The model arrives already split (`llmlab.parallel.tp_gpt.parallelize_gpt`, or PyTorch's DTensor
`parallelize_module` for `parallel.engine=dtensor`); it carries its `parallel_layout` (the TP and DP groups).
The Trainer sees only the data-parallel replicas (`ParallelLayout.data_env`), so batches, loss weights and
statistics are per replica, and this strategy adds what TP × DP needs:

- after backward, the gradients are averaged over the *data-parallel* group only (one flat all-reduce; the
  tensor-parallel ranks already hold the gradients of their own shards, and identical ones for the
  replicated LayerNorms and position embedding);
- the gradient norm for clipping counts each sharded gradient's squares summed over the TP group, and each
  replicated one once;
- checkpoints hold the *single-device* GPT's weights (gathered; the vocabulary padding dropped) and the
  optimizer state in the same whole form, so a TP run resumes under another TP × DP layout, and its
  weights load into the stage-6 GPT and, through its converter, into HF GPT-2;
- after training, `finish` hands back a whole GPT on every process (for sampling and saving);
- every log line gets the communication figures of llmlab/parallel/collectives.CommMeter: seconds and bytes of
  TP and DP collectives per step, compute time (the rest), and the TP bytes the Megatron paper's count
  predicts, plus tokens/s and MFU (llmlab/train/flops.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llmlab.train.distributed import DistEnv
from llmlab.train.strategy_base import Strategy

__all__ = ["TensorParallelStrategy"]


def _is_dtensor(t: Any) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "placements")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _sharded(p: nn.Parameter) -> bool:
    """Does this rank hold only a part of `p` (ours: `partition_dim`; DTensor: a Shard placement)?"""
    if _is_dtensor(p):
        return any(pl.is_shard() for pl in p.placements)
    return getattr(p, "partition_dim", None) is not None


class TensorParallelStrategy(Strategy):
    name = "tp"
    memory_probe = False  # llmlab/memory predicts whole-model layouts, not a TP shard

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv,
                 device: torch.device, precision: str = "fp32") -> None:  # fmt: skip
        self.layout = model.parallel_layout
        self.raw_model = self.model = model
        self.optimizer, self.env, self.device, self.precision = optimizer, env, device, precision
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.engine = "dtensor" if any(_is_dtensor(p) for p in model.parameters()) else "ours"
        self._dp_bytes = 0
        self.flops_per_token = getattr(model, "flops_per_token", None)  # set by the recipe
        self.peak_flops: float | None = getattr(model, "peak_flops", None)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        meter = self.layout.meter
        if meter is None:
            yield
            return
        meter.paused = True
        try:
            yield
        finally:
            meter.paused = False

    # ------------------------------------------------------------------ the step
    def after_backward(self) -> None:
        dp = self.layout.dp
        if dp.size == 1:
            return
        grads = [_local(p.grad) for p in self.params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])  # one bucket: [Σ numel]
        meter = self.layout.meter
        start = time.perf_counter()
        if flat.is_cuda and meter is not None and meter.synchronize:
            torch.cuda.synchronize(flat.device)
        dist.all_reduce(flat, group=dp.group)
        if flat.is_cuda and meter is not None and meter.synchronize:
            torch.cuda.synchronize(flat.device)
        if meter is not None:
            meter.add("dp_all_reduce", flat.numel() * flat.element_size(), time.perf_counter() - start)
        flat /= dp.size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def _grad_norm(self) -> torch.Tensor:
        sharded = torch.zeros((), dtype=torch.float64, device=self.device)
        replicated = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.params:
            if p.grad is None:
                continue
            sq = _local(p.grad).double().pow(2).sum()
            if _sharded(p):
                sharded += sq
            else:
                replicated += sq  # the same on every TP rank: counted once
        tp = self.layout.tp
        if tp.size > 1:
            dist.all_reduce(sharded, group=tp.group)
        return (sharded + replicated).sqrt()

    def step(self, scaler: torch.amp.GradScaler, max_norm: float | None) -> float | None:
        norm = None
        if max_norm is not None:
            scaler.unscale_(self.optimizer)
            total = self._grad_norm()
            norm = float(total)
            coef = max_norm / (norm + 1e-6)
            if coef < 1:  # as torch.nn.utils.clip_grad_norm_
                for p in self.params:
                    if p.grad is not None:
                        _local(p.grad).mul_(coef)
        scaler.step(self.optimizer)
        return norm

    # ------------------------------------------------------------------ whole state for checkpoints
    def model_state_dict(self) -> dict[str, torch.Tensor]:
        if self.engine == "ours":
            from llmlab.parallel.tp_gpt import gather_state_dict

            return gather_state_dict(self.raw_model)
        return {k: (v.full_tensor() if _is_dtensor(v) else v).detach().clone()
                for k, v in self.raw_model.state_dict().items()}  # fmt: skip

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.engine == "ours":
            from llmlab.parallel.tp_gpt import load_full_state_dict

            load_full_state_dict(self.raw_model, state)
            return
        own = self.raw_model.state_dict()
        if set(own) != set(state):
            raise RuntimeError(f"state dict mismatch: {sorted(set(own) ^ set(state))}")
        with torch.no_grad():
            for name, p in self.raw_model.named_parameters(remove_duplicate=False):
                _local(p).copy_(self._local_part(state[name].to(self.device), p))

    def _whole(self, t: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
        if self.engine == "ours":
            from llmlab.parallel.tp_gpt import canonical

            return canonical(t, p, self.layout.tp)
        return (t.full_tensor() if _is_dtensor(t) else t).detach().clone()

    def _local_part(self, full: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
        if self.engine == "ours":
            from llmlab.parallel.tp_gpt import local_part

            return local_part(full, p, self.layout.tp)
        if _is_dtensor(p) and full.dim() > 0:
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(full, p.device_mesh, p.placements).to_local()
        return full.clone()

    def optimizer_state_dict(self) -> dict[str, Any]:
        sd = self.optimizer.state_dict()  # indices follow self.params (the param_groups' order)
        state = {}
        for idx, entry in sd["state"].items():
            p = self.params[idx]
            state[idx] = {k: (self._whole(v, p) if torch.is_tensor(v) and v.dim() > 0 else v)
                          for k, v in entry.items()}  # fmt: skip
        return {"state": state, "param_groups": sd["param_groups"]}

    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None:
        local = {}
        for idx, entry in state["state"].items():
            p = self.params[int(idx)]
            local[int(idx)] = {}
            for k, v in entry.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    part = self._local_part(v.to(self.device), p)
                    if _is_dtensor(p):
                        from torch.distributed.tensor import DTensor

                        part = DTensor.from_local(part, p.device_mesh, p.placements, run_check=False)
                    v = part
                local[int(idx)][k] = v
        self.optimizer.load_state_dict({"state": local, "param_groups": state["param_groups"]})

    def finish(self) -> nn.Module:
        """A whole single-device GPT with the trained weights, on every process."""
        from llmlab.models.gpt import GPT

        full = self.model_state_dict()
        cfg = self.raw_model.cfg
        whole = GPT(cfg).to(device=self.device, dtype=full["transformer.wte.weight"].dtype)
        whole.load_state_dict(full)
        return whole

    # ------------------------------------------------------------------ logging
    def tp_bytes_theory(self, tokens: float) -> dict[str, float]:
        """TP all-reduce bytes one rank sends per training step of `tokens` tokens (b·s): the Megatron paper's
        count, 2 all-reduces of [b, s, h] per layer in forward (attention's g, the MLP's g) and 2 in backward
        (their f's); and the exact count of this model, which adds the vocabulary-parallel embedding's g
        (forward) and the head's f (backward), [b, s, h] each, and the loss's and argmax's reductions of b·s
        numbers (max, target logit, sum of exponentials in fp32; the argmax's max fp32 and index int64).
        Under bf16/fp16 autocast the row-parallel outputs are 16-bit, the rest stays fp32."""
        tp = self.layout.tp
        if tp.size == 1:
            return {"tp_allreduce_bytes_theory": 0.0, "tp_allreduce_bytes_megatron": 0.0}
        cfg = self.raw_model.cfg
        full = self.raw_model.transformer.wpe.weight.element_size()  # fp32 (or the model's dtype)
        half = 2 if self.precision in ("bf16", "fp16") else full
        bsh = tokens * cfg.n_embd
        megatron = 2 * cfg.n_layer * bsh * half + 2 * cfg.n_layer * bsh * full
        exact = megatron + 2 * bsh * full + tokens * (3 * 4 + 4 + 8)
        return {"tp_allreduce_bytes_theory": exact, "tp_allreduce_bytes_megatron": megatron}

    def log_fields(self, steps: int, seconds: float, units: float) -> dict[str, float]:
        """Per-step communication and compute figures of the interval just ended (`units` tokens, summed over
        the data-parallel replicas, in `seconds` of training)."""
        meter = self.layout.meter
        if steps == 0:
            return {}
        if meter is None:  # parallel.time_comm=false: throughput figures only
            return self._flops_fields(seconds, units)
        nbytes, secs, _ = meter.take()
        tp_s = sum(v for k, v in secs.items() if k.startswith("tp_")) / steps
        dp_s = secs.get("dp_all_reduce", 0.0) / steps
        step_s = seconds / steps
        out = {
            "step_s": step_s,
            "comm_dp_s": dp_s,
            "dp_allreduce_bytes": nbytes.get("dp_all_reduce", 0) / steps,
        }
        if self.engine == "ours":  # DTensor's collectives happen inside torch, unseen by our meter
            out.update(
                comm_tp_s=tp_s,
                compute_s=max(step_s - tp_s - dp_s, 0.0),
                comm_share=(tp_s + dp_s) / step_s if step_s > 0 else 0.0,
                tp_allreduce_bytes=nbytes.get("tp_all_reduce", 0) / steps,
                **self.tp_bytes_theory(units / steps / self.layout.dp.size),
            )
        out.update(self._flops_fields(seconds, units))
        return out

    def _flops_fields(self, seconds: float, units: float) -> dict[str, float]:
        """Model TFLOP/s per device and MFU over `seconds` of training that saw `units` tokens."""
        out: dict[str, float] = {}
        if self.flops_per_token is not None and seconds > 0:
            processes = self.layout.tp.size * self.layout.dp.size
            achieved = units * self.flops_per_token / seconds / processes  # model FLOP/s per process
            out["tflops_per_device"] = achieved / 1e12
            if self.peak_flops:
                out["mfu"] = achieved / self.peak_flops
        return out
