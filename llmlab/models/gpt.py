"""GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"), a decoder-only
Transformer language model, with the attention of stage 5 (llmlab/nn/attention.py).

Architecture (GPT-2 §2.3, over GPT-1's decoder): token embedding + *learned* position embedding, then N
pre-norm blocks

    x = x + Attention(LayerNorm(x))          causal multi-head self-attention
    x = x + MLP(LayerNorm(x))                d -> 4d -> d, GELU (the tanh approximation GPT-2 used)

a final LayerNorm, and the LM head tied to the token embedding (logits = h · Eᵀ). Pre-norm (the residual
stream itself is never normalised) is what lets GPT-2 train deep stacks without warmup tricks; the final
LayerNorm is needed because of it. Initialisation as GPT-2: N(0, 0.02) everywhere, and the two projections
that write into the residual stream (attention output, MLP output) scaled by 1/√(2·n_layer), since each block
adds two such terms to the stream and its variance would otherwise grow with depth.

Parameter names follow HF `GPT2LMHeadModel` (`transformer.wte`, `transformer.h.N.ln_1`, `attn`, `mlp.c_fc`,
`mlp.c_proj`, `transformer.ln_f`, `lm_head`), except inside attention, where the stage-5 module keeps
separate `q_proj` / `k_proj` / `v_proj` / `out_proj` nn.Linear layers. HF stores the fused `c_attn` and every
projection as a `Conv1D`, y = x W + b with W [in, out] — the transpose of nn.Linear's [out, in].
`to_hf_state_dict` / `from_hf_state_dict` are the one explicit converter; tests/models/test_gpt.py proves
logits and gradients equal to HF's, both ways, and `save_hf` / `load_hf` round-trip a `save_pretrained`
directory.

Shapes: B batch, T tokens, d = n_embd, h heads, V vocabulary.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from llmlab.nn.attention import AttentionImpl, KVCache, MultiHeadAttention

__all__ = ["GPT", "GPTConfig", "GPT_PRESETS", "from_hf_state_dict", "load_hf", "save_hf", "to_hf_state_dict"]


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # 0 in a recipe's config: set from its tokenizer when the model is built
    block_size: int = 1024  # the longest sequence (learned positions): HF n_positions
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # embeddings, attention probabilities and residual branches (HF *_pdrop)
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm
    layer_norm_epsilon: float = 1e-5
    attention: AttentionImpl = "fused"
    # GPT-2's "gelu_new" (the tanh approximation) or "gelu" (exact erf, as nanoGPT's nn.GELU); HF reads both
    activation: Literal["gelu_new", "gelu"] = "gelu_new"

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if min(self.block_size, self.n_layer, self.n_head, self.n_embd) < 1 or self.vocab_size < 0:
            raise ValueError("block_size, n_layer, n_head and n_embd must be >= 1, vocab_size >= 0")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")
        if self.activation not in ("gelu_new", "gelu"):
            raise ValueError(f"activation={self.activation!r}: gelu_new or gelu")


GPT_PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(),  # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.approximate = "tanh" if cfg.activation == "gelu_new" else "none"

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.c_fc(x), approximate=self.approximate)  # [B, T, 4d]
        return F.dropout(self.c_proj(h), self.dropout, self.training)  # [B, T, d]


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, bias=cfg.bias)
        self.attn = MultiHeadAttention(cfg.n_embd, cfg.n_head, cfg.dropout, bias=cfg.bias, impl=cfg.attention)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """x [B, T, d] (only the new positions when a cache holds the earlier ones) -> [B, T, d]"""
        a, _ = self.attn(self.ln_1(x), is_causal=True, cache=cache)  # [B, T, d]
        x = x + F.dropout(a, self.dropout, self.training)
        return x + self.mlp(self.ln_2(x))


class _Body(nn.Module):
    """HF's `transformer` submodule: embeddings, blocks, final LayerNorm."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, bias=cfg.bias)


class GPT(nn.Module):
    """`forward(idx)` gives next-token logits [B, T, V]; with `caches` (one KVCache per layer, from
    `new_caches`) only the new tokens are run and the caches grow (incremental generation)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("GPTConfig.vocab_size must be set (>= 1) to build a model")
        self.cfg = cfg
        self.transformer = _Body(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: logits = h Eᵀ
        self.activation_checkpointing = False  # see set_activation_checkpointing
        self.reset_parameters()

    def reset_parameters(self) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln_" in name or name.startswith("transformer.ln_f"):
                nn.init.ones_(p)
            elif name.endswith(("attn.out_proj.weight", "mlp.c_proj.weight")):
                nn.init.normal_(p, std=residual_std)
            else:
                nn.init.normal_(p, std=0.02)

    def new_caches(self) -> list[KVCache]:
        return [KVCache() for _ in self.transformer.h]

    def forward(self, idx: Tensor, caches: list[KVCache] | None = None) -> Tensor:
        """idx [B, T] token ids -> logits [B, T, V] (positions continue after what the caches hold)."""
        start = len(caches[0]) if caches else 0
        t = idx.shape[1]
        if start + t > self.cfg.block_size:
            raise ValueError(
                f"sequence of {start + t} tokens is longer than block_size={self.cfg.block_size}"
            )
        pos = torch.arange(start, start + t, device=idx.device)  # [T]
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # [B, T, d]
        x = F.dropout(x, self.cfg.dropout, self.training)
        for i, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and caches is None and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)  # [B, T, d]; inner activations recomputed
            else:
                x = block(x, caches[i] if caches else None)  # [B, T, d]
        return self.lm_head(self.transformer.ln_f(x))  # [B, T, V]

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Activation checkpointing per block (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
        Cost"): backward keeps only each block's input [B, T, d] and re-runs the block's forward to get the
        rest, trading one extra forward pass for the ~(34·d + 5·h·T)·B·T bytes a block saves otherwise
        (Korthikanti et al. 2022, fp16 accounting). Non-reentrant `torch.utils.checkpoint`, whose saved RNG
        state makes dropout masks identical in the recomputation, so gradients are unchanged."""
        self.activation_checkpointing = enabled

    def shard_units(self) -> list[nn.Module]:
        """The blocks ZeRO-3 / FSDP gather one at a time (the rest, embeddings, final norm and head, is the
        root)."""
        return list(self.transformer.h)

    def set_attention_impl(self, impl: AttentionImpl) -> None:
        for block in self.transformer.h:
            block.attn.impl = impl

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------------------------- HF converter
def to_hf_state_dict(model: GPT) -> dict[str, Tensor]:
    """Our weights under HF GPT2LMHeadModel's names and layouts (Conv1D weights are [in, out])."""
    out: dict[str, Tensor] = {}
    sd = model.state_dict()
    for key in (
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.ln_f.weight",
        "lm_head.weight",
    ):
        out[key] = sd[key]
    if "transformer.ln_f.bias" in sd:
        out["transformer.ln_f.bias"] = sd["transformer.ln_f.bias"]
    for i in range(model.cfg.n_layer):
        p = f"transformer.h.{i}."
        for name in ("ln_1", "ln_2"):
            for kind in ("weight", "bias"):
                if p + f"{name}.{kind}" in sd:
                    out[p + f"{name}.{kind}"] = sd[p + f"{name}.{kind}"]
        qkv = [sd[p + f"attn.{x}_proj.weight"] for x in "qkv"]  # 3 × [d, d] (out, in)
        out[p + "attn.c_attn.weight"] = torch.cat(qkv, dim=0).t().contiguous()  # [d, 3d] (in, out)
        out[p + "attn.c_proj.weight"] = sd[p + "attn.out_proj.weight"].t().contiguous()
        for name in ("mlp.c_fc", "mlp.c_proj"):
            out[p + f"{name}.weight"] = sd[p + f"{name}.weight"].t().contiguous()
        if model.cfg.bias:
            out[p + "attn.c_attn.bias"] = torch.cat([sd[p + f"attn.{x}_proj.bias"] for x in "qkv"])
            out[p + "attn.c_proj.bias"] = sd[p + "attn.out_proj.bias"]
            out[p + "mlp.c_fc.bias"] = sd[p + "mlp.c_fc.bias"]
            out[p + "mlp.c_proj.bias"] = sd[p + "mlp.c_proj.bias"]
    return out


def from_hf_state_dict(hf: dict[str, Tensor], cfg: GPTConfig) -> dict[str, Tensor]:
    """HF GPT2LMHeadModel weights (or GPT2Model's, without the `transformer.` prefix) as our state dict."""
    if not any(k.startswith("transformer.") for k in hf):
        hf = {f"transformer.{k}": v for k, v in hf.items()}
    d = cfg.n_embd
    out: dict[str, Tensor] = {}
    for key in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"):
        out[key] = hf[key]
    if cfg.bias:
        out["transformer.ln_f.bias"] = hf["transformer.ln_f.bias"]
    out["lm_head.weight"] = hf.get("lm_head.weight", hf["transformer.wte.weight"])
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        for name in ("ln_1", "ln_2"):
            out[p + f"{name}.weight"] = hf[p + f"{name}.weight"]
            if cfg.bias:
                out[p + f"{name}.bias"] = hf[p + f"{name}.bias"]
        w = hf[p + "attn.c_attn.weight"].t()  # [3d, d] (out, in)
        for j, x in enumerate("qkv"):
            out[p + f"attn.{x}_proj.weight"] = w[j * d : (j + 1) * d].contiguous()
        out[p + "attn.out_proj.weight"] = hf[p + "attn.c_proj.weight"].t().contiguous()
        out[p + "mlp.c_fc.weight"] = hf[p + "mlp.c_fc.weight"].t().contiguous()
        out[p + "mlp.c_proj.weight"] = hf[p + "mlp.c_proj.weight"].t().contiguous()
        if cfg.bias:
            b = hf[p + "attn.c_attn.bias"]
            for j, x in enumerate("qkv"):
                out[p + f"attn.{x}_proj.bias"] = b[j * d : (j + 1) * d]
            out[p + "attn.out_proj.bias"] = hf[p + "attn.c_proj.bias"]
            out[p + "mlp.c_fc.bias"] = hf[p + "mlp.c_fc.bias"]
            out[p + "mlp.c_proj.bias"] = hf[p + "mlp.c_proj.bias"]
    return out


def hf_config(cfg: GPTConfig) -> dict:
    """The `config.json` of an HF GPT-2 with this architecture."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": cfg.activation,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
    }


def config_from_hf(config: dict) -> GPTConfig:
    """Our config from an HF GPT-2 config.json; features ours does not implement are refused."""
    if config.get("model_type") != "gpt2":
        raise ValueError(f"not a GPT-2 config (model_type={config.get('model_type')!r})")
    if config.get("n_inner") not in (None, 4 * config["n_embd"]):
        raise ValueError(f"n_inner={config['n_inner']}: only 4 × n_embd is supported")
    activation = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu"}.get(
        config.get("activation_function", "gelu_new")
    )
    if activation is None:
        raise ValueError(
            f"activation_function={config['activation_function']!r}: gelu_new, gelu_pytorch_tanh or gelu"
        )
    if config.get("scale_attn_by_inverse_layer_idx") or not config.get("scale_attn_weights", True):
        raise ValueError("only the standard 1/√d_head attention scale is supported")
    return GPTConfig(
        vocab_size=config["vocab_size"],
        block_size=config["n_positions"],
        n_layer=config["n_layer"],
        n_head=config["n_head"],
        n_embd=config["n_embd"],
        dropout=float(config.get("resid_pdrop", 0.0)),
        layer_norm_epsilon=float(config.get("layer_norm_epsilon", 1e-5)),
        activation=activation,
    )


def save_hf(model: GPT, folder: Path) -> Path:
    """A directory `transformers.GPT2LMHeadModel.from_pretrained` loads: config.json + model.safetensors."""
    from safetensors.torch import save_file

    from llmlab.fileio import atomic_path, atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not model.cfg.bias:
        raise ValueError("HF GPT-2 has biases everywhere; a bias-free model has no HF twin")
    state = to_hf_state_dict(model)
    state.pop("lm_head.weight")  # tied: HF saves the embedding once
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp, metadata={"format": "pt"}
        )
    atomic_write_text(folder / "config.json", json.dumps(hf_config(model.cfg), indent=2) + "\n")
    return folder


def load_hf(folder: Path, attention: AttentionImpl = "fused") -> GPT:
    """Our GPT from an HF GPT-2 directory (config.json + model.safetensors, or pytorch_model.bin via
    transformers when that is all there is), in the dtype the weights were saved in."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    cfg = config_from_hf(config)
    cfg.attention = attention
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        hf = load_file(folder / "model.safetensors")
    else:
        from transformers import GPT2LMHeadModel

        hf = GPT2LMHeadModel.from_pretrained(folder).state_dict()
    model = GPT(cfg).to(
        hf["transformer.wte.weight" if "transformer.wte.weight" in hf else "wte.weight"].dtype
    )
    model.load_state_dict(from_hf_state_dict(hf, cfg))
    return model
