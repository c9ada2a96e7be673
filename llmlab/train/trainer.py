"""The one training loop every recipe uses.

One explicit step: split the global batch into micro-batches, forward under autocast, backward (or the
model's own hand-written backward), average gradients across processes, clip, check the loss is finite, step
the optimizer and the LR schedule. Around it: evaluation every N steps and at the end, checkpoints that
resume bit for bit, and a handful of callback events for logging. How processes share the work is a strategy
(llmlab/train/strategy.py: DDP, our ZeRO 1/2/3, FSDP2, DeepSpeed) chosen by `train.strategy`; activation
checkpointing is a switch the model implements. Reference points: nanoGPT's train.py loop, PyTorch's AMP and
DDP recipes.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llmlab.config import ConfigError
from llmlab.train import checkpoint as ckpt
from llmlab.train.averaging import WeightAverage, first_update_step
from llmlab.train.best import BestWeights
from llmlab.train.callbacks import Callback
from llmlab.train.config import ScheduleConfig, TrainConfig
from llmlab.train.distributed import DistEnv, all_reduce_sum_
from llmlab.train.optim import build_scheduler
from llmlab.train.rng import get_rng_state, set_rng_state
from llmlab.train.strategy import check_config, make_strategy
from llmlab.train.tasks import StepOutput


class NonFiniteLossError(RuntimeError):
    """The loss (or the weights) became NaN/Inf; training stopped, the last good checkpoint is kept."""


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"  # autocast brings no speed on a CPU (docs/results.md): exact fp32 by default


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def split_batch(batch: Any, parts: int) -> list[Any]:
    """Split every tensor of a batch along dim 0 into `parts` micro-batches."""
    if parts == 1:
        return [batch]
    if isinstance(batch, torch.Tensor):
        return list(torch.tensor_split(batch, parts))
    if isinstance(batch, (tuple, list)):
        columns = [split_batch(b, parts) for b in batch]
        return [type(batch)(col[i] for col in columns) for i in range(parts)]
    if isinstance(batch, dict):
        columns = {k: split_batch(v, parts) for k, v in batch.items()}
        return [{k: v[i] for k, v in columns.items()} for i in range(parts)]
    raise TypeError(f"cannot split a batch of type {type(batch).__name__}")


def _rows(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, (tuple, list)):
        return _rows(batch[0])
    if isinstance(batch, dict):
        return _rows(next(iter(batch.values())))
    raise TypeError(f"cannot size a batch of type {type(batch).__name__}")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    task: Any,
    loader: Iterable,
    device: torch.device,
    dist_env: DistEnv | None = None,
    autocast: Any = contextlib.nullcontext,
) -> dict[str, float]:
    """Metrics over a whole split. Each process evaluates its shard; the sums are all-reduced."""
    dist_env = dist_env or DistEnv()
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    n, sums = 0, {}
    for batch in loader:
        batch = to_device(batch, device)
        with autocast():
            out = task.step(model, batch)
        if out.n == 0:  # this process's share of a last, small batch can be empty (its mean is NaN)
            continue
        loss_sum += out.loss.double() * out.n
        n += out.n
        for k, v in out.sums.items():
            sums[k] = sums.get(k, 0) + v.double()
    names = sorted(sums)
    packed = torch.stack(
        [loss_sum, torch.tensor(float(n), device=device, dtype=torch.float64)]
        + [torch.as_tensor(sums[k], device=device) for k in names]
    )
    packed = all_reduce_sum_(packed, dist_env).tolist()
    model.train(was_training)
    if packed[1] == 0:
        raise ValueError("evaluation split is empty")
    return task.metrics(packed[0], packed[1], dict(zip(names, packed[2:], strict=True)))


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        task: Any,
        optimizer: torch.optim.Optimizer,
        train_loader: Any,
        cfg: TrainConfig,
        schedule: ScheduleConfig,
        eval_loaders: dict[str, Iterable] | None = None,
        final_loaders: dict[str, Iterable] | None = None,
        device: torch.device | str = "cpu",
        dist_env: DistEnv | None = None,
        checkpoint_dir: Path | None = None,
        callbacks: list[Callback] | tuple[Callback, ...] = (),
        name: str = "train",
    ) -> None:
        self.device = torch.device(device)
        self.dist = dist_env or DistEnv()
        self.cfg = cfg
        self.task = task
        self.name = name
        self.raw_model = model.to(self.device)
        # Stage 1's hand-derived MLP fills .grad itself; everything else goes through autograd.
        self.manual = bool(getattr(model, "computes_own_gradients", False))
        self.precision = resolve_precision(cfg.precision, self.device)
        check_config(cfg, self.raw_model, self.dist, self.precision)
        if cfg.activation_checkpointing:
            self.raw_model.set_activation_checkpointing(True)
        self.strategy = make_strategy(cfg, self.raw_model, optimizer, self.dist, self.device, self.manual,
                                      self.precision)  # fmt: skip
        self.model: nn.Module = self.strategy.model
        optimizer = self.strategy.optimizer  # ZeRO: the optimizer over this rank's chunks
        if cfg.compile:
            if self.manual:
                raise ValueError(
                    "train.compile needs an autograd model; the hand-derived MLP has its own backward"
                )
            # Compile the module the step calls (DDP-wrapped or not); state_dicts come from raw_model, so
            # checkpoint names carry no `_orig_mod.` prefix. Evaluation uses raw_model, uncompiled.
            self.model = torch.compile(self.model)
        self.optimizer = optimizer
        self.train_loader = train_loader
        self.eval_loaders = dict(eval_loaders or {})
        self.final_loaders = dict(final_loaders or {})
        self.checkpoint_dir = checkpoint_dir
        self.callbacks = list(callbacks)
        # train.best_metric: the weights of the best evaluation so far (llmlab/train/best.py)
        self.best: BestWeights | None = None
        if cfg.best_metric is not None:
            self.best = BestWeights(cfg.best_metric, cfg.best_mode, checkpoint_dir)
            if self.best.split not in self.eval_loaders:
                evaluated = ", ".join(self.eval_loaders) or "no split"
                raise ConfigError(
                    f"train.best_metric={cfg.best_metric}: this run evaluates {evaluated} during training"
                )

        self.steps_per_epoch = len(train_loader)
        if self.steps_per_epoch == 0:
            raise ValueError("the training set is smaller than one batch")
        if cfg.max_steps is not None:
            self.total_steps = cfg.max_steps
        else:
            self.total_steps = max(1, math.ceil(cfg.max_epochs * self.steps_per_epoch))
        self.scheduler = build_scheduler(optimizer, schedule, self.total_steps)
        # train.weight_average: an EMA or SWA of the weights is the final model (llmlab/train/averaging.py)
        self.average: WeightAverage | None = None
        if cfg.weight_average != "none":
            start = first_update_step(cfg.average_start, self.total_steps)
            self.average = WeightAverage(cfg.weight_average, cfg.ema_decay, start, cfg.average_every)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

        # Position and counters: all of this goes into a checkpoint.
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.train_time_s = 0.0
        self.units_seen = 0
        self.should_stop = False
        self.stop_reason: str | None = None
        self.final_metrics: dict[str, float] = {}
        self._interval: dict[str, Any] = {}
        self._last_eval_step = -1
        self._last_ckpt_step = -1
        self.last_lr = self.lr()
        # Memory of the first step, measured beside the prediction (memory.json; `llmlab memory` predicts)
        self.memory_probe = None
        if not self.manual and getattr(self.strategy, "memory_probe", True):
            from llmlab.memory import MemoryProbe

            self.memory_probe = MemoryProbe.for_trainer(self, step=0)

    # ----------------------------------------------------------------- helpers
    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.raw_model.parameters())

    @property
    def epoch_float(self) -> float:
        return self.epoch + self.batch_in_epoch / self.steps_per_epoch

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _emit(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self, *args)

    # ----------------------------------------------------------------- the step
    def train_step(self, batch: Any) -> StepOutput:
        """One optimizer step on one global batch (this process's share of it)."""
        if not self.model.training:  # after an evaluation (train() walks every module: ~1 ms a step here)
            self.model.train()
        batch = to_device(batch, self.device)
        micro_batches = split_batch(batch, self.cfg.grad_accum)
        units = [self._units(m) for m in micro_batches]
        total = float(sum(units))
        if self.dist.enabled:  # the global batch's units, so that each process weighs its own share
            total = all_reduce_sum_(
                torch.tensor(total, device=self.device, dtype=torch.float64), self.dist
            ).item()
        self.strategy.zero_grad()
        loss_sum = torch.zeros((), device=self.device)
        n, sums = 0, {}
        for i, micro in enumerate(micro_batches):
            # The global mean over units = Σ (micro-batch mean × its share of the units). DDP (and our manual
            # all-reduce) average over processes, hence × world size. Units are samples, or tokens for tasks
            # with variable-length targets, whose micro-batches and processes hold different token counts.
            scale = units[i] * self.dist.world_size / max(total, 1.0)
            last = i == len(micro_batches) - 1
            probe = self.memory_probe if i == 0 else None  # the measured step's first micro-batch
            measure = contextlib.nullcontext()
            if probe is not None and probe.due(self.step):
                measure = probe.activation_context(micro)
            with self.strategy.no_sync(last), measure:
                if self.manual:
                    with torch.no_grad():
                        out = self.task.manual_step(self.raw_model, micro, scale)
                else:
                    with self.autocast():
                        out = self.task.step(self.model, micro)
                    self.strategy.backward(out.loss * scale, self.scaler)
            loss_sum += out.loss.detach().float() * out.n
            n += out.n
            for k, v in out.sums.items():
                sums[k] = sums.get(k, 0) + v.detach()
        self.strategy.after_backward()

        # The global mean loss; every process sees the same value, so all stop together on NaN.
        totals = all_reduce_sum_(
            torch.stack([loss_sum, torch.tensor(float(n), device=self.device)]), self.dist
        )
        loss_value = (totals[0] / totals[1]).item()
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(self._nonfinite_message(f"the loss is {loss_value}"))

        self.last_lr = self.lr()  # the rate this step used (the scheduler moves on below)
        grad_norm = self.strategy.step(self.scaler, self.cfg.grad_clip)  # clips first when grad_clip is set
        if self.memory_probe is not None and self.memory_probe.due(self.step):  # llmlab/memory: measured
            own = self.strategy.state_bytes() if self.strategy.name.startswith("deepspeed") else None
            self.memory_probe.record_states(self.strategy.raw_model, self.strategy.optimizer, states=own)
        self.scaler.update()
        self.scheduler.step()

        self._accumulate(loss_sum, n, sums, grad_norm)
        return StepOutput(loss=torch.tensor(loss_value), n=int(totals[1].item()), sums=sums)

    def _units(self, micro: Any) -> int:
        count = getattr(self.task, "units", None)
        return count(micro) if count is not None else _rows(micro)

    def _nonfinite_message(self, what: str) -> str:
        last = ckpt.latest_checkpoint(self.checkpoint_dir) if self.checkpoint_dir else None
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        return (
            f"training diverged at step {self.step + 1}: {what}; stopped ({where}). "
            f"Try a lower optim.lr, train.grad_clip=1.0, or train.precision=fp32."
        )

    def _accumulate(self, loss_sum: torch.Tensor, n: int, sums: dict, grad_norm: float | None) -> None:
        iv = self._interval
        iv["steps"] = iv.get("steps", 0) + 1
        iv["loss_sum"] = iv.get("loss_sum", 0) + loss_sum
        iv["n"] = iv.get("n", 0) + n
        for k, v in sums.items():
            iv.setdefault("sums", {})[k] = iv.get("sums", {}).get(k, 0) + v
        if grad_norm is not None:
            iv["grad_norm"] = grad_norm

    def _log_train(self, interval_time: float) -> None:
        iv, self._interval = self._interval, {}
        if not iv:
            return
        names = sorted(iv.get("sums", {}))
        packed = torch.stack(
            [iv["loss_sum"].float(), torch.tensor(float(iv["n"]), device=self.device)]
            + [torch.as_tensor(iv["sums"][k], device=self.device).float() for k in names]
        )
        packed = all_reduce_sum_(packed, self.dist).tolist()
        metrics = self.task.metrics(packed[0], packed[1], dict(zip(names, packed[2:], strict=True)))
        record = {
            "step": self.step,
            "epoch": round(self.epoch_float, 4),
            "split": "train",
            "time_s": round(self.train_time_s, 3),
            **metrics,
            "lr": self.last_lr,
            "throughput": packed[1] / max(interval_time, 1e-9),
        }
        if "grad_norm" in iv:
            record["grad_norm"] = iv["grad_norm"]
        # e.g. tensor parallelism: communication vs compute time per step, bytes, MFU
        record.update(self.strategy.log_fields(iv["steps"], interval_time, packed[1]))
        if self.scaler.is_enabled():  # fp16: the dynamic loss scale (halved on overflow, doubled when stable)
            record["loss_scale"] = self.scaler.get_scale()
        self._emit("on_log", record)

    # ----------------------------------------------------------------- evaluation
    def evaluate(self, loader: Iterable) -> dict[str, float]:
        model = self.strategy.eval_model  # FSDP2 / DeepSpeed-3: the sharded module, run on every process
        with self.strategy.evaluating():
            return evaluate(model, self.task, loader, self.device, self.dist, self.autocast)

    def _run_evals(
        self, loaders: dict[str, Iterable], select: bool = False, weights: str | None = None
    ) -> None:
        """Evaluate each split (its metrics become final metrics and a log record); `select`: these are the
        evaluations during training, which train.best_metric selects among; `weights`: which weights the log
        records say were evaluated, when not the current step's (e.g. "ema average")."""
        evaluated: dict[str, float] = {}
        for split, loader in loaders.items():
            metrics = self.evaluate(loader)
            named = {f"{split}/{k}": v for k, v in metrics.items()}
            evaluated.update(named)
            self.final_metrics.update(named)
            record = {
                "step": self.step,
                "epoch": round(self.epoch_float, 4),
                "split": split,
                "time_s": round(self.train_time_s, 3),
                **({"weights": weights} if weights is not None else {}),
                **metrics,
            }
            self._emit("on_log", record)
        self._last_eval_step = self.step
        if select and self.best is not None:
            value = self.best.value_of(evaluated)
            if self.best.improves(value):
                weights = self.strategy.model_state_dict()  # every process takes part (ZeRO gathers)
                self.best.record(self.step, self.epoch_float, value, evaluated, weights, self.dist.is_main)
                if self.dist.multi_process:
                    dist.barrier()  # the file is complete before any process can read it

    def _check_best_metric(self) -> None:
        """Before training: the selected metric is one its split's evaluation reports (one batch is evaluated,
        in eval mode: no random numbers drawn), so a misspelt name fails now, not after the first epoch."""
        model = self.strategy.eval_model
        batch = to_device(next(iter(self.eval_loaders[self.best.split])), self.device)
        was_training = model.training
        model.eval()
        with torch.no_grad(), self.strategy.evaluating(), self.autocast():
            out = self.task.step(model, batch)
        model.train(was_training)
        n = float(max(out.n, 1))
        metrics = self.task.metrics(float(out.loss) * n, n, {k: float(v) for k, v in out.sums.items()})
        try:
            self.best.value_of({f"{self.best.split}/{k}": v for k, v in metrics.items()})
        except ValueError as err:
            raise ConfigError(str(err)) from err

    def _select_best(self) -> None:
        """End of training under train.best_metric: set the model to the best evaluation's weights; their
        evaluated metrics become the run's (the test split is evaluated on them next)."""
        if self.best is None or self.best.step is None:
            return  # nothing was evaluated (or every value was NaN): the last weights stay
        if self.best.step != self.step:
            self.strategy.load_model_state_dict(self.best.weights(self.device))
        self.final_metrics.update(self.best.final_metrics())

    def _apply_average(self) -> None:
        """End of training under train.weight_average: set the model to the averaged weights and evaluate the
        validation splits again on them (their metrics become the run's; the test split is evaluated next)."""
        if self.average is None or self.average.n == 0:
            return  # the run ended before the first averaged step: the last weights stay
        self.strategy.load_model_state_dict(self.average.weights)
        self._run_evals(self.eval_loaders, weights=f"{self.average.kind} average")
        self.final_metrics["average/n"] = float(self.average.n)
        self.final_metrics["average/first_step"] = float(self.average.start_step)

    # ----------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        extra = {"average": self.average.state_dict()} if self.average is not None else {}
        return {
            **extra,
            "trainer": {
                "step": self.step,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "train_time_s": self.train_time_s,
                "units_seen": self.units_seen,
                "total_steps": self.total_steps,
                "world_size": self.dist.world_size,
            },
            "optimizer": self.strategy.optimizer_state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": get_rng_state(),
            "rng_per_rank": self._gather_rng(),
        }

    def _gather_rng(self) -> list[torch.Tensor]:
        """Each process's torch RNG state (dropout masks differ per process), gathered for rank 0 to save."""
        mine = torch.get_rng_state()
        if not self.dist.enabled:
            return [mine]
        # gloo/NCCL move tensors, not Python objects: no pickle crosses processes.
        local = mine.to(self.device)
        gathered = [torch.empty_like(local) for _ in range(self.dist.world_size)]
        dist.all_gather(gathered, local, group=self.dist.group)
        return [g.cpu() for g in gathered]

    def save_checkpoint(self) -> Path | None:
        if self.checkpoint_dir is None:
            return None
        weights = self.strategy.model_state_dict()  # ZeRO: every process takes part in the gather
        for name, p in weights.items():
            if p.is_floating_point() and not torch.isfinite(p).all():
                raise NonFiniteLossError(self._nonfinite_message(f"parameter {name} is not finite"))
        state = self.state()  # every process takes part in the RNG gather
        self._last_ckpt_step = self.step
        path = None
        if self.dist.is_main:
            path = ckpt.save_checkpoint(
                self.checkpoint_dir,
                self.step,
                weights,
                state,
                keep=self.cfg.keep_checkpoints,
            )
            self._emit("on_checkpoint", path)
        if self.dist.multi_process:
            dist.barrier()
        return path

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's full weights (under ZeRO every process must call this: it gathers)."""
        return self.strategy.model_state_dict()

    def restore(self, path: Path) -> None:
        model_state, state = ckpt.load_checkpoint(path, map_location=self.device)
        try:
            self.strategy.load_model_state_dict(model_state)
            self.strategy.load_optimizer_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise ckpt.CheckpointError(
                f"checkpoint {path} does not fit this run's model/optimizer: {err}"
            ) from err
        t = state["trainer"]
        if t["total_steps"] != self.total_steps:
            raise ckpt.CheckpointError(
                f"checkpoint {path} belongs to a run of {t['total_steps']} steps; this one has "
                f"{self.total_steps}"
            )
        self.step, self.epoch, self.batch_in_epoch = t["step"], t["epoch"], t["batch_in_epoch"]
        self.train_time_s, self.units_seen = t["train_time_s"], t["units_seen"]
        self._last_ckpt_step = self.step
        set_rng_state(state["rng"])
        per_rank = state.get("rng_per_rank", [])
        if t["world_size"] == self.dist.world_size and self.dist.rank < len(per_rank):
            torch.set_rng_state(per_rank[self.dist.rank].to("cpu", torch.uint8))
        if self.best is not None:
            self.best.resume(self.step)
        if self.average is not None:
            self._resume_average(path, state)

    def _resume_average(self, path: Path, state: dict[str, Any]) -> None:
        if "average" in state:
            try:
                self.average.load_state_dict(state["average"])
            except (ValueError, KeyError, TypeError) as err:
                raise ckpt.CheckpointError(
                    f"checkpoint {path}: {err}; resume with the settings the run was started with"
                ) from err
        elif self.step >= self.average.start_step:
            raise ckpt.CheckpointError(
                f"checkpoint {path} (step {self.step}) was written without train.weight_average, after the "
                f"step this run starts averaging at ({self.average.start_step}): the average of the steps "
                "before it cannot be rebuilt. Resume without train.weight_average, or start a new run"
            )

    # ----------------------------------------------------------------- the loop
    def _due(self, every: int, epoch_end: bool) -> bool:
        if every < 0:
            return False
        return (every == 0 and epoch_end) or (every > 0 and self.step % every == 0)

    def _time_is_up(self) -> bool:
        # Clocks differ between processes: stop when any of them is out of time, all at the same step.
        flag = torch.tensor(float(self.train_time_s >= self.cfg.max_time_s), device=self.device)
        if self.dist.multi_process:  # all processes, tensor-parallel ones included
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def fit(self, resume: bool = False) -> dict[str, float]:
        """Train to the configured end (or resume to it) and return the final metrics ("split/name")."""
        if resume and self.checkpoint_dir is not None:
            path = ckpt.latest_checkpoint(self.checkpoint_dir)
            if path is not None:
                self.restore(path)
        if self.best is not None:
            self._check_best_metric()
        self._emit("on_train_start")
        try:
            self._loop()
            if self._last_eval_step != self.step:
                self._run_evals(self.eval_loaders, select=True)
            if self.best is not None or self.average is not None:
                if self.cfg.checkpoint_every >= 0 and self._last_ckpt_step != self.step:
                    self.save_checkpoint()  # the last step's weights, before the selected ones replace them
                self._select_best()
                self._apply_average()
            self._run_evals(self.final_loaders)  # the test set: once, at the end
            if self.cfg.checkpoint_every >= 0 and self._last_ckpt_step != self.step:
                self.save_checkpoint()  # so that --resume of a finished run has nothing left to do
            # The whole model on every process (ZeRO-3 / FSDP2 / DeepSpeed gather it), for decoding and saving
            self.raw_model = self.strategy.finish()
        finally:
            self._emit("on_train_end")
        return dict(self.final_metrics)

    def _loop(self) -> None:
        interval_start = self.train_time_s
        while self.step < self.total_steps and not self.should_stop:
            self.train_loader.set_epoch(self.epoch)
            tick = time.perf_counter()
            for batch in self.train_loader.iter_from(self.batch_in_epoch):
                out = self.train_step(batch)
                self.step += 1
                self.batch_in_epoch += 1
                if self.average is not None and self.average.due(self.step):
                    self.average.update(self.strategy.model_state_dict())  # every process (ZeRO-3 gathers)
                self.units_seen += out.n
                epoch_end = self.batch_in_epoch == self.steps_per_epoch
                if epoch_end:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # honest step times
                now = time.perf_counter()
                self.train_time_s += now - tick
                self._emit("on_step_end", out.loss.item())
                done = self.step >= self.total_steps
                if self.step % self.cfg.log_every == 0 or done or epoch_end:
                    self._log_train(self.train_time_s - interval_start)
                    interval_start = self.train_time_s
                if self._due(self.cfg.eval_every, epoch_end) or done:
                    self._run_evals(self.eval_loaders, select=True)
                if self.cfg.max_time_s is not None and self._time_is_up():
                    self.should_stop, self.stop_reason = True, "max_time"
                if not done and self._due(self.cfg.checkpoint_every, epoch_end):
                    self.save_checkpoint()
                tick = time.perf_counter()
                if done or self.should_stop or epoch_end:
                    break
        if self.stop_reason is None:
            self.stop_reason = "callback" if self.should_stop else "max_steps"
