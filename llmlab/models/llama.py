"""LLaMA (Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models"; Llama 2, Touvron et al.
2023b, "Llama 2: Open Foundation and Fine-Tuned Chat Models", for grouped-query attention), a decoder-only
Transformer language model, written from scratch with HF transformers' `LlamaForCausalLM` as the reference.

Architecture (LLaMA §2.2: GPT's pre-norm decoder with three changes): token embedding — and no position
embedding, positions enter by rotating q and k — then N pre-norm blocks

    x = x + Attention(RMSNorm(x))          causal grouped-query self-attention, RoPE on q and k
    x = x + MLP(RMSNorm(x))                SwiGLU: down(silu(gate(x)) ⊙ up(x)), d -> f -> d

a final RMSNorm and the LM head (its own matrix in LLaMA 1 / 2; tied to the embedding in e.g. Llama 3.2 1B).
No biases (HF's `attention_bias` / `mlp_bias` add them, for the models derived from LLaMA that have them).

- RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"): y = x / √(mean(x²) + ε) ⊙ g.
  LayerNorm without the mean subtraction and the bias: re-scaling invariance is what stabilises training, and
  dropping the re-centering saves a reduction. Computed in float32 whatever the input dtype, then cast back
  (Meta's `self._norm(x.float()).type_as(x)`, HF's LlamaRMSNorm).
- SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"): the up projection is gated by a second one
  through SiLU, x ↦ silu(x W_gate) ⊙ (x W_up). Three matrices instead of two, so LLaMA takes f = ⅔·4d
  (rounded up to a multiple of 256: 11008 for d = 4096), keeping the 8d² parameters of a 4d GELU MLP.
- RoPE (Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding", §3.2-3.4): each
  head's q and k, d_h numbers, are read as d_h/2 adjacent pairs (x_{2i}, x_{2i+1}), and at position m pair i
  is rotated by the angle m·θ_i, θ_i = base^(-2i/d_h) (base = rope_theta, 10000):

      (x_{2i} + i·x_{2i+1}) · e^{i·m·θ_i}        the complex form of Meta's `apply_rotary_emb`

  A rotation keeps lengths and rotations compose, R_mᵀ R_n = R_{n-m}, so ⟨R_m q, R_n k⟩ = ⟨q, R_{n-m} k⟩: the
  scores depend on the relative position n - m only, and no parameter is spent on positions.
- Grouped-query attention (Ainslie et al. 2023, "GQA"; Llama 2 §2.2 for 34B / 70B): h query heads share h_kv
  key/value heads, query head j reading kv head j // (h / h_kv). h_kv = h is multi-head attention, h_kv = 1
  multi-query attention (Shazeer 2019). The KV cache, the memory that bounds decoding batch × length, shrinks
  by h / h_kv (8× for Llama 2 70B) while the query side keeps all its heads.

The q/k permutation, or why the converter is not the identity. HF's Llama does not rotate adjacent pairs: its
`rotate_half` (GPT-NeoX's layout) pairs coordinate i with i + d_h/2. Both are the same rotations applied to a
different numbering of a head's coordinates. Let P renumber each head so that pair i's coordinates (2i, 2i+1)
become (i, i + d_h/2). Then RoPE_halves(P x) = P · RoPE_pairs(x), and since P is a permutation (PᵀP = I),
⟨P a, P b⟩ = ⟨a, b⟩: every score, hence the whole model, is unchanged when every q and k is renumbered by P.
Renumbering the outputs of q_proj and k_proj is permuting their weight rows (and bias entries) within each
head, W_hf = P W_ours — exactly `permute` in transformers' convert_llama_weights_to_hf.py, which turned Meta's
consolidated.pth (pairs, our layout) into HF checkpoints (halves):

    w.view(n_heads, d_h // 2, 2, d).transpose(1, 2).reshape(n_heads · d_h, d)

v_proj and o_proj stay as they are (values are not rotated). `to_hf_state_dict` applies P,
`from_hf_state_dict` P⁻¹, and with the tied head that is the whole converter, because every module and
parameter has HF's name (`model.embed_tokens`, `model.layers.N.self_attn.{q,k,v,o}_proj`,
`model.layers.N.mlp.{gate,up,down}_proj`, `input_layernorm`, `post_attention_layernorm`, `model.norm`,
`lm_head`): PEFT's target modules apply as they are (a LoRA adapter trained on HF's q_proj / k_proj needs P⁻¹
on the rows of its lora_B). Without P the numbers load but the model is another one, as
tests/models/test_llama.py shows.

Numerics follow HF so that the twin is exact: RMSNorm in float32, RoPE angles m·θ_i in float32 (as Meta's),
cos / sin then cast to the activations' dtype, the attention scale d_h^-1/2 passed explicitly. The
frequencies θ_i are a plain float32 tensor, not a buffer, which `model.to(torch.bfloat16)` would round (as it
rounds HF's `inv_freq` buffer).

RoPE scaling, read from HF's `rope_scaling` (transformers 4) / `rope_parameters` (transformers 5), θ_i
computed exactly as transformers' modeling_rope_utils.py:
- "default": θ_i as above;
- "linear" (position interpolation, Chen et al. 2023): θ_i / factor, positions squeezed into the trained
  range;
- "dynamic" (NTK-aware): changes the base only for sequences longer than max_position_embeddings, which this
  model refuses, so within block_size it is the default set (HF's formula at seq_len =
  max_position_embeddings);
- "llama3" (Llama 3.1): wavelengths 2π/θ_i above original_max_position_embeddings / low_freq_factor are
  divided by factor, those below original_max_position_embeddings / high_freq_factor kept, and those in
  between interpolated smoothly. Other types (yarn, longrope, ...) are refused.

Shapes: B batch, T tokens (the new ones when a cache holds earlier positions), S keys, d hidden_size, h heads,
h_kv key/value heads, d_h head_dim, f intermediate_size, V vocabulary.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from llmlab.nn.attention import AttentionImpl, KVCache, build_attention_mask

__all__ = [
    "LLAMA_PRESETS",
    "Llama",
    "LlamaConfig",
    "RMSNorm",
    "ROPE_TYPES",
    "apply_rope",
    "config_from_hf",
    "from_hf_state_dict",
    "hf_config",
    "load_hf",
    "lora_row_map",
    "rope_inv_freq",
    "save_hf",
    "to_hf_state_dict",
]

# rope_type -> the keys its `rope_scaling` dict must hold besides rope_type
ROPE_TYPES: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass
class LlamaConfig:
    vocab_size: int = 32000  # 0 in a recipe's config: set from its tokenizer when the model is built
    hidden_size: int = 4096  # d
    intermediate_size: int = 11008  # f, the SwiGLU width
    num_hidden_layers: int = 32
    num_attention_heads: int = 32  # h
    num_key_value_heads: int | None = None  # h_kv; None: = h (multi-head attention)
    max_position_embeddings: int = 2048  # the longest sequence (block_size)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0  # the RoPE base
    rope_scaling: dict | None = None  # HF's {"rope_type": "linear", "factor": 2.0, ...}; None: default
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q/k/v/o_proj (LLaMA has none)
    mlp_bias: bool = False  # biases on gate/up/down_proj
    head_dim: int | None = None  # d_h; None: d / h
    attention_dropout: float = 0.0  # on the attention probabilities, HF's only dropout in Llama
    attention: AttentionImpl = "fused"

    def __post_init__(self) -> None:
        sizes = (self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.num_attention_heads)
        if min(sizes) < 1:
            raise ValueError(
                "hidden_size, intermediate_size, num_hidden_layers, num_attention_heads must be >= 1"
            )
        if self.vocab_size < 0 or self.max_position_embeddings < 1:
            raise ValueError("vocab_size must be >= 0 and max_position_embeddings >= 1")
        # None stays None (resolved by kv_heads / d_head), so overriding hidden_size or the heads later
        # re-derives them instead of keeping a stale value
        if self.kv_heads < 1 or self.num_attention_heads % self.kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.kv_heads} (each kv head serves a whole group of heads)"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads} (or give head_dim)"
            )
        if self.d_head < 2 or self.d_head % 2:
            raise ValueError(f"head_dim={self.d_head} must be even: RoPE rotates pairs of coordinates")
        if self.rms_norm_eps <= 0:
            raise ValueError("rms_norm_eps must be > 0")
        if not 0 <= self.attention_dropout < 1:
            raise ValueError("attention_dropout must be in [0, 1)")
        if self.attention not in ("naive", "fused"):
            raise ValueError(f"attention={self.attention!r}: naive or fused")
        _check_rope_scaling(self.rope_scaling)

    @property
    def kv_heads(self) -> int:
        """h_kv: num_key_value_heads, or h when unset (multi-head attention)."""
        return self.num_attention_heads if self.num_key_value_heads is None else self.num_key_value_heads

    @property
    def d_head(self) -> int:
        """d_h: head_dim, or d / h when unset."""
        return self.hidden_size // self.num_attention_heads if self.head_dim is None else self.head_dim

    @property
    def block_size(self) -> int:
        """The longest sequence (llmlab's generator reads `model.cfg.block_size`)."""
        return self.max_position_embeddings


def _check_rope_scaling(scaling: dict | None) -> None:
    if scaling is None:
        return
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"rope_scaling rope_type={rope_type!r} is not supported: one of {', '.join(ROPE_TYPES)}"
        )
    missing = [key for key in ROPE_TYPES[rope_type] if key not in scaling]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} needs {', '.join(missing)}")
    if rope_type != "default" and not scaling["factor"] >= 1:
        raise ValueError(f"rope_scaling factor={scaling['factor']} must be >= 1")
    if rope_type == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError("llama3 rope_scaling needs high_freq_factor > low_freq_factor")


LLAMA_PRESETS: dict[str, LlamaConfig] = {
    "llama-7b": LlamaConfig(),  # LLaMA 1: 6.74B
    "llama2-7b": LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5),  # 6.74B
    "llama2-13b": LlamaConfig(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    "llama2-70b": LlamaConfig(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    "tinyllama-1.1b": LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        rms_norm_eps=1e-5,
    ),
    "llama3-8b": LlamaConfig(
        vocab_size=128256,
        intermediate_size=14336,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
    ),
    "llama3.2-1b": LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
}


# ------------------------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(cfg: LlamaConfig) -> Tensor:
    """θ_i for the d_h/2 pairs of a head [d_h/2], float32 on the CPU, as transformers' modeling_rope_utils.py
    computes them for cfg.rope_scaling (the same float32 operations in the same order, so the same bits)."""
    dim = cfg.d_head
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim  # [d_h/2]: 2i / d_h
    scaling = cfg.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    base = cfg.rope_theta
    if rope_type == "dynamic":
        # NTK-aware: base · (factor · L / L_max - (factor - 1))^(d_h / (d_h - 2)) at length L; here L = L_max
        factor, length = scaling["factor"], cfg.max_position_embeddings
        base = base * ((factor * length / cfg.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base**exponents)  # [d_h/2]: base^(-2i/d_h)
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]  # [d_h/2]: position m acts as m / factor
    elif rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq  # [d_h/2]: positions per full turn of pair i
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)  # [d_h/2]
        # 0 where the wavelength is old_len / low (divided by factor), 1 where it is old_len / high (kept)
        smooth = (old_len / wavelen - low) / (high - low)  # [d_h/2]
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled  # [d_h/2]
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)  # [d_h/2]
        inv_freq = torch.where(is_medium, smoothed, scaled)  # [d_h/2]
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos(m·θ_i), sin(m·θ_i) for the positions m of one forward pass."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.inv_freq = rope_inv_freq(cfg)  # [d_h/2] float32, a plain tensor: never cast to the model dtype

    def forward(self, start: int, t: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """Positions start .. start + t - 1 -> cos, sin [T, d_h/2] in `dtype`."""
        pos = torch.arange(start, start + t, device=device).float()  # [T]
        angles = pos[:, None] * self.inv_freq.to(device)[None, :]  # [T, d_h/2] float32: m·θ_i
        return angles.cos().to(dtype), angles.sin().to(dtype)  # [T, d_h/2] each


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, heads, T, d_h] with each adjacent pair (x_{2i}, x_{2i+1}) rotated by its angle (cos, sin
    [T, d_h/2]): the product (x_{2i} + i·x_{2i+1})(cos + i·sin) written in real numbers."""
    pairs = x.unflatten(-1, (-1, 2))  # [B, heads, T, d_h/2, 2]
    real, imag = pairs[..., 0], pairs[..., 1]  # [B, heads, T, d_h/2] each
    out_real = real * cos - imag * sin  # [B, heads, T, d_h/2]
    out_imag = real * sin + imag * cos  # [B, heads, T, d_h/2]
    return torch.stack([out_real, out_imag], dim=-1).flatten(-2)  # [B, heads, T, d_h]


# ----------------------------------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))  # g
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.to(torch.float32)  # [B, T, d] float32 whatever x is (float64 too, as HF)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)  # [B, T, d]: rms 1 per position
        return self.weight * h.to(x.dtype)  # [B, T, d]


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # [B, T, f]
        return self.down_proj(h)  # [B, T, d]


class LlamaAttention(nn.Module):
    """Causal grouped-query self-attention with RoPE. The stage-5 MultiHeadAttention has one head count for
    q, k and v and no hook between the projections and the scores where the rotation goes, hence this module;
    it reuses stage 5's KVCache (holding h_kv heads) and its causal mask for a query block after a cache."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head = cfg.num_attention_heads, cfg.kv_heads  # h, h_kv
        self.head_dim = cfg.d_head  # d_h
        self.scale = self.head_dim**-0.5  # as HF's `scaling`, passed to the kernel so both round alike
        self.dropout = cfg.attention_dropout
        self.impl: AttentionImpl = cfg.attention
        d, q_dim, kv_dim = cfg.hidden_size, self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.q_proj = nn.Linear(d, q_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, kv_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, kv_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_dim, d, bias=cfg.attention_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None) -> Tensor:
        """x [B, T, d] (the new positions), cos / sin [T, d_h/2] of their positions -> [B, T, d]."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)  # [B, h, T, d_h]
        k = self.k_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, h_kv, T, d_h]
        v = self.v_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, h_kv, T, d_h]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [B, h, T, d_h], [B, h_kv, T, d_h]
        if cache is not None:  # keys are cached rotated, each at its own position
            k, v = cache.append(k, v)  # [B, h_kv, S, d_h]
        s = k.shape[2]
        dropout = self.dropout if self.training else 0.0
        if self.impl == "naive":
            groups = self.n_head // self.n_kv_head
            k = k.repeat_interleave(groups, dim=1)  # [B, h, S, d_h]: query head j reads kv head j // groups
            v = v.repeat_interleave(groups, dim=1)  # [B, h, S, d_h]
            # Query j of the T new ones sits at absolute position S - T + j and sees keys 0 .. S - T + j
            mask = build_attention_mask(b, self.n_head, t, s, is_causal=True, dtype=q.dtype, device=q.device)
            scores = (q @ k.transpose(-2, -1)) * self.scale + mask  # [B, h, T, S]
            weights = F.dropout(scores.softmax(dim=-1), dropout, self.training)  # [B, h, T, S]
            out = weights @ v  # [B, h, T, d_h]
        else:
            # enable_gqa: the kernel maps query head j to kv head j // groups without copying k and v.
            # Without a cache (T = S) the kernel's own causal mask; after one, the end-aligned mask above.
            mask = None
            if t != s:
                mask = build_attention_mask(
                    b, self.n_head, t, s, is_causal=True, dtype=q.dtype, device=q.device
                )
            gqa = self.n_head != self.n_kv_head
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=t == s, scale=self.scale, enable_gqa=gqa
            )  # [B, h, T, d_h]
        out = out.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim)  # [B, T, h·d_h]
        return self.o_proj(out)  # [B, T, d]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None) -> Tensor:
        """x [B, T, d] (only the new positions when a cache holds the earlier ones) -> [B, T, d]"""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)  # [B, T, d]
        return x + self.mlp(self.post_attention_layernorm(x))  # [B, T, d]


class _Body(nn.Module):
    """HF's `model` submodule (LlamaModel): embedding, blocks, final RMSNorm, rotary frequencies."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)


class Llama(nn.Module):
    """`forward(idx)` gives next-token logits [B, T, V]; with `caches` (one KVCache per layer, from
    `new_caches`) only the new tokens are run and the caches grow (incremental generation)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("LlamaConfig.vocab_size must be set (>= 1) to build a model")
        self.cfg = cfg
        self.model = _Body(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # logits = h Eᵀ
        self.activation_checkpointing = False  # see set_activation_checkpointing
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """HF's LlamaPreTrainedModel init: N(0, initializer_range = 0.02) for every matrix, zero biases,
        RMSNorm gains 1 (no depth-scaled residual projections, unlike GPT-2)."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, std=0.02)

    def new_caches(self) -> list[KVCache]:
        return [KVCache() for _ in self.model.layers]

    def forward(self, idx: Tensor, caches: list[KVCache] | None = None) -> Tensor:
        """idx [B, T] token ids -> logits [B, T, V] (positions continue after what the caches hold)."""
        start = len(caches[0]) if caches else 0
        t = idx.shape[1]
        if start + t > self.cfg.block_size:
            raise ValueError(
                f"sequence of {start + t} tokens is longer than block_size={self.cfg.block_size} "
                "(max_position_embeddings)"
            )
        x = self.model.embed_tokens(idx)  # [B, T, d]
        cos, sin = self.model.rotary_emb(start, t, x.dtype, x.device)  # [T, d_h/2] each
        for i, layer in enumerate(self.model.layers):
            if self.activation_checkpointing and caches is None and torch.is_grad_enabled():
                x = checkpoint(
                    layer, x, cos, sin, use_reentrant=False
                )  # [B, T, d]; inner activations recomputed
            else:
                x = layer(x, cos, sin, caches[i] if caches else None)  # [B, T, d]
        return self.lm_head(self.model.norm(x))  # [B, T, V]

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Activation checkpointing per block (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
        Cost"): backward keeps only each block's input [B, T, d] and re-runs the block's forward to get the
        rest, trading one extra forward pass for the activations. Non-reentrant `torch.utils.checkpoint`,
        whose saved RNG state makes attention-dropout masks identical in the recomputation, so gradients are
        unchanged."""
        self.activation_checkpointing = enabled

    def shard_units(self) -> list[nn.Module]:
        """The blocks ZeRO-3 / FSDP gather one at a time (the rest, embedding, final norm and head, is the
        root)."""
        return list(self.model.layers)

    def set_attention_impl(self, impl: AttentionImpl) -> None:
        for layer in self.model.layers:
            layer.self_attn.impl = impl

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------------------------- HF converter
def _pairs_to_halves(w: Tensor, n_heads: int) -> Tensor:
    """P: q/k projection rows [n_heads·d_h, ...] from our layout (pair i at rows 2i, 2i+1 of its head) to HF's
    (pair i at rows i, d_h/2 + i); convert_llama_weights_to_hf.py's `permute`. Weights and biases alike."""
    d_h = w.shape[0] // n_heads
    return w.reshape(n_heads, d_h // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _halves_to_pairs(w: Tensor, n_heads: int) -> Tensor:
    """P⁻¹: HF's rows back to ours (read (half, i) as (i, half))."""
    d_h = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d_h // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _convert(sd: dict[str, Tensor], cfg: LlamaConfig, to_hf: bool) -> dict[str, Tensor]:
    """Every weight under the same name; q_proj / k_proj rows permuted (P to HF, P⁻¹ from HF)."""
    permute = _pairs_to_halves if to_hf else _halves_to_pairs
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.kv_heads}
    out: dict[str, Tensor] = {}
    for name, value in sd.items():
        proj = name.split(".")[-2]
        out[name] = permute(value, heads[proj]) if proj in heads else value
    return out


def lora_row_map(cfg: LlamaConfig):
    """For llmlab.nn.lora's save_adapter / load_adapter: a LoRA update's output rows are the weight's, so an
    adapter of q_proj / k_proj moves between our layout and HF's (PEFT's files) by the same permutation as
    the weights; every other layer's lora_B passes unchanged."""
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.kv_heads}

    def row_map(module: str, b: Tensor, to_file: bool) -> Tensor:
        n = heads.get(module.rsplit(".", 1)[-1])
        if n is None:
            return b
        return _pairs_to_halves(b, n) if to_file else _halves_to_pairs(b, n)

    return row_map


def to_hf_state_dict(model: Llama) -> dict[str, Tensor]:
    """Our weights as HF LlamaForCausalLM's: the same names, q_proj / k_proj rows permuted pairs -> halves.
    A tied head appears under both names (the same tensor), as in HF's state_dict."""
    return _convert(model.state_dict(), model.cfg, to_hf=True)


def from_hf_state_dict(hf: dict[str, Tensor], cfg: LlamaConfig) -> dict[str, Tensor]:
    """HF LlamaForCausalLM weights (or LlamaModel's, without the `model.` prefix) as our state dict: q_proj /
    k_proj rows permuted halves -> pairs; a tied head is the embedding."""
    if not any(k.startswith("model.") for k in hf):
        hf = {f"model.{k}": v for k, v in hf.items()}
    hf = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}  # a buffer older files stored
    out = _convert({k: v for k, v in hf.items() if k != "lm_head.weight"}, cfg, to_hf=False)
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    elif "lm_head.weight" in hf:
        out["lm_head.weight"] = hf["lm_head.weight"]
    else:
        raise ValueError("the checkpoint has no lm_head.weight but tie_word_embeddings is false")
    return out


def hf_config(cfg: LlamaConfig) -> dict:
    """The `config.json` of an HF Llama with this architecture. RoPE is written both ways: `rope_parameters`
    (transformers 5) and `rope_theta` + `rope_scaling` (transformers 4, which ignores the former)."""
    scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    if scaling is not None and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.d_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": cfg.rope_theta},
        "attention_bias": cfg.attention_bias,
        "attention_dropout": cfg.attention_dropout,
        "mlp_bias": cfg.mlp_bias,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
    }


def config_from_hf(config: dict) -> LlamaConfig:
    """Our config from an HF Llama config.json (transformers 4's rope_theta + rope_scaling, or 5's
    rope_parameters); features ours does not implement are refused."""
    if config.get("model_type") != "llama":
        raise ValueError(f"not a Llama config (model_type={config.get('model_type')!r})")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={config['hidden_act']!r}: only silu (SwiGLU) is supported")
    # transformers 5: rope_scaling (a legacy key) wins over rope_parameters, which also carries rope_theta
    params = dict(config.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", config.get("rope_theta", 10000.0)))
    scaling = dict(config.get("rope_scaling") or params)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")  # the key's pre-4.45 name
    scaling.pop("rope_theta", None)
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported: every coordinate of a head is rotated")
    scaling.pop("partial_rotary_factor", None)
    if scaling.get("rope_type") == "llama3":  # as HF's standardize_rope_params
        scaling.setdefault("original_max_position_embeddings", config["max_position_embeddings"])
    if scaling.get("rope_type", "default") == "default":
        scaling = {}
    return LlamaConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config.get("num_key_value_heads"),
        max_position_embeddings=config["max_position_embeddings"],
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling or None,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=bool(config.get("attention_bias", False)),
        mlp_bias=bool(config.get("mlp_bias", False)),
        head_dim=config.get("head_dim"),
        attention_dropout=float(config.get("attention_dropout", 0.0)),
    )


def save_hf(model: Llama, folder: Path) -> Path:
    """A directory `transformers.LlamaForCausalLM.from_pretrained` loads: config.json + model.safetensors."""
    from safetensors.torch import save_file

    from llmlab.fileio import atomic_path, atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = to_hf_state_dict(model)
    if model.cfg.tie_word_embeddings:
        state.pop("lm_head.weight")  # tied: HF saves the embedding once
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp, metadata={"format": "pt"}
        )
    atomic_write_text(folder / "config.json", json.dumps(hf_config(model.cfg), indent=2) + "\n")
    return folder


def load_hf(folder: Path, attention: AttentionImpl = "fused") -> Llama:
    """Our Llama from an HF Llama directory (config.json + model.safetensors, or its shards listed in
    model.safetensors.index.json, or pytorch_model.bin via transformers when that is all there is), in the
    dtype the weights were saved in. Built on the meta device and given the loaded tensors, so a 7B checkpoint
    in bfloat16 never exists as a float32 copy."""
    folder = Path(folder)
    cfg = config_from_hf(json.loads((folder / "config.json").read_text()))
    cfg.attention = attention
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file() or index.is_file():
        from safetensors.torch import load_file

        files = ["model.safetensors"]
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        hf: dict[str, Tensor] = {}
        for name in files:
            hf.update(load_file(folder / name))
    else:
        from transformers import LlamaForCausalLM

        hf = LlamaForCausalLM.from_pretrained(folder).state_dict()
    with torch.device("meta"):
        model = Llama(cfg)
    model.load_state_dict(from_hf_state_dict(hf, cfg), assign=True)
    if cfg.tie_word_embeddings:  # assign gave each name its own Parameter: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model
