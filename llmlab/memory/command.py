"""`llmlab memory RECIPE [--preset P] [key=value ...] [--ranks N]`: the per-rank memory a run of a GPT recipe
will need, predicted from its resolved config before anything is allocated — parameters, gradients and
optimizer states by the ZeRO paper's accounting (Rajbhandari et al. 2020, §5) for the configured strategy,
activations per layer after Korthikanti et al. 2022 (§4) — and the same for every strategy, with and without
activation checkpointing, side by side; `--out DIR` adds a bar chart (memory.png), the tables (memory.md)
and the numbers (memory_prediction.json).

The model is built on the meta device (shapes only), so predicting GPT-2 124M or larger allocates nothing. A
vocabulary left at 0 in the config (the tokenizer's) is read from the recipe's tokenizer, as a run would.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmlab.config import ConfigError
from llmlab.memory.predict import MemoryPrediction, StateLayout, layout_for, predict_memory
from llmlab.memory.report import CHART_FILE, comparison_table, components_table, terms_table, write_bar_chart

__all__ = ["MemoryRequest", "memory_command"]

OURS = ("ddp", "zero1", "zero2", "zero3")  # each with and without activation checkpointing
ENGINES = ("fsdp2", "deepspeed0", "deepspeed1", "deepspeed2", "deepspeed3")


@dataclass
class MemoryRequest:
    recipe: str
    preset: str | None = None
    overrides: Sequence[str] = ()
    ranks: int = 1
    rank: int = 0
    device: str = "auto"  # cpu, cuda, or auto (cuda when this machine has one)
    out: Path | None = None
    data_dir: Path | None = None


def _vocab_size(cfg: Any, data_dir: Path | None) -> int:
    """The config's vocab_size, or (0: the tokenizer's) the size of the tokenizer the recipe would build."""
    if cfg.model.vocab_size > 0:
        return cfg.model.vocab_size
    import torch

    from llmlab.recipes.base import BuildContext
    from llmlab.recipes.gpt_lm import load_lm_data

    data = load_lm_data(cfg.data, BuildContext(device=torch.device("cpu"), data_dir=data_dir))
    return data.tokenizer.vocab_size


def _optimizer(cfg: Any) -> tuple[str, float]:
    name = getattr(getattr(cfg, "optim", None), "name", "adamw")
    if name in ("sgd", "manual_sgd"):
        return "sgd", cfg.optim.momentum
    return name, 0.0


def _precision(precision: str, device: str) -> str:
    if precision != "auto":
        return precision
    return "bf16" if device == "cuda" else "fp32"  # the Trainer's auto (fp16 on GPUs without bf16)


def _micro_batch(train: Any, ranks: int) -> int:
    if getattr(train, "batch_unit", "samples") != "samples":
        raise ConfigError("llmlab memory needs train.batch_unit=samples (sequences per batch)")
    if train.batch_size % ranks:
        raise ConfigError(f"train.batch_size={train.batch_size} does not divide over --ranks {ranks}")
    per_rank = train.batch_size // ranks
    return -(-per_rank // train.grad_accum)  # the largest micro-batch of the rank's share


def memory_command(req: MemoryRequest) -> str:
    """The text `llmlab memory` prints (and, with `out`, the files it writes)."""
    from llmlab.models.causal_lm import LM_CONFIGS
    from llmlab.runner import resolve_config

    recipe, cfg, preset = resolve_config(req.recipe, req.preset, list(req.overrides))
    if not isinstance(getattr(cfg, "model", None), LM_CONFIGS) or not hasattr(cfg, "train"):
        raise ConfigError(
            f"llmlab memory models the language-model recipes (GPT-2, LLaMA; activations derived for "
            f"llmlab/models/gpt.py); {recipe.name!r} is not one"
        )
    if req.ranks < 1 or not 0 <= req.rank < req.ranks:
        raise ConfigError(f"--rank {req.rank} must be in [0, --ranks {req.ranks})")
    if req.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device {req.device!r}: auto, cpu or cuda")
    device = req.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    train = cfg.train
    try:
        layout = layout_for(train.strategy, getattr(train, "ds_stage", 2), getattr(train, "offload", "none"))
    except ValueError as err:
        raise ConfigError(f"train.strategy: {err}") from err
    strategy = layout.strategy
    model_cfg = dataclasses.replace(cfg.model, vocab_size=_vocab_size(cfg, req.data_dir))
    precision = _precision(train.precision, device)
    opt, momentum = _optimizer(cfg)
    micro = _micro_batch(train, req.ranks)

    def predict(strategy: str | StateLayout, checkpointing: bool) -> MemoryPrediction:
        return predict_memory(
            model_cfg, micro_batch=micro, precision=precision, device=device, strategy=strategy,
            ranks=req.ranks, rank=req.rank, checkpointing=checkpointing, optimizer=opt,  # type: ignore[arg-type]
            momentum=momentum,
        )  # fmt: skip

    main = predict(layout, train.activation_checkpointing)
    labelled = [(s + (" +ckpt" if ck else ""), predict(s, ck)) for ck in (False, True) for s in OURS]
    labelled += [(s, predict(s, False)) for s in ENGINES]
    from llmlab.models.causal_lm import describe_lm

    m = model_cfg
    head = (
        f"{recipe.name} --preset {preset}: {describe_lm(m)}, vocab {m.vocab_size:,}: "
        f"Ψ = {main.n_params:,} parameters\n"
        f"per rank: micro-batch {micro} × {m.block_size} tokens (batch {train.batch_size} over {req.ranks} "
        f"rank(s), grad_accum {train.grad_accum}), {precision} on {device}, {m.attention} attention, "
        f"dropout {getattr(m, 'dropout', getattr(m, 'attention_dropout', 0.0)):g}, "
        f"checkpointing {'on' if train.activation_checkpointing else 'off'}, {opt}; "
        f"strategy {strategy}, rank {req.rank} of {req.ranks}"
    )
    notes = "".join(f"\n- {n}" for n in main.states.notes)
    text = "\n\n".join(
        [
            head,
            f"## This run ({strategy})\n\n{components_table(main)}{notes}",
            "## Activations (Korthikanti et al. 2022 §4, redone for llmlab/models/gpt.py)\n\n"
            + terms_table(main),
            f"## Across strategies, {req.ranks} rank(s)\n\n{comparison_table(labelled)}\n\n"
            "ddp, zero1-3 (ours) and fsdp2 train under torch autocast, which keeps fp32 weights and "
            "gradients: 4Ψ + 4Ψ + KΨ (K = 8 for Adam), divided by stage; +ckpt: activation checkpointing. "
            "deepspeed0-3 in bf16/fp16 hold what the ZeRO paper counts: 2Ψ + 2Ψ + 12Ψ (fp32 master weights "
            "and Adam's moments), divided by stage. fsdp2 and deepspeed are the model of those engines "
            "(unmeasured here); activations of deepspeed's 16-bit weights are taken as autocast's.",
        ]
    )
    if req.out is not None:
        out = Path(req.out)
        out.mkdir(parents=True, exist_ok=True)
        title = f"{recipe.name} --preset {preset}: Ψ = {main.n_params / 1e6:.1f}M, {precision}, N={req.ranks}"
        write_bar_chart(out / CHART_FILE, labelled, title)
        (out / "memory.md").write_text(text + "\n", encoding="utf-8")
        record = {"this_run": main.to_dict(), "strategies": {k: p.to_dict() for k, p in labelled}}
        (out / "memory_prediction.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        text += f"\n\n(written to {out / CHART_FILE}, {out / 'memory.md'}, {out / 'memory_prediction.json'})"
    return text
