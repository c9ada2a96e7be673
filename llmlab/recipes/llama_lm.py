"""Stage 7 recipe `llama-pretrain`: a small LLaMA (llmlab/models/llama.py) pre-trained on the four classical
Chinese novels, the model `llama-lora` adapts to the Tang poems.

Everything but the architecture is `gpt-pretrain`'s (llmlab/recipes/gpt_lm.py): the same corpus and
contiguous validation split, the character tokenizer stage 6 chose by measurement (docs/results.md,
Stage 6), random training windows, CausalLMTask, the one Trainer, samples in the report; `llmlab generate`,
`llmlab serve` and `llmlab memory` take its runs as they take a GPT's. The CPU preset is sized like
gpt-pretrain's (3.0 M parameters, context 128, 3,000 steps of 16 windows) so the two architectures compare at
equal data: LLaMA replaces learned positions by rotary embeddings (no position table), LayerNorm by RMSNorm,
the GELU MLP by SwiGLU (intermediate 512 ≈ 8/3 · 192, the paper's ratio, so the MLP keeps GPT's 8d² weights),
and uses grouped-query attention (4 query heads sharing 2 key/value heads) as Llama 2 / 3 do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmlab.models.llama import LlamaConfig
from llmlab.recipes.base import Target
from llmlab.recipes.gpt_lm import ZH_PROMPT, ZH_TOKENIZER, LMConfig, LMDataConfig, LMSampleConfig, _LMRecipe
from llmlab.train.config import OptimConfig, ScheduleConfig, TrainConfig


@dataclass
class LlamaLMConfig(LMConfig):
    """gpt-pretrain's config (data, samples, train, optim, schedule) with a LLaMA as the model."""

    # vocab_size 0: the tokenizer's
    model: LlamaConfig = field(default_factory=lambda: LlamaConfig(vocab_size=0))


def _cpu() -> LlamaLMConfig:
    """gpt-pretrain --preset cpu's data, batch and schedule with a LLaMA of the same size (module docstring):
    hidden 192, 4 layers, 4 heads over 2 key/value heads, SwiGLU 512, context 128, tied embeddings (as
    Llama 3.2 1B; untied, the 6,403 x 192 output table would double the embedding parameters)."""
    return LlamaLMConfig(
        model=LlamaConfig(
            vocab_size=0,
            hidden_size=192,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=True,
        ),  # fmt: skip
        data=LMDataConfig(corpus="chinese_novels", tokenizer=ZH_TOKENIZER, eval_batches=60),
        samples=LMSampleConfig(count=3, prompt=ZH_PROMPT, max_new_tokens=200, temperature=0.8, top_k=200),
        train=TrainConfig(
            batch_size=16,
            max_steps=3000,
            eval_every=500,
            log_every=50,
            checkpoint_every=1000,
            precision="fp32",
            grad_clip=1.0,
        ),  # fmt: skip
        optim=OptimConfig(name="adamw", lr=2e-3, betas=(0.9, 0.99), weight_decay=0.1),
        schedule=ScheduleConfig(name="cosine", warmup_steps=100, min_lr_ratio=0.1),
    )


def _gpu() -> LlamaLMConfig:
    """A 100M-class LLaMA (12 layers, 768 wide, 12 heads over 4 key/value heads, SwiGLU 2,048) on one GPU,
    context 512, Llama 2's optimiser settings (lr 3e-4 with betas (0.9, 0.95), weight decay 0.1, cosine to
    10%). Not measured here (no GPU)."""
    return LlamaLMConfig(
        model=LlamaConfig(
            vocab_size=0,
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=12,
            num_key_value_heads=4,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        ),  # fmt: skip
        data=LMDataConfig(corpus="chinese_novels", tokenizer=ZH_TOKENIZER),
        samples=LMSampleConfig(count=3, prompt=ZH_PROMPT, max_new_tokens=300, temperature=0.8, top_k=200),
        train=TrainConfig(
            batch_size=32, max_steps=4000, eval_every=250, log_every=50, checkpoint_every=1000, grad_clip=1.0
        ),
        optim=OptimConfig(name="adamw", lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1),
        schedule=ScheduleConfig(name="cosine", warmup_steps=200, min_lr_ratio=0.1),
    )


def _smoke() -> LlamaLMConfig:
    cfg = _cpu()
    cfg.model = LlamaConfig(
        vocab_size=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True,
    )  # fmt: skip
    cfg.data = LMDataConfig(corpus="synthetic-zh", tokenizer="char", steps_per_epoch=50)
    cfg.train = TrainConfig(batch_size=16, max_steps=150, eval_every=50, log_every=10, precision="fp32")
    cfg.optim = OptimConfig(name="adamw", lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)
    cfg.schedule = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    cfg.samples = LMSampleConfig(count=1, prompt=ZH_PROMPT, max_new_tokens=60)
    return cfg


class LlamaPretrain(_LMRecipe):
    name = "llama-pretrain"
    dataset = "chinese_novels"
    description = "Stage 7: LLaMA pre-trained on the four classical Chinese novels (adapt it with llama-lora)"
    config_cls = LlamaLMConfig
    presets = {"cpu": _cpu, "gpu": _gpu, "smoke": _smoke}
    default_preset = "cpu"
    preset_help = {
        "cpu": "hidden 192, 4 layers (GQA 4/2 heads), context 128, 3,000 steps on the novels, about 20 "
        "minutes on 2 CPU cores (val loss/char <= 4.9)",
        "gpu": "12 layers, 768 wide, context 512, 4,000 steps on one GPU (not measured yet)",
        "smoke": "synthetic Chinese prose, a tiny LLaMA, seconds (the test suite)",
    }
    targets = {
        # gpt-pretrain's bar (docs/results.md: the trigram's 5.07 nats/char less nanoGPT's margin over it)
        "cpu": Target("val/loss_per_char", 4.9, higher_is_better=False),
        # as gpt-pretrain's smoke: the synthetic prose's entropy is ~1.45 nats/character
        "smoke": Target("val/loss", 2.0, False),
    }
