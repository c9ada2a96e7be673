"""Multi-head attention (Vaswani et al. 2017, "Attention Is All You Need", §3.2) with two interchangeable
paths and an incremental key/value cache for decoding.

Scaled dot-product attention of T queries over S keys/values (§3.2.1):

    Attention(Q, K, V) = softmax(Q Kᵀ / √d_k) V          Q [T, d_k], K [S, d_k], V [S, d_v] -> [T, d_v]

Why 1/√d_k: for q and k with independent unit-variance entries, q·k is a sum of d_k unit-variance products,
so its variance is d_k; dividing by √d_k brings the logits back to variance 1, where the softmax still has
useful gradients instead of saturating onto one key.

Multi-head (§3.2.2): h heads attend in d_k = d_model / h dimensional subspaces, and their outputs are
concatenated and mixed by W^O:

    head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V),     MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O

Each W^Q, W^K, W^V here is one [d_model, d_model] projection (`q_proj`, `k_proj`, `v_proj`, the names of
HF BART / Marian / LLaMA checkpoints) whose output is cut into h slices of d_k; `out_proj` is W^O.

Cost of one layer on a sequence of n tokens (the derivation is in docs/stage5-transformer.md): the four
projections take 4·n·d² multiply-adds (8·n·d² FLOPs), the scores Q Kᵀ and the weighted sum each n²·d
(together 4·n²·d FLOPs), and the [h, n, n] score matrix is the O(n²) memory that long sequences run out of.

Two paths, chosen by `impl` and proven equal in tests/nn/test_attention.py:
- "naive": the formula written out (scores, mask, softmax, dropout, weighted sum); the only path that can
  return the attention weights (`need_weights=True` always takes it), e.g. to draw them;
- "fused": `torch.nn.functional.scaled_dot_product_attention`, which picks a flash / memory-efficient
  kernel where one applies and never keeps the [n, n] matrix for backward when it does.

Masks follow `torch.nn.MultiheadAttention`: `key_padding_mask` [B, S] bool, True = padding (never attended
to); `attn_mask` [T, S] or [B·h, T, S] (or [B, h, T, S]), bool True = not allowed, or float added to the
scores; `is_causal=True` lets query t see only keys ≤ t — aligned to the END of the keys, so it stays right
when a cache already holds earlier positions (query t of T new ones sits at absolute position S - T + t).

KV cache (decoding): the keys and values of earlier positions never change, so a decoder keeps them and
computes only the new position's. Step t then costs O(d²) for the projections and O(t·d) for attention,
instead of re-running the whole prefix (O(t·d²) + O(t²·d)). Cross-attention (`static_kv=True`) computes the
encoder's keys and values once, at the first step. `KVCache.reorder` lets beam search move each cache row to
the hypothesis it continues.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AttentionImpl = Literal["naive", "fused"]

__all__ = ["AttentionImpl", "KVCache", "MultiHeadAttention", "build_attention_mask"]


class KVCache:
    """Keys and values of the positions processed so far, for one attention layer: [B, h, t, d_k] each."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add the new positions' keys and values [B, h, t_new, d_k]; return all of them [B, h, t, d_k]."""
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=2)  # [B, h, t + t_new, d_k]
            self.v = torch.cat([self.v, v], dim=2)  # [B, h, t + t_new, d_k]
        return self.k, self.v

    def reorder(self, index: Tensor) -> None:
        """Row i becomes old row index[i] (beam search: a hypothesis continues its parent's cache)."""
        if self.k is not None:
            self.k = self.k.index_select(0, index)  # [B', h, t, d_k]
            self.v = self.v.index_select(0, index)  # [B', h, t, d_k]


def build_attention_mask(
    batch: int,
    heads: int,
    t: int,
    s: int,
    *,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> Tensor | None:
    """One additive mask for the scores [B, h, T, S] (or broadcastable to it): 0 where a query may attend,
    -inf where it may not, plus a float `attn_mask` as given. None when nothing is masked.

    key_padding_mask [B, S] bool (True = padding); attn_mask [T, S], [B·h, T, S] or [B, h, T, S], bool
    (True = not allowed) or float (added); is_causal: key j is allowed for query i iff j <= i + (S - T).
    """
    mask: Tensor | None = None
    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=device)
    zero = torch.tensor(0.0, dtype=dtype, device=device)
    if is_causal:
        allowed = torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)  # [T, S]
        mask = torch.where(allowed, zero, neg_inf)  # [T, S]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            extra = torch.where(attn_mask, neg_inf, zero)
        else:
            extra = attn_mask.to(dtype)
        if extra.dim() == 3:  # [B·h, T, S], nn.MultiheadAttention's 3-D layout
            extra = extra.view(batch, heads, t, s)
        mask = extra if mask is None else mask + extra  # [T, S] or [B, h, T, S]
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, s):
            raise ValueError(
                f"key_padding_mask must be [B, S] = [{batch}, {s}], got {tuple(key_padding_mask.shape)}"
            )
        pad = torch.where(key_padding_mask, neg_inf, zero).view(batch, 1, 1, s)  # [B, 1, 1, S]
        mask = pad if mask is None else mask + pad  # broadcast to [B, h|1, T, S]
    return mask


class MultiHeadAttention(nn.Module):
    """Batch-first multi-head attention: query [B, T, d_model], key [B, S, kdim], value [B, S, vdim].

    `forward` returns (output [B, T, d_model], weights [B, h, T, S] or None): the weights, per head, are the
    softmax probabilities before dropout, returned only with `need_weights=True`."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        impl: AttentionImpl = "fused",
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        if impl not in ("naive", "fused"):
            raise ValueError(f"impl must be 'naive' or 'fused', got {impl!r}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.dropout = dropout
        self.impl: AttentionImpl = impl
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        # Self-attention computes q, k, v with one stacked GEMM (`_project_qkv`); False calls the three
        # projections one by one (the same numbers up to rounding; DeepSpeed ZeRO-3 runs both ways)
        self.fused_qkv = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Glorot & Bengio (2010) uniform on every projection, zero biases (as the paper's reference code and
        # The Annotated Transformer; torch's MultiheadAttention applies it to the stacked [3d, d] weight).
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def _split_heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # [B, n, d] -> [B, h, n, d_k]

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        need_weights: bool = False,
        cache: KVCache | None = None,
        static_kv: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Self-attention when key/value are None. With a `cache`, key/value hold only the NEW positions
        (self-attention: appended to the cache) or, with `static_kv`, the encoder output (projected once and
        reused by every later call)."""
        key = query if key is None else key
        value = key if value is None else value
        b, t, _ = query.shape
        if self.fused_qkv and key is query and value is query and not static_kv:
            q, k, v = self._project_qkv(query)  # [B, h, T, d_k] each
            if cache is not None:
                k, v = cache.append(k, v)  # [B, h, S, d_k]
        else:
            q = self._split_heads(self.q_proj(query))  # [B, h, T, d_k]
            if cache is not None and static_kv and cache.k is not None:
                k, v = cache.k, cache.v  # [B, h, S, d_k]: the encoder's, projected at the first step
            else:
                k = self._split_heads(self.k_proj(key))  # [B, h, S_new, d_k]
                v = self._split_heads(self.v_proj(value))  # [B, h, S_new, d_k]
                if cache is not None:
                    k, v = cache.append(k, v)  # [B, h, S, d_k]
        s = k.shape[2]
        if need_weights or self.impl == "naive":
            mask = build_attention_mask(
                b,
                self.num_heads,
                t,
                s,
                key_padding_mask=key_padding_mask,
                attn_mask=attn_mask,
                is_causal=is_causal,
                dtype=q.dtype,
                device=q.device,
            )
            out, weights = self._naive(q, k, v, mask)  # [B, h, T, d_k], [B, h, T, S]
        else:
            out, weights = self._fused(q, k, v, key_padding_mask, attn_mask, is_causal), None
        out = out.transpose(1, 2).reshape(b, t, self.embed_dim)  # [B, h, T, d_k] -> [B, T, d_model]
        return self.out_proj(out), (weights if need_weights else None)  # [B, T, d_model]

    def _project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention's three projections as ONE matrix product with the stacked [3d, d] weight (what
        GPT-2's `c_attn` and torch's `in_proj_weight` store): one GEMM instead of three small ones, forward
        and backward. Stacking copies 3·d² numbers per call; the GEMM does B·T·3·d² multiply-adds."""
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])  # [3d, d]
        bias = None
        if self.q_proj.bias is not None:
            bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])  # [3d]
        q, k, v = F.linear(x, w, bias).split(self.embed_dim, dim=-1)  # [B, T, 3d] -> 3 x [B, T, d]
        return self._split_heads(q), self._split_heads(k), self._split_heads(v)  # [B, h, T, d_k] each

    def _naive(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        scores = (q @ k.transpose(-2, -1)) * self.scale  # [B, h, T, d_k] @ [B, h, d_k, S] -> [B, h, T, S]
        if mask is not None:
            scores = scores + mask  # -inf where not allowed
        weights = scores.softmax(dim=-1)  # [B, h, T, S], each row sums to 1 over the allowed keys
        dropped = F.dropout(weights, self.dropout, self.training)  # [B, h, T, S]
        return dropped @ v, weights  # [B, h, T, S] @ [B, h, S, d_k] -> [B, h, T, d_k]

    def _fused(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
        is_causal: bool,
    ) -> Tensor:
        t, s = q.shape[2], k.shape[2]
        dropout = self.dropout if self.training else 0.0
        if key_padding_mask is None and attn_mask is None and (not is_causal or t == s):
            # No mask tensor at all: the kernels' fastest path (their own causal mask when T == S).
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=is_causal)
        mask = build_attention_mask(
            q.shape[0],
            self.num_heads,
            t,
            s,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            is_causal=is_causal,
            dtype=q.dtype,
            device=q.device,
        )
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # [B, h, T, d_k]
