"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al. 2017), for translation.

Architecture (§3): an encoder of N layers [self-attention, position-wise feed-forward] and a decoder of N
layers [masked self-attention, attention over the encoder output ("cross-attention"), feed-forward]; every
sub-layer wrapped in a residual connection and layer normalisation (Ba et al. 2016):

    post-norm (as published, §3.1):   x = LayerNorm(x + Dropout(Sublayer(x)))
    pre-norm (Wang et al. 2019; Xiong et al. 2020, "On Layer Normalization in the Transformer
    Architecture"):                   x = x + Dropout(Sublayer(LayerNorm(x)))   and one LayerNorm at the end

Pre-norm keeps an identity path from input to output, so it trains without a long warmup and at depth;
post-norm is the paper's and is the default here. `final_norm` adds the closing LayerNorm to either stack
(pre-norm needs it: the residual stream is otherwise never normalised; torch.nn.Transformer always has it).

Inputs (§3.4, §3.5): token embeddings multiplied by √d_model, plus the fixed sinusoidal positions
PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)), then dropout.
With a joint subword vocabulary the source and target share one embedding matrix (`shared_embeddings`), and
the output projection reuses it transposed (`tie_output`, §3.4; Press & Wolf 2017). Embeddings are drawn
from N(0, d_model^-0.5) as fairseq does: with the √d_model scale their input has unit variance, and the tied
output logits start with unit variance too. (torch's default N(0, 1) would give logits with a std of √d_model
≈ 16 at d = 256, and training stalls: measured in PITFALLS.md.)

Names follow HF BART / Marian checkpoints (encoder.layers.N.self_attn.q_proj, fc1, fc2,
self_attn_layer_norm, encoder_attn, final_layer_norm, lm_head), so a converter is a renaming. The test
tests/models/test_transformer.py copies weights into torch.nn.Transformer (plus embeddings and output
projection) and checks outputs and every gradient equal, post-norm and pre-norm.

Shapes: B batch, S source length, T target length, d = d_model, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.nn.attention import AttentionImpl, KVCache, MultiHeadAttention

__all__ = [
    "TRANSFORMER_PRESETS",
    "DecoderState",
    "Transformer",
    "TransformerConfig",
    "build_transformer",
    "sinusoidal_positions",
]


@dataclass
class TransformerConfig:
    d_model: int = 512
    n_heads: int = 8
    encoder_layers: int = 6
    decoder_layers: int = 6
    d_ff: int = 2048
    dropout: float = 0.1  # on embeddings + positions and on each sub-layer's output (§5.4)
    attention_dropout: float = 0.0  # on the attention probabilities
    activation_dropout: float = 0.0  # between the two feed-forward layers
    activation: Literal["relu", "gelu"] = "relu"
    norm_first: bool = False  # False: post-norm as published; True: pre-norm
    final_norm: bool | None = None  # LayerNorm after each stack; None: True if pre-norm, False if post-norm
    shared_embeddings: bool = True  # one embedding for source and target (a joint vocabulary)
    tie_output: bool = True  # output projection = target embedding, transposed
    scale_embeddings: bool = True  # multiply embeddings by √d_model (§3.4)
    attention: AttentionImpl = "fused"  # "naive" (explicit softmax) or "fused" (scaled_dot_product_attention)
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if min(self.d_model, self.n_heads, self.encoder_layers, self.decoder_layers, self.d_ff) < 1:
            raise ValueError("d_model, n_heads, encoder_layers, decoder_layers and d_ff must be >= 1")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1)")

    @property
    def use_final_norm(self) -> bool:
        return self.norm_first if self.final_norm is None else self.final_norm


# The paper's two sizes (Table 3).
TRANSFORMER_PRESETS: dict[str, TransformerConfig] = {
    "base": TransformerConfig(),
    "big": TransformerConfig(d_model=1024, n_heads=16, d_ff=4096, dropout=0.3),
}


def sinusoidal_positions(length: int, d_model: int, offset: int = 0) -> Tensor:
    """PE [length, d_model] for positions offset .. offset + length - 1 (§3.5): even columns sin, odd cos.

    Each pair of columns (2i, 2i+1) is a rotation at frequency 1/10000^(2i/d): PE(pos + k) is a fixed linear
    function of PE(pos), which is what the paper hoped lets attention use relative positions."""
    pos = torch.arange(offset, offset + length, dtype=torch.float64)[:, None]  # [L, 1]
    inv_freq = torch.exp(
        -math.log(10000.0) * torch.arange(0, d_model, 2, dtype=torch.float64) / d_model
    )  # [⌈d/2⌉]
    angles = pos * inv_freq[None, :]  # [L, ⌈d/2⌉]
    pe = torch.zeros(length, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angles)
    pe[:, 1::2] = torch.cos(angles[:, : d_model // 2])
    return pe  # float64: a float64 model gets exact positions, others cast it


class SinusoidalPositions(nn.Module):
    """The table of §3.5, grown on demand (no length limit) and never saved (it is not learned)."""

    def __init__(self, d_model: int, initial: int = 256) -> None:
        super().__init__()
        self.d_model = d_model
        self.register_buffer("table", sinusoidal_positions(initial, d_model), persistent=False)

    def forward(self, length: int, offset: int = 0) -> Tensor:
        end = offset + length
        if end > self.table.shape[0]:
            grown = sinusoidal_positions(max(end, 2 * self.table.shape[0]), self.d_model)
            self.table = grown.to(self.table.device, self.table.dtype)
        return self.table[offset:end]  # [length, d]


class FeedForward(nn.Module):
    """FFN(x) = W_2 act(W_1 x + b_1) + b_2 (§3.3): d -> d_ff -> d, applied to every position alike."""

    def __init__(self, d_model: int, d_ff: int, activation: str, activation_dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.activation = F.relu if activation == "relu" else F.gelu
        self.activation_dropout = activation_dropout

    def forward(self, x: Tensor) -> Tensor:
        h = self.activation(self.fc1(x))  # [B, n, d_ff]
        h = F.dropout(h, self.activation_dropout, self.training)
        return self.fc2(h)  # [B, n, d]


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.norm_first = cfg.norm_first
        self.dropout = cfg.dropout
        self.self_attn = MultiHeadAttention(d, cfg.n_heads, cfg.attention_dropout, impl=cfg.attention)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(d, cfg.d_ff, cfg.activation, cfg.activation_dropout)
        self.final_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor, pad_mask: Tensor | None) -> Tensor:
        """x [B, S, d], pad_mask [B, S] (True = padding) -> [B, S, d]"""
        x = _residual(
            x, self.self_attn_layer_norm, self.norm_first, self.dropout, self.training,
            lambda h: self.self_attn(h, key_padding_mask=pad_mask)[0],
        )  # fmt: skip
        return _residual(x, self.final_layer_norm, self.norm_first, self.dropout, self.training, self.ffn)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.norm_first = cfg.norm_first
        self.dropout = cfg.dropout
        self.self_attn = MultiHeadAttention(d, cfg.n_heads, cfg.attention_dropout, impl=cfg.attention)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.encoder_attn = MultiHeadAttention(d, cfg.n_heads, cfg.attention_dropout, impl=cfg.attention)
        self.encoder_attn_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(d, cfg.d_ff, cfg.activation, cfg.activation_dropout)
        self.final_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        memory_pad_mask: Tensor | None,
        tgt_pad_mask: Tensor | None = None,
        self_cache: KVCache | None = None,
        cross_cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """x [B, T, d] (only the new positions when caches are given), memory [B, S, d] -> ([B, T, d],
        cross-attention weights [B, h, T, S] when need_weights)."""
        x = _residual(
            x, self.self_attn_layer_norm, self.norm_first, self.dropout, self.training,
            lambda h: self.self_attn(h, key_padding_mask=tgt_pad_mask, is_causal=True, cache=self_cache)[0],
        )  # fmt: skip
        weights: list[Tensor | None] = [None]

        def cross(h: Tensor) -> Tensor:
            out, weights[0] = self.encoder_attn(
                h, memory, key_padding_mask=memory_pad_mask, need_weights=need_weights,
                cache=cross_cache, static_kv=True,
            )  # fmt: skip
            return out

        x = _residual(x, self.encoder_attn_layer_norm, self.norm_first, self.dropout, self.training, cross)
        x = _residual(x, self.final_layer_norm, self.norm_first, self.dropout, self.training, self.ffn)
        return x, weights[0]


def _residual(x: Tensor, norm: nn.LayerNorm, norm_first: bool, p: float, training: bool, sublayer) -> Tensor:
    """post-norm: LayerNorm(x + Dropout(sublayer(x))); pre-norm: x + Dropout(sublayer(LayerNorm(x)))."""
    if norm_first:
        return x + F.dropout(sublayer(norm(x)), p, training)
    return norm(x + F.dropout(sublayer(x), p, training))


class Stack(nn.Module):
    """N layers and, when `cfg.use_final_norm`, the LayerNorm after them (`encoder.layers.N...`,
    `encoder.layer_norm`, as in HF BART / Marian checkpoints)."""

    def __init__(self, layers: list[nn.Module], cfg: TransformerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.layer_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.use_final_norm else None


@dataclass
class DecoderState:
    """What incremental decoding carries from one step to the next: per decoder layer a self-attention cache
    (grows by one position per step) and a cross-attention cache (the encoder's keys and values, computed at
    the first step); the encoder output and its padding mask. Rows are hypotheses (sentence × beam)."""

    memory: Tensor  # [N, S, d]
    memory_pad_mask: Tensor  # [N, S]
    self_caches: list[KVCache] = field(default_factory=list)
    cross_caches: list[KVCache] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Target positions decoded so far."""
        return len(self.self_caches[0]) if self.self_caches else 0

    def reorder(self, index: Tensor) -> None:
        """Keep rows `index` (in that order): beams follow their parents, finished sentences drop out."""
        self.memory = self.memory.index_select(0, index)  # [N', S, d]
        self.memory_pad_mask = self.memory_pad_mask.index_select(0, index)  # [N', S]
        for cache in (*self.self_caches, *self.cross_caches):
            cache.reorder(index)


class Transformer(nn.Module):
    """Encoder-decoder for sequence-to-sequence tasks. `forward(src, tgt_in)` gives the next-token logits of
    teacher forcing; `encode` + `start_decoding` + `decode_step` decode incrementally with KV caches."""

    def __init__(self, cfg: TransformerConfig, vocab_size: int, pad_id: int) -> None:
        super().__init__()
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id={pad_id} is outside the vocabulary of {vocab_size}")
        self.cfg, self.vocab_size, self.pad_id = cfg, vocab_size, pad_id
        d = cfg.d_model
        self.embed_scale = math.sqrt(d) if cfg.scale_embeddings else 1.0
        self.src_embed = nn.Embedding(vocab_size, d, padding_idx=pad_id)
        self.tgt_embed = (
            self.src_embed if cfg.shared_embeddings else nn.Embedding(vocab_size, d, padding_idx=pad_id)
        )
        self.positions = SinusoidalPositions(d)
        self.encoder = Stack([EncoderLayer(cfg) for _ in range(cfg.encoder_layers)], cfg)
        self.decoder = Stack([DecoderLayer(cfg) for _ in range(cfg.decoder_layers)], cfg)
        self.lm_head = nn.Linear(d, vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_output:
            self.lm_head.weight = self.tgt_embed.weight  # [V, d]: logits = h Eᵀ

    def reset_parameters(self) -> None:
        for emb in {id(e): e for e in (self.src_embed, self.tgt_embed)}.values():
            nn.init.normal_(emb.weight, std=self.cfg.d_model**-0.5)
            with torch.no_grad():
                emb.weight[self.pad_id].zero_()
        for layer in (*self.encoder.layers, *self.decoder.layers):
            for m in layer.modules():
                if isinstance(m, MultiHeadAttention):
                    m.reset_parameters()
                elif isinstance(m, FeedForward):
                    for lin in (m.fc1, m.fc2):
                        nn.init.xavier_uniform_(lin.weight)
                        nn.init.zeros_(lin.bias)
        nn.init.normal_(self.lm_head.weight, std=self.cfg.d_model**-0.5)

    def set_attention_impl(self, impl: AttentionImpl) -> None:
        """Switch every attention layer between the naive and the fused path (same weights, same results)."""
        for m in self.modules():
            if isinstance(m, MultiHeadAttention):
                m.impl = impl

    # ------------------------------------------------------------------------------------------ stacks
    def _embed(self, tokens: Tensor, embed: nn.Embedding, offset: int = 0) -> Tensor:
        x = embed(tokens) * self.embed_scale  # [B, n, d]
        x = x + self.positions(tokens.shape[1], offset).to(x.dtype)  # + [n, d]
        return F.dropout(x, self.cfg.dropout, self.training)

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src [B, S] token ids -> (memory [B, S, d], pad mask [B, S], True = padding)."""
        pad_mask = src.eq(self.pad_id)  # [B, S]
        x = self._embed(src, self.src_embed)  # [B, S, d]
        for layer in self.encoder.layers:
            x = layer(x, pad_mask)  # [B, S, d]
        if self.encoder.layer_norm is not None:
            x = self.encoder.layer_norm(x)
        return x, pad_mask

    def decode(
        self,
        tgt_in: Tensor,
        memory: Tensor,
        memory_pad_mask: Tensor,
        tgt_pad_mask: Tensor | None = None,
        state: DecoderState | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """tgt_in [B, T] (the new positions only, with a state) -> (hidden [B, T, d], the LAST layer's
        cross-attention weights [B, h, T, S] when need_weights). No target padding mask is needed in training:
        padding sits at the end and the causal mask already hides it from every real position."""
        offset = state.length if state is not None else 0
        x = self._embed(tgt_in, self.tgt_embed, offset)  # [B, T, d]
        weights = None
        for i, layer in enumerate(self.decoder.layers):
            last = i == len(self.decoder.layers) - 1
            x, w = layer(
                x,
                memory,
                memory_pad_mask,
                tgt_pad_mask,
                self_cache=state.self_caches[i] if state is not None else None,
                cross_cache=state.cross_caches[i] if state is not None else None,
                need_weights=need_weights and last,
            )
            weights = w if last else weights
        if self.decoder.layer_norm is not None:
            x = self.decoder.layer_norm(x)
        return x, weights

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher forcing: src [B, S], tgt_in [B, T] = (BOS, y_1, ...) -> logits [B, T, V] of (y_1, ...)."""
        memory, pad_mask = self.encode(src)
        hidden, _ = self.decode(tgt_in, memory, pad_mask)
        return self.lm_head(hidden)  # [B, T, V]

    # ------------------------------------------------------------------------------------------ decoding
    def start_decoding(self, memory: Tensor, memory_pad_mask: Tensor) -> DecoderState:
        n = len(self.decoder.layers)
        return DecoderState(
            memory, memory_pad_mask, [KVCache() for _ in range(n)], [KVCache() for _ in range(n)]
        )

    def decode_step(self, tokens: Tensor, state: DecoderState) -> Tensor:
        """The newest token of each row, tokens [N] -> log-probabilities of the next one [N, V]; the state's
        caches grow by one position."""
        hidden, _ = self.decode(
            tokens[:, None], state.memory, state.memory_pad_mask, state=state
        )  # [N, 1, d]
        logits = self.lm_head(hidden[:, 0])  # [N, V]
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # the softmax in fp32 under autocast
        return torch.log_softmax(logits, dim=-1)  # [N, V]

    @torch.no_grad()
    def cross_attention(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """The last decoder layer's attention over the source, per head: [B, h, T, S] (for heat-maps)."""
        memory, pad_mask = self.encode(src)
        _, weights = self.decode(tgt_in, memory, pad_mask, need_weights=True)
        return weights


def build_transformer(cfg: TransformerConfig, vocab_size: int, pad_id: int = 0) -> Transformer:
    return Transformer(cfg, vocab_size, pad_id)
