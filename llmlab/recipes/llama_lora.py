"""Stage 7 recipe `llama-lora`: adapt a pretrained LLaMA to another text with LoRA, QLoRA or full fine-tuning.

`finetune.method`:
- "lora" (Hu et al. 2021): every weight of the init frozen, LoRA factors (llmlab/nn/lora.py, `lora.*`: rank
  r, alpha, target modules, dropout, rsLoRA) trained on the layers `lora.target_modules` names;
- "qlora" (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"): the same, on a base whose
  linear layers are stored in 4-bit NF4 (llmlab/nn/quant.py; block 64, double quantization of the block
  scales by default) and dequantized on the fly; the embedding and the (tied) output layer stay in float, as
  bitsandbytes / PEFT leave them;
- "full": every parameter trained, the baseline LoRA is measured against.

Everything else is `gpt-finetune`'s (llmlab/recipes/gpt_finetune.py, the one fine-tuning pipeline): the init
(`init_from=`: an llmlab run of `llama-pretrain`, an HF Llama directory, or a Hub id such as
meta-llama/Llama-2-7b-hf), the target text and how it meets the init's vocabulary, the val figures and
samples before fine-tuning, the one Trainer. LoRA runs save **only the adapter**: `RUN/adapter/` in PEFT's
format (`adapter_config.json` + `adapter_model.safetensors`, q/k rows in HF's layout, so
`peft.PeftModel.from_pretrained(<the init as an HF LlamaForCausalLM>, RUN/adapter)` gives this run's model),
with the sha256 of the init's target weights recorded; `finetune.export_merged=true` also writes
`RUN/merged/`, an HF LlamaForCausalLM directory with the update merged into float32 weights (for QLoRA: the
dequantized base plus the update, which is exactly the trained model). `llmlab eval` / `generate` / a later
fine-tune rebuild the model from the init and the adapter (the init must still exist and is checked).

Merging into a quantized base (QLoRA's trap, PEFT issues #1008, #2105): W_nf4 ← NF4(deq(W_nf4) + s·BA) rounds
the update to the 4-bit grid, whose step near a weight is ~absmax/8 of its block — larger than most entries
of a small update. A QLoRA run measures it at the end: the val loss of the model merged and re-quantized
(`val/loss_merged_nf4`) next to the unmerged one (`val/loss`), and ‖NF4(W+ΔW) − (W+ΔW)‖ / ‖ΔW‖ over the
adapted layers (`merge/nf4_error_over_update`): above ~1 the re-quantization error is as large as the update.

The vocabulary: the novels' character set lacks 27% of the Tang poems' characters, which are traditional;
the preset converts the poems to simplified characters (`data.convert=t2s`, OpenCC), after which 1.3% are
still unknown (rare variants) and are dropped, so LoRA, QLoRA and full fine-tuning see the same text and the
embedding needs no new rows (LoRA would leave new rows frozen: `data.unknown_chars=extend` is refused for it).

Preset `zh-poetry` (the `llama-pretrain --preset cpu` model → the Tang poems):

    llmlab run llama-lora --preset zh-poetry init_from=RUN_DIR [finetune.method=qlora|full] [lora.r=16]
    llmlab sweep llama-lora --preset zh-poetry init_from=RUN_DIR lora.r=1,2,4,8,16,32,64 --seeds 2

`llama2-7b-qlora`: Llama-2-7B from the Hub (meta-llama/Llama-2-7b-hf, gated: accept its licence and log in)
with QLoRA on one GPU, as the QLoRA paper's 7B setting (r 64, alpha 16, dropout 0.1, every linear layer, lr
2e-4, constant schedule); the poems kept in traditional characters (Llama's SentencePiece vocabulary covers
them with byte fallback). Not measured here (no GPU, no Hub).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from llmlab.config import ConfigError
from llmlab.fileio import atomic_dir
from llmlab.models.llama import Llama, LlamaConfig, lora_row_map, save_hf
from llmlab.nn.attention import AttentionImpl
from llmlab.nn.lora import (
    LoRAConfig,
    checksum_of_targets,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    remove_lora,
    save_adapter,
)
from llmlab.nn.quant import NF4Linear, _QuantizedLinear, quantize_model
from llmlab.recipes.base import BuildContext, Experiment, FinalEvaluation, Target
from llmlab.recipes.gpt_finetune import (
    FinetuneDataConfig,
    FinetuneSamples,
    GPTFinetune,
    _saved_init,
)
from llmlab.recipes.gpt_lm import LMSampleConfig
from llmlab.train.config import OptimConfig, ScheduleConfig, TrainConfig

ADAPTER_DIR = "adapter"  # RUN/adapter/: the PEFT adapter, the run's final weights
MERGED_DIR = "merged"  # RUN/merged/: finetune.export_merged, an HF LlamaForCausalLM directory
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_ARCH = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "max_position_embeddings")  # fmt: skip


@dataclass
class LlamaFinetuneModelConfig:
    """The model of a LLaMA fine-tune: the init's architecture. The architecture fields are for
    init_from=scratch (unset: LlamaConfig's defaults) and otherwise may only repeat the init's values;
    attention_dropout (None: the init's) and attention may change."""

    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    max_position_embeddings: int | None = None
    attention_dropout: float | None = None
    attention: AttentionImpl = "fused"


@dataclass
class MethodConfig:
    method: Literal["lora", "qlora", "full"] = "lora"
    nf4_double_quant: bool = True  # qlora: quantize the block scales too (QLoRA §3, 0.37 bits per weight)
    export_merged: bool = False  # also write RUN/merged/ (module docstring)


@dataclass
class LlamaLoRAConfig:
    init_from: str | None = None  # a llama-pretrain run, an HF Llama directory, a Hub id, or "scratch"
    seed: int = 0
    model: LlamaFinetuneModelConfig = field(default_factory=LlamaFinetuneModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    samples: LMSampleConfig = field(default_factory=LMSampleConfig)
    finetune: MethodConfig = field(default_factory=MethodConfig)
    lora: LoRAConfig = field(
        default_factory=lambda: LoRAConfig(r=8, alpha=16, target_modules=list(ALL_LINEAR))
    )
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


# ------------------------------------------------------------------------------------------------- presets
def _zh_poetry() -> LlamaLoRAConfig:
    """The `llama-pretrain --preset cpu` model on the Tang poems in simplified characters: LoRA r 8, alpha 16
    on every linear layer (QLoRA's finding: all layers matter more than the rank), 600 steps of 16 windows of
    128 characters (1.2 M characters, a third of the poems), AdamW lr 2e-3 without weight decay (on LoRA
    factors it pulls the update to zero; QLoRA uses none), cosine to 10%. lr 2e-3 for LoRA and for full
    fine-tuning alike: the pretraining rate, as the sweep's baseline; LoRA's B starts at 0."""
    return LlamaLoRAConfig(
        init_from=None,  # required: the llama-pretrain run directory
        model=LlamaFinetuneModelConfig(attention_dropout=0.0),
        data=FinetuneDataConfig(corpus="tang_poems", convert="t2s", unknown_chars="drop", eval_batches=40),
        samples=LMSampleConfig(count=3, prompt="\n", max_new_tokens=100, temperature=0.8, top_k=200),
        train=TrainConfig(
            batch_size=16,
            max_steps=600,
            eval_every=150,
            log_every=25,
            checkpoint_every=300,
            precision="fp32",
            grad_clip=1.0,
        ),
        optim=OptimConfig(name="adamw", lr=2e-3, betas=(0.9, 0.99), weight_decay=0.0),
        schedule=ScheduleConfig(name="cosine", warmup_steps=30, min_lr_ratio=0.1),
    )


def _llama2_7b_qlora() -> LlamaLoRAConfig:
    """QLoRA's 7B setting (paper §4 / appendix B.2) on one GPU; not measured here."""
    return LlamaLoRAConfig(
        init_from="meta-llama/Llama-2-7b-hf",
        model=LlamaFinetuneModelConfig(attention_dropout=0.0),
        data=FinetuneDataConfig(corpus="tang_poems", block_size=512, eval_batches=50),
        samples=LMSampleConfig(count=3, prompt="\n", max_new_tokens=100, temperature=0.8, top_k=200),
        finetune=MethodConfig(method="qlora", nf4_double_quant=True),
        lora=LoRAConfig(r=64, alpha=16, dropout=0.1, target_modules=list(ALL_LINEAR)),
        train=TrainConfig(
            batch_size=16,
            max_steps=1000,
            eval_every=250,
            log_every=10,
            checkpoint_every=250,
            precision="bf16",
            grad_clip=0.3,
            activation_checkpointing=True,
        ),
        optim=OptimConfig(name="adamw", lr=2e-4, betas=(0.9, 0.999), weight_decay=0.0),
        schedule=ScheduleConfig(name="constant", warmup_steps=30),
    )


def _smoke() -> LlamaLoRAConfig:
    """From scratch (runs alone) on synthetic quatrains; the tests pass init_from=a llama-pretrain smoke."""
    return LlamaLoRAConfig(
        init_from="scratch",
        model=LlamaFinetuneModelConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            attention_dropout=0.0,
        ),  # fmt: skip
        data=FinetuneDataConfig(corpus="synthetic-zh-poems", steps_per_epoch=50),
        samples=LMSampleConfig(count=1, prompt="\n", max_new_tokens=48),
        lora=LoRAConfig(r=4, alpha=8, target_modules=list(ALL_LINEAR)),
        train=TrainConfig(
            batch_size=16, max_steps=100, eval_every=50, log_every=10, precision="fp32", grad_clip=1.0
        ),
        optim=OptimConfig(name="adamw", lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0),
        schedule=ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1),
    )


# ------------------------------------------------------------------------------------------------- recipe
class LlamaLoRA(GPTFinetune):
    name = "llama-lora"
    dataset = "tang_poems"
    description = "Stage 7: adapt a pretrained LLaMA to another text with LoRA, QLoRA (4-bit base) or full FT"
    config_cls = LlamaLoRAConfig
    presets = {"zh-poetry": _zh_poetry, "llama2-7b-qlora": _llama2_7b_qlora, "smoke": _smoke}
    default_preset = "zh-poetry"
    preset_help = {
        "zh-poetry": "init_from=RUN_DIR (a llama-pretrain run) adapted to the Tang poems (simplified), LoRA "
        "r 8 on every linear layer, 600 steps: llmlab run llama-lora --preset zh-poetry init_from=RUN_DIR",
        "llama2-7b-qlora": "Llama-2-7B from the Hub with QLoRA on one GPU (not measured here)",
        "smoke": "synthetic quatrains, a tiny LLaMA from scratch with LoRA, seconds (the test suite)",
    }
    # smoke: LoRA factors on a random tiny model: it gets below the uniform ln 19 = 2.94 towards the
    # quatrains' character frequencies (~2.6; measured 2.66 after the 100 steps), no further in seconds
    targets = {"smoke": Target("val/loss", 2.8, higher_is_better=False)}
    model_config_cls = LlamaConfig
    arch_fields = _ARCH
    pretrain, hf_kind, hub_example = "llama-pretrain", "Llama", "meta-llama/Llama-2-7b-hf"

    def weights_in_run(self, cfg: LlamaLoRAConfig, run_dir: Path | None) -> bool:
        if cfg.finetune.method == "full":
            return super().weights_in_run(cfg, run_dir)
        return False  # an adapter is nothing without its base: the init is always loaded (and checked)

    def scratch_model(self, cfg: LlamaLoRAConfig, vocab_size: int) -> nn.Module:
        arch = {k: getattr(cfg.model, k) for k in _ARCH if getattr(cfg.model, k) is not None}
        dropout = cfg.model.attention_dropout or 0.0
        return Llama(
            LlamaConfig(vocab_size=vocab_size, attention_dropout=dropout, tie_word_embeddings=True, **arch)
        )

    def dropout(self, cfg: LlamaLoRAConfig) -> float | None:
        return cfg.model.attention_dropout

    def adapt(self, model: nn.Module, cfg: LlamaLoRAConfig, ctx: BuildContext, record: dict):
        method, total = cfg.finetune.method, model.n_params
        if method == "full":
            return model, [f"Full fine-tuning: all {total:,} parameters are trained."]
        if cfg.data.unknown_chars == "extend":
            raise ConfigError(
                f"data.unknown_chars=extend with finetune.method={method}: the new embedding rows would "
                "stay frozen at their initial mean (LoRA trains only its factors). Use "
                "data.unknown_chars=drop (and data.convert=t2s for traditional characters), or "
                "finetune.method=full"
            )
        try:
            checksum = checksum_of_targets(model, cfg.lora.target_modules)
        except ValueError as err:
            raise ConfigError(f"lora.target_modules: {err}") from err
        saved = _saved_init(ctx.run_dir)
        if saved is not None and saved.get("base_sha256") not in (None, checksum):
            raise ConfigError(
                f"init_from={cfg.init_from}: its weights changed since this run started (sha256 of the "
                f"adapted layers {checksum[:12]}..., recorded {saved['base_sha256'][:12]}...): the adapter "
                "belongs to the old ones"
            )
        record["base_sha256"] = checksum
        record["base_params"] = total
        model.requires_grad_(False)
        notes = []
        if method == "qlora":
            double = cfg.finetune.nf4_double_quant
            names = quantize_model(model, "nf4", skip=["lm_head"], double_quant=double)
            notes.append(
                f"QLoRA: {len(names)} linear layers stored in NF4 (block 64"
                + (", double-quantized scales" if double else "")
                + "), dequantized on the fly; embedding, norms and the output layer in float32."
            )
        inject_lora(model, cfg.lora, linear_types=_linear_types(method))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        targets = cfg.lora.target_modules
        what = ", ".join(targets) if isinstance(targets, list) else f"the regex {targets!r}"
        notes.append(
            f"LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha:g} (scale {cfg.lora.scaling:g}"
            f"{', rsLoRA' if cfg.lora.use_rslora else ''}), dropout {cfg.lora.dropout:g}, on {what} "
            f"({len(list(lora_layers(model)))} layers): {trainable:,} trainable parameters, "
            f"{trainable / total:.2%} of the model's {total:,}; the base is frozen."
        )
        return model, notes

    def final_section(self, tok: Any, cfg: LlamaLoRAConfig, pretrained: bool) -> LoRASection:
        return LoRASection(tok, cfg, pretrained)

    def finish(self, exp: Experiment, cfg: LlamaLoRAConfig, ctx: BuildContext, record: dict) -> None:
        method = cfg.finetune.method
        section = exp.final_eval
        section.task, section.device = exp.task, ctx.device
        # the merge measurement runs on the main process alone: with several, its val share is partial
        section.val_loader = exp.eval_loaders["val"] if ctx.dist.world_size == 1 else None
        section.base_params = record.get("base_params")

        def save(model: nn.Module, run_dir: Path) -> None:
            if method == "full":
                from llmlab.train.checkpoint import save_weights

                meta = {"recipe": self.name, "method": method}
                save_weights(run_dir / "model.safetensors", model.state_dict(), metadata=meta)
            else:
                write_adapter(model, run_dir / ADAPTER_DIR, cfg, record["source"], record["base_sha256"])
            if cfg.finetune.export_merged:
                export_merged(model, run_dir / MERGED_DIR)

        exp.save_model = save
        exp.load_model = lambda model, run_dir: self._load(model, run_dir, cfg)

    def _load(self, model: nn.Module, run_dir: Path, cfg: LlamaLoRAConfig) -> None:
        """The run's final weights into the model `build` made (LoRA runs: its adapter over the init)."""
        from llmlab.train.checkpoint import load_run_weights

        adapter = run_dir / ADAPTER_DIR
        if cfg.finetune.method == "full" or not adapter.is_dir():
            load_run_weights(
                run_dir, model
            )  # model.safetensors, or the latest checkpoint of an unfinished run
            return
        from llmlab.train.checkpoint import CheckpointError

        remove_lora(model, merge=False)
        method = cfg.finetune.method
        try:
            load_adapter(
                model, adapter, check_base=method == "lora", linear_types=_linear_types(method),
                row_map=lora_row_map(model.cfg),
            )  # fmt: skip
        except (ValueError, OSError) as err:  # a damaged or foreign adapter: refused, nothing half-loaded
            raise CheckpointError(f"{run_dir}: its adapter cannot be loaded: {err}") from err

    def load_trained(self, run_dir: Path, cfg: LlamaLoRAConfig, tok: Any) -> nn.Module:
        """The init rebuilt, this run's adapter loaded and merged: one plain float32 LLaMA."""
        exp = self.build(cfg, BuildContext(device=torch.device("cpu"), run_dir=Path(run_dir)))
        self._load(exp.model, Path(run_dir), cfg)
        return merged_float(exp.model)


def _linear_types(method: str) -> tuple[type[nn.Module], ...]:
    return (NF4Linear,) if method == "qlora" else (nn.Linear,)


def write_adapter(
    model: nn.Module, out: Path, cfg: LlamaLoRAConfig, source: str, checksum: str | None
) -> None:
    """The PEFT adapter of `model` at `out`, atomically (written beside, then renamed)."""
    with atomic_dir(out) as tmp:
        save_adapter(
            model, tmp, cfg.lora, base_model_name_or_path=source, base_checksum=checksum,
            linear_types=_linear_types(cfg.finetune.method), row_map=lora_row_map(model.cfg),
        )  # fmt: skip


def merged_float(model: nn.Module) -> nn.Module:
    """A copy of `model` as one plain float LLaMA: quantized layers dequantized, LoRA merged and removed. For
    QLoRA this is exact: the trained model computes deq(W) x + s·BAx = (deq(W) + s·BA) x."""
    model = copy.deepcopy(model)
    for _, layer in lora_layers(model):
        if isinstance(layer.base_layer, _QuantizedLinear):
            layer.base_layer = layer.base_layer.to_linear()
    remove_lora(model, merge=True)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, _QuantizedLinear):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, mod.to_linear())
    model.requires_grad_(True)
    return model


def export_merged(model: nn.Module, out: Path) -> None:
    """RUN/merged/: an HF LlamaForCausalLM directory of the merged float32 model, atomically."""
    with atomic_dir(out) as tmp:
        save_hf(merged_float(model).float(), tmp)


def nf4_merge_error(model: nn.Module) -> float:
    """Mean over the adapted NF4 layers of ‖NF4(W + ΔW) − (W + ΔW)‖_F / ‖ΔW‖_F, W the dequantized base and
    ΔW = s·BA: how much of the update re-quantizing a merged layer loses (1: as much as the update itself)."""
    ratios = []
    for _, layer in lora_layers(model):
        base = layer.base_layer
        if not isinstance(base, NF4Linear):
            continue
        delta = layer.delta_weight().detach().float()  # [out, in]
        exact = base.dequantized_weight(torch.float32) + delta  # [out, in]
        probe = copy.deepcopy(base)
        probe.set_weight(exact)
        err = probe.dequantized_weight(torch.float32) - exact  # [out, in]
        ratios.append((err.norm() / delta.norm().clamp_min(1e-30)).item())
    return sum(ratios) / len(ratios) if ratios else float("nan")


class LoRASection(FinetuneSamples):
    """gpt-finetune's before/after samples, plus the trainable-parameter count and, for QLoRA, what merging
    into the 4-bit base costs (module docstring)."""

    task: Any = None
    val_loader: Any = None
    device: Any = None
    base_params: int | None = None  # the init's parameter count (LoRA runs; full: the model's)

    def __call__(self, model: nn.Module, splits: list[str], run_dir: Path | None) -> FinalEvaluation:
        out = super().__call__(model, splits, run_dir)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = self.base_params or sum(p.numel() for p in model.parameters())
        out.metrics["model/trainable_params"] = float(trainable)
        out.metrics["model/trainable_fraction"] = trainable / total
        if self.cfg.finetune.method == "qlora" and self.val_loader is not None:
            from llmlab.train.trainer import evaluate

            out.metrics["merge/nf4_error_over_update"] = nf4_merge_error(model)
            merged = copy.deepcopy(model)
            merge_lora(merged)  # NF4(deq(W) + s·BA) in every adapted layer
            requant = evaluate(merged.eval(), self.task, self.val_loader, self.device)
            exact = evaluate(merged_float(model).eval(), self.task, self.val_loader, self.device)
            for key in ("loss", "loss_per_char"):
                if key in requant:
                    out.metrics[f"val/{key}_merged_nf4"] = requant[key]
                    out.metrics[f"val/{key}_merged_fp32"] = exact[key]
            out.notes.append(
                f"Merging the adapter into the 4-bit base and re-quantizing: val loss {requant['loss']:.4f} "
                f"vs {exact['loss']:.4f} merged into float32 weights (= the trained model); the "
                f"re-quantization error is {out.metrics['merge/nf4_error_over_update']:.2f}x the update's "
                "norm (mean over layers). Export merged weights in float (finetune.export_merged) rather "
                "than re-quantizing."
            )
        return out
