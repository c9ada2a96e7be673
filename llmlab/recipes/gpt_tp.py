"""Stage 8 recipe `gpt-tp`: the stage-6 GPT trained with Megatron-style tensor parallelism × data parallelism
under torchrun, logging throughput, MFU and the communication it costs.

    torchrun --nproc_per_node 4 -m llmlab run gpt-tp --preset cpu parallel.tp=2      # TP 2 × DP 2

`parallel.tp` ranks hold the parts of one model (llmlab/parallel/tp_gpt.py: heads and MLP columns split,
vocabulary-parallel embedding and cross-entropy); the world size / tp replicas each read their own share of
the global batch (`train.batch_size` stays the global batch: the same run under any layout). `parallel.engine`
picks who splits the model: `ours` (llmlab/parallel, from scratch) or `dtensor` — PyTorch's own tensor
parallelism (`parallelize_module` with ColwiseParallel / RowwiseParallel on the same GPT's q/k/v, output and
MLP projections; embedding and head replicated, plain cross-entropy), so a user who outgrows the lab keeps the
recipe and swaps the engine. Both run through the one Trainer (llmlab/train/strategy_tp.py).

Every log line carries tokens/s, the model FLOP/s per device and MFU (llmlab/train/flops.py: peak detected
or `parallel.peak_tflops`), seconds per step in TP and DP collectives and in compute, and the TP bytes
all-reduced against the count the Megatron paper gives; the report draws compute against communication per
step. Checkpoints and the final model.safetensors are the single-device GPT's weights, so `llmlab generate`,
`gpt-finetune` and the HF converter take a TP run like any gpt-pretrain run.

Presets: `smoke` (synthetic text, seconds), `cpu` (TinyShakespeare, sized for 2 and 4 gloo processes on a
laptop CPU: a few hundred steps), `default` (GPT-2 small, 124M, GPT-2's BPE on TinyShakespeare, context 1024,
for GPUs).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from llmlab.config import ConfigError
from llmlab.models.gpt import GPT, GPTConfig
from llmlab.recipes.base import BuildContext, Experiment, FinalEvaluation, Target
from llmlab.recipes.gpt_lm import (
    LMConfig,
    LMDataConfig,
    LMSampleConfig,
    SampleSection,
    _LMRecipe,
    lm_experiment,
    load_lm_data,
)
from llmlab.train.config import OptimConfig, ScheduleConfig, TrainConfig
from llmlab.train.optim import build_optimizer
from llmlab.train.tasks import CausalLMTask

PARALLEL_FILE = "sections/parallel.md"


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel size; the data-parallel size is the number of processes / tp
    engine: Literal["ours", "dtensor"] = "ours"
    pad_vocab_multiple: int = 128  # the vocabulary is padded to a multiple of this (Megatron: 128)
    peak_tflops: float | None = None  # per device, for MFU; None: detected (llmlab/train/flops.py)
    time_comm: bool = True  # time every collective (on CUDA: with a synchronisation before and after)

    def __post_init__(self) -> None:
        if self.engine not in ("ours", "dtensor"):
            raise ValueError(f"engine={self.engine!r}: ours or dtensor")
        if self.tp < 1 or self.pad_vocab_multiple < 1:
            raise ValueError("tp and pad_vocab_multiple must be >= 1")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError("peak_tflops must be > 0")


@dataclass
class TPLMConfig(LMConfig):
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


# ------------------------------------------------------------------------------------------------- presets
def _smoke() -> TPLMConfig:
    return TPLMConfig(
        model=GPTConfig(vocab_size=0, block_size=32, n_layer=2, n_head=4, n_embd=32, activation="gelu"),
        data=LMDataConfig(corpus="synthetic", steps_per_epoch=50, eval_batches=4),
        samples=LMSampleConfig(count=1, max_new_tokens=40),
        train=TrainConfig(
            batch_size=16,
            max_steps=100,
            eval_every=50,
            log_every=10,
            checkpoint_every=50,
            precision="fp32",
            grad_clip=1.0,
        ),  # fmt: skip
        optim=OptimConfig(name="adamw", lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1),
        schedule=ScheduleConfig(name="cosine", warmup_steps=5, min_lr_ratio=0.1),
    )


def _cpu() -> TPLMConfig:
    """TinyShakespeare, characters, nanoGPT's CPU width (4 layers of 128) with 8 heads (so TP 2 and 4 split
    them) and context 128, batches of 16 windows (2,048 tokens), 300 steps: a few minutes under 1, 2 or 4
    gloo processes on a 2-core CPU (docs/results.md, Stage 8)."""
    return TPLMConfig(
        model=GPTConfig(vocab_size=0, block_size=128, n_layer=4, n_head=8, n_embd=128, activation="gelu"),
        data=LMDataConfig(corpus="tinyshakespeare", tokenizer="char", eval_batches=20),
        samples=LMSampleConfig(count=1, max_new_tokens=200),
        train=TrainConfig(
            batch_size=16,
            max_steps=300,
            eval_every=100,
            log_every=25,
            checkpoint_every=100,
            precision="fp32",
            grad_clip=1.0,
        ),  # fmt: skip
        optim=OptimConfig(name="adamw", lr=2e-3, betas=(0.9, 0.99), weight_decay=0.1),
        schedule=ScheduleConfig(name="cosine", warmup_steps=30, min_lr_ratio=0.1),
    )


def _default() -> TPLMConfig:
    """GPT-2 small (124M: 12 layers, 12 heads, 768 wide, context 1024, GPT-2's BPE padded to 50,304) on
    TinyShakespeare for GPUs; nanoGPT's GPT-2 optimiser settings. 12 heads allow TP 1, 2 or 4."""
    return TPLMConfig(
        model=GPTConfig(vocab_size=0, block_size=1024, n_layer=12, n_head=12, n_embd=768),
        data=LMDataConfig(corpus="tinyshakespeare", tokenizer="gpt2", eval_batches=20),
        samples=LMSampleConfig(count=1, max_new_tokens=200),
        train=TrainConfig(
            batch_size=32, max_steps=1000, eval_every=250, log_every=10, checkpoint_every=500, grad_clip=1.0
        ),  # fmt: skip
        optim=OptimConfig(name="adamw", lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1),
        schedule=ScheduleConfig(name="cosine", warmup_steps=100, min_lr_ratio=0.1),
    )


# ------------------------------------------------------------------------------------------------- task
class VocabParallelLMTask(CausalLMTask):
    """CausalLMTask for a model whose logits are split by vocabulary (`model.tp`): the loss and the argmax
    over all ranks' slices (llmlab/parallel/cross_entropy.py). A whole model (no `tp`): the plain path."""

    def step(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> Any:
        from llmlab.parallel.cross_entropy import vocab_parallel_argmax, vocab_parallel_cross_entropy
        from llmlab.train.tasks import StepOutput

        tp = getattr(model, "tp", None)
        if tp is None:
            return super().step(model, batch)
        x, y = batch[0], batch[1]
        logits = model(x)  # [B, T, V_pad/p]
        loss = vocab_parallel_cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), tp).mean()
        correct = vocab_parallel_argmax(logits.detach(), tp).eq(y).sum().float()
        return StepOutput(loss=loss, n=y.numel(), sums={"correct": correct})


# ------------------------------------------------------------------------------------------------- engines
def parallelize_dtensor(model: GPT, mesh: Any) -> GPT:
    """PyTorch's tensor parallelism on the same GPT: q/k/v and c_fc column-wise, out_proj and c_proj
    row-wise (torch.distributed.tensor.parallel), each attention running on its n_head/p local heads; the
    embeddings, LayerNorms and head stay replicated."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    p = mesh.size()
    plan = {}
    for i, block in enumerate(model.transformer.h):
        for name in ("q_proj", "k_proj", "v_proj"):
            plan[f"transformer.h.{i}.attn.{name}"] = ColwiseParallel()
        plan[f"transformer.h.{i}.attn.out_proj"] = RowwiseParallel()
        plan[f"transformer.h.{i}.mlp.c_fc"] = ColwiseParallel()
        plan[f"transformer.h.{i}.mlp.c_proj"] = RowwiseParallel()
        block.attn.num_heads //= p  # the local heads (as torchtitan's Llama)
        block.attn.embed_dim //= p
        block.attn.fused_qkv = False  # the stacked GEMM would concatenate sharded DTensors
    parallelize_module(model, mesh, plan)
    return model


class TensorParallelGPT(_LMRecipe):
    name = "gpt-tp"
    dataset = "tinyshakespeare"
    description = "Stage 8: GPT-2 with Megatron-style tensor parallelism × data parallelism (torchrun)"
    config_cls = TPLMConfig
    presets = {"default": _default, "cpu": _cpu, "smoke": _smoke}
    default_preset = "cpu"
    preset_help = {
        "default": "GPT-2 small (124M), context 1024, GPT-2 BPE, 1,000 steps: for GPUs (TP 1, 2 or 4)",
        "cpu": "4 layers, 128 wide, 8 heads, context 128, 300 steps: 1, 2 or 4 gloo processes on a CPU",
        "smoke": "synthetic sentences, a tiny model (4 heads: TP 1, 2 or 4), seconds (the test suite)",
    }
    targets = {
        # a throughput preset, 300 steps (nanoGPT's CPU model takes 2,000 to 1.88): measured 2.366 in every
        # layout (docs/results.md, Stage 8); a uniform guess over the 65 characters is 4.17
        "cpu": Target("val/loss", 2.45, higher_is_better=False),
        "smoke": Target("val/loss", 2.0, higher_is_better=False),
    }

    def eval_config(self, cfg: TPLMConfig) -> TPLMConfig:
        """A finished run's weights are the whole GPT: evaluated on one process, not split."""
        return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, tp=1, engine="ours"))

    def check_launch(self, cfg: TPLMConfig, world_size: int) -> None:
        from llmlab.parallel.layout import check_tp_layout

        p = cfg.parallel
        check_tp_layout(p.tp, world_size, cfg.model.n_head, cfg.model.n_embd, p.pad_vocab_multiple)
        if p.tp > 1 and cfg.model.dropout > 0:
            raise ConfigError(
                f"model.dropout={cfg.model.dropout} with parallel.tp={p.tp}: dropout inside the "
                "tensor-parallel region needs a per-rank random stream (Megatron's RNG tracker), not "
                "implemented: set model.dropout=0"
            )
        if cfg.train.strategy != "ddp":
            raise ConfigError(
                f"train.strategy={cfg.train.strategy}: gpt-tp averages gradients over the data-parallel "
                "group itself (train.strategy=ddp); ZeRO / FSDP / DeepSpeed on top of TP are not supported"
            )

    def build(self, cfg: TPLMConfig, ctx: BuildContext) -> Experiment:
        from llmlab.parallel.collectives import CommMeter
        from llmlab.parallel.layout import build_layout
        from llmlab.parallel.tp_gpt import padded_vocab_size, parallelize_gpt
        from llmlab.train.flops import gpt_flops_per_token, peak_flops
        from llmlab.train.trainer import resolve_precision

        p = cfg.parallel
        self.check_launch(cfg, ctx.dist.world_size)
        data = load_lm_data(cfg.data, ctx)
        if cfg.model.vocab_size not in (0, data.tokenizer.vocab_size):
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size}: leave it 0 (the tokenizer's)")
        model_cfg = dataclasses.replace(cfg.model, vocab_size=data.tokenizer.vocab_size)
        model = GPT(model_cfg)  # the same initial weights on every rank (the runner seeded them all alike)
        meter = CommMeter(synchronize=p.time_comm) if p.time_comm else None
        layout = build_layout(ctx.dist, p.tp, ctx.device, meter, need_mesh=p.engine == "dtensor")
        data_env = layout.data_env(ctx.dist)
        precision = resolve_precision(cfg.train.precision, ctx.device)
        peak, peak_source = peak_flops(ctx.device, precision, p.peak_tflops)
        section = _TPSection(SampleSection(data.tokenizer, cfg), p, layout, peak_source)
        exp = lm_experiment(cfg, dataclasses.replace(ctx, dist=data_env), model, data, model_cfg.block_size,
                            section)  # fmt: skip
        v_pad = padded_vocab_size(model_cfg.vocab_size, p.pad_vocab_multiple)
        if p.engine == "ours":
            parallelize_gpt(model, layout.tp, p.pad_vocab_multiple)
            exp.task = VocabParallelLMTask(chars_per_token=data.chars_per_token)
            exp.load_model = _load_whole  # `llmlab eval`: the saved whole GPT into this (TP 1) model
        else:
            parallelize_dtensor(model, layout.mesh["tp"])
        model.parallel_layout = layout
        model.flops_per_token = gpt_flops_per_token(
            model_cfg.n_layer, model_cfg.n_embd, model_cfg.vocab_size, model_cfg.block_size
        )
        model.peak_flops = peak
        optim = cfg.optim
        if p.engine == "dtensor":  # torch's fused and foreach AdamW refuse a mix of DTensors and tensors
            if optim.impl not in ("auto", "for-loop"):
                raise ConfigError(
                    f"optim.impl={optim.impl} with parallel.engine=dtensor: use auto or for-loop"
                )
            optim = dataclasses.replace(optim, impl="for-loop")
        exp.optimizer = build_optimizer(model, optim)  # over this rank's parts
        exp.dist = data_env
        exp.notes.append(
            f"Tensor parallelism ({p.engine}): TP {p.tp} × DP {data_env.world_size} over "
            f"{ctx.dist.world_size} process(es); "
            + (
                f"vocabulary {model_cfg.vocab_size:,} padded to {v_pad:,} (a multiple of "
                f"{p.pad_vocab_multiple}; the padding is never a class). "
                if p.engine == "ours"
                else "embedding and head replicated. "
            )  # fmt: skip
            + f"Model FLOPs per token {model.flops_per_token / 1e6:.1f} M; peak per device: {peak_source}."
        )
        return exp


def _load_whole(model: nn.Module, run_dir: Path) -> None:
    """A run's model.safetensors (the whole GPT's weights) into a tensor-parallel GPT's part."""
    from llmlab.parallel.tp_gpt import load_full_state_dict
    from llmlab.train.checkpoint import CheckpointError, load_weights

    weights = load_weights(run_dir / "model.safetensors")
    try:
        load_full_state_dict(model, {k: v.to(next(model.parameters()).device) for k, v in weights.items()})
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(f"{run_dir}: the weights do not fit the run's model config: {err}") from err


class _TPSection:
    """`final_eval`: the samples, and the report section on compute vs communication per step."""

    def __init__(self, samples: SampleSection, p: ParallelConfig, layout: Any, peak_source: str) -> None:
        self.samples, self.p, self.layout, self.peak_source = samples, p, layout, peak_source

    def __call__(self, model: nn.Module, splits: list[str], run_dir: Path | None) -> FinalEvaluation:
        out = self.samples(model, splits, run_dir)
        if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
            return out
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        rows = [r for r in rows if r.get("split") == "train" and "compute_s" in r]
        from llmlab.fileio import atomic_write_text

        (run_dir / "sections").mkdir(exist_ok=True)
        if not rows:  # DTensor's collectives run inside torch; parallel.time_comm=false times none
            t, d = self.layout.tp.size, self.layout.dp.size
            why = (
                "PyTorch's DTensor runs the TP collectives inside its operators, so their time is not "
                "separated from compute"
                if self.p.engine == "dtensor"
                else "parallel.time_comm=false: the collectives were not timed"
            )
            atomic_write_text(
                run_dir / PARALLEL_FILE,
                f"## Tensor parallelism\n\nTP {t} × DP {d} (engine {self.p.engine}): {why}; tokens/s and MFU "
                "are in the train log lines (parallel.engine=ours times each collective).\n",
            )
            return out
        from llmlab.report.parallel_plot import plot_comm_compute

        plot_comm_compute(rows, run_dir / "parallel.png")
        last = rows[-1]
        keys = ("step_s", "compute_s", "comm_tp_s", "comm_dp_s", "comm_share", "throughput")
        mean = {k: sum(r.get(k, 0.0) for r in rows) / len(rows) for k in keys}
        lines = [
            "## Tensor parallelism: compute and communication",
            "",
            f"TP {self.layout.tp.size} × DP {self.layout.dp.size} (engine {self.p.engine}). Per training "
            f"step, averaged over the {len(rows)} logged intervals: {mean['step_s'] * 1e3:.1f} ms, of which "
            f"compute {mean['compute_s'] * 1e3:.1f} ms, TP collectives {mean['comm_tp_s'] * 1e3:.1f} ms, DP "
            f"all-reduce {mean['comm_dp_s'] * 1e3:.1f} ms (communication share {mean['comm_share']:.1%}); "
            f"{mean['throughput']:,.0f} tokens/s.",
            "",
        ]
        if "tp_allreduce_bytes_theory" in last and self.layout.tp.size > 1:
            lines.append(
                f"TP all-reduce bytes per step and rank: measured {last['tp_allreduce_bytes']:,.0f}; this "
                f"model's exact count {last['tp_allreduce_bytes_theory']:,.0f}; the Megatron paper's "
                f"4 × layers × b·s·h {last['tp_allreduce_bytes_megatron']:,.0f} (the rest: the "
                "vocabulary-parallel embedding and head, and the loss's reductions)."
            )
            lines.append("")
        if "mfu" in last:
            lines.append(
                f"MFU {last['mfu']:.2%} ({last['tflops_per_device'] * 1e3:,.2f} model GFLOP/s per device; "
                f"peak: {self.peak_source})."
            )
            lines.append("")
        lines.append("![compute and communication per step](parallel.png)")
        atomic_write_text(run_dir / PARALLEL_FILE, "\n".join(lines) + "\n")
        return out
