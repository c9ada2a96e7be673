"""The decoder-only language models of llmlab behind one small interface: GPT-2 (stage 6,
llmlab/models/gpt.py) and LLaMA (stage 7, llmlab/models/llama.py).

Both take token ids [B, T] and return next-token logits [B, T, V], accept the per-layer KV caches of
`new_caches()` (llmlab/nn/sampling.py's generator), switch activation checkpointing per block and list their
blocks as `shard_units()` (ZeRO-3 / FSDP2). What differs is the config: `build_lm` picks the model from its
config's type, so the language-model recipes, `llmlab generate`, `llmlab serve` and `llmlab memory` build
either without naming one.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from llmlab.models.gpt import GPT, GPTConfig
from llmlab.models.llama import Llama, LlamaConfig

__all__ = ["LM_CONFIGS", "build_lm", "describe_lm"]

LM_CONFIGS = (GPTConfig, LlamaConfig)


def build_lm(cfg: Any) -> nn.Module:
    """The model of `cfg` (a GPTConfig or a LlamaConfig, its vocab_size set)."""
    if isinstance(cfg, LlamaConfig):
        return Llama(cfg)
    if isinstance(cfg, GPTConfig):
        return GPT(cfg)
    raise TypeError(f"not a language-model config: {type(cfg).__name__} (expected GPTConfig or LlamaConfig)")


def describe_lm(cfg: Any) -> str:
    """One line on the architecture, for run notes and reports."""
    if isinstance(cfg, LlamaConfig):
        h, kv = cfg.num_attention_heads, cfg.kv_heads
        heads = f"{h} heads" + (f" ({kv} key/value heads)" if kv != h else "")
        return (
            f"LLaMA architecture: {cfg.num_hidden_layers} layers, {heads}, {cfg.hidden_size} dimensions, "
            f"SwiGLU {cfg.intermediate_size}, RoPE θ={cfg.rope_theta:g}, context {cfg.block_size} tokens"
        )
    return (
        f"GPT-2 architecture: {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} dimensions, context "
        f"{cfg.block_size} tokens"
    )
