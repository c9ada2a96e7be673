"""A Megatron-style tensor-parallel GPT-2, made from the stage-6 GPT (llmlab/models/gpt.py) by swapping its
layers for the parallel ones of llmlab/parallel/layers.py (Shoeybi et al. 2019, "Megatron-LM", §3, Figure 3).

`parallelize_gpt(model, tp)` turns a whole GPT, the same on every rank, into this rank's part, in place:

    attention   q_proj, k_proj, v_proj  ColumnParallelLinear: this rank's n_head/p heads (h/p output rows
                                        each; one f before the three, since they read the same input)
                out_proj                RowParallelLinear: the heads' partial products summed by g
    MLP         c_fc                    ColumnParallelLinear [4h/p, h] (with its own f)
                c_proj                  RowParallelLinear [h, 4h/p] (g)
    wte         VocabParallelEmbedding  rows of a vocabulary padded to a multiple of `pad_vocab_multiple`
    lm_head     tied to wte's shard     logits of this rank's vocabulary slice [B, T, V_pad/p]; the padding
                                        columns are −inf (they are not classes: the loss and the argmax
                                        never see them), cross-entropy in llmlab/parallel/cross_entropy.py
    wpe, LayerNorms                     replicated (every rank holds and updates the same copy)

So each block does one all-reduce of [B, T, h] in forward and one in backward for attention, and the same
for the MLP (4 per layer per step), plus one each for the embedding (forward) and the head (backward). The
attention computation itself is the stage-5 module, running on the local heads (`num_heads` = n_head/p).

Parameter names and full shapes are the GPT's, so `gather_state_dict` gives the single-device GPT's state
dict (padding dropped) — which llmlab.models.gpt's HF converter turns into a GPT2LMHeadModel — and
`load_full_state_dict` shards one back. Each sharded parameter records its `partition_dim`; the vocabulary
weight also `padded_rows_from` (rows from there on are padding). `canonical` / `local_part` do the same for
any tensor shaped like a parameter (Adam's moments), so optimizer states gather and re-shard too.

Dropout must be 0 with p > 1: dropout inside the parallel region needs a separate RNG stream per rank and
outside it one shared stream (Megatron's RNG tracker), which this lab does not implement.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.models.gpt import GPT
from llmlab.nn.attention import MultiHeadAttention
from llmlab.parallel.collectives import TPGroup, copy_to_tp_region
from llmlab.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

__all__ = [
    "ParallelLMHead",
    "ParallelSelfAttention",
    "canonical",
    "gather_state_dict",
    "load_full_state_dict",
    "local_part",
    "padded_vocab_size",
    "parallelize_gpt",
]


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """The vocabulary rounded up to a multiple of `multiple` (Megatron's make_vocab_size_divisible_by)."""
    return -(-vocab_size // multiple) * multiple


class ParallelSelfAttention(MultiHeadAttention):
    """The stage-5 attention on this rank's heads: f once on the input, then the module's own stacked
    q/k/v GEMM over the local [h/p, h] weights, attention over n_head/p heads, and the row-parallel output
    projection (whose g sums the heads' contributions)."""

    tp: TPGroup

    def forward(self, query: Tensor, **kw) -> tuple[Tensor, Tensor | None]:
        if kw.get("key") is not None or kw.get("value") is not None:
            raise ValueError("ParallelSelfAttention is self-attention only")
        return super().forward(copy_to_tp_region(query, self.tp), **kw)  # [B, T, h]


class ParallelLMHead(nn.Module):
    """logits of this rank's vocabulary slice, from the (tied) VocabParallelEmbedding's rows: h [B, T, d]
    -> [B, T, V_pad/p], the padding columns at −inf."""

    def __init__(self, embedding: VocabParallelEmbedding, vocab_size: int) -> None:
        super().__init__()
        self.weight = embedding.weight  # tied: the same Parameter
        self.tp, self.vocab_size = embedding.tp, vocab_size
        start = embedding.start
        ids = torch.arange(start, start + embedding.per_rank)  # [V_pad/p] the global ids held here
        self.register_buffer("padding", ids >= vocab_size, persistent=False)  # [V_pad/p]

    def forward(self, h: Tensor) -> Tensor:
        logits = F.linear(copy_to_tp_region(h, self.tp), self.weight)  # [B, T, V_pad/p]
        if bool(self.padding.any()):
            logits = logits.masked_fill(self.padding, float("-inf"))
        return logits


@torch.no_grad()
def parallelize_gpt(model: GPT, tp: TPGroup, pad_vocab_multiple: int = 128) -> GPT:
    """`model` (the whole GPT, identical on every rank of `tp`) becomes this rank's tensor-parallel part, in
    place; returned for convenience. Its forward gives [B, T, V_pad/p]: logits of the local vocabulary
    slice."""
    cfg = model.cfg
    p = tp.size
    if cfg.n_head % p or (4 * cfg.n_embd) % p:
        raise ValueError(f"n_head={cfg.n_head} and 4·n_embd={4 * cfg.n_embd} must be divisible by TP={p}")
    if p > 1 and cfg.dropout > 0:
        raise ValueError("dropout > 0 under tensor parallelism needs Megatron's per-rank RNG tracker: set 0")
    v_pad = padded_vocab_size(cfg.vocab_size, pad_vocab_multiple)
    if v_pad % p:
        raise ValueError(f"the padded vocabulary {v_pad} is not divisible by TP={p}")
    dtype = model.transformer.wte.weight.dtype
    for block in model.transformer.h:
        old = block.attn
        attn = ParallelSelfAttention.__new__(ParallelSelfAttention)
        nn.Module.__init__(attn)
        attn.tp = tp
        attn.embed_dim, attn.num_heads = old.embed_dim // p, old.num_heads // p  # local: h/p, n_head/p
        attn.head_dim, attn.scale, attn.dropout, attn.impl = old.head_dim, old.scale, old.dropout, old.impl
        attn.fused_qkv = True  # one stacked GEMM over the local q, k, v rows
        for name in ("q_proj", "k_proj", "v_proj"):
            lin = getattr(old, name)
            setattr(attn, name, ColumnParallelLinear.from_full(lin.weight, lin.bias, tp, copy_input=False))
        attn.out_proj = RowParallelLinear.from_full(old.out_proj.weight, old.out_proj.bias, tp)
        block.attn = attn
        mlp = block.mlp
        mlp.c_fc = ColumnParallelLinear.from_full(mlp.c_fc.weight, mlp.c_fc.bias, tp)
        mlp.c_proj = RowParallelLinear.from_full(mlp.c_proj.weight, mlp.c_proj.bias, tp)
    full = model.transformer.wte.weight  # [V, d]
    padded = torch.cat([full, full.new_zeros(v_pad - cfg.vocab_size, cfg.n_embd)])  # [V_pad, d]
    wte = VocabParallelEmbedding(v_pad, cfg.n_embd, tp)
    wte.load_full(padded)
    wte.weight.padded_rows_from = cfg.vocab_size
    model.transformer.wte = wte
    model.lm_head = ParallelLMHead(wte, cfg.vocab_size)
    model.tp = tp
    return model.to(dtype)


# ------------------------------------------------------------------------------------- gather and re-shard
def _gather(t: Tensor, dim: int, tp: TPGroup) -> Tensor:
    if tp.size == 1:
        return t.clone()
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(tp.size)]
    dist.all_gather(parts, t, group=tp.group)
    return torch.cat(parts, dim=dim)


def canonical(t: Tensor, param: nn.Parameter, tp: TPGroup) -> Tensor:
    """The whole, single-device form of a tensor shaped like this rank's `param` (the parameter itself, or
    an optimizer moment of it): gathered along its `partition_dim`, vocabulary padding dropped. Every rank
    of the group must call it (an all-gather)."""
    dim = getattr(param, "partition_dim", None)
    out = t.detach().clone() if dim is None or t.dim() == 0 else _gather(t.detach(), dim, tp)
    rows = getattr(param, "padded_rows_from", None)
    return out[:rows].clone() if rows is not None and out.dim() > 0 else out


def local_part(full: Tensor, param: nn.Parameter, tp: TPGroup) -> Tensor:
    """`canonical`'s inverse: this rank's part of a whole tensor (the vocabulary padded with zeros)."""
    if full.dim() == 0:
        return full.clone()
    rows = getattr(param, "padded_rows_from", None)
    dim = getattr(param, "partition_dim", None)
    if rows is not None:
        v_pad = param.shape[0] * (tp.size if dim == 0 else 1)
        if full.shape[0] != rows:
            raise ValueError(f"vocabulary rows: {full.shape[0]} given, the model has {rows}")
        full = torch.cat([full, full.new_zeros(v_pad - rows, *full.shape[1:])])
    if dim is None:
        return full.clone()
    n = full.shape[dim] // tp.size
    return full.narrow(dim, tp.rank * n, n).clone()


def gather_state_dict(model: GPT) -> dict[str, Tensor]:
    """The single-device GPT's state dict (names, shapes, no padding) from a tensor-parallel GPT; every rank
    of its group must call it."""
    tp = model.tp
    params = dict(model.named_parameters(remove_duplicate=False))
    out: dict[str, Tensor] = {}
    for name, t in model.state_dict().items():
        out[name] = canonical(t, params[name], tp) if name in params else t.clone()
    return out


@torch.no_grad()
def load_full_state_dict(model: GPT, full: dict[str, Tensor]) -> None:
    """Load a single-device GPT's state dict into this rank's part (strict: same names and full shapes)."""
    tp = model.tp
    params = dict(model.named_parameters(remove_duplicate=False))
    own = model.state_dict()
    missing, unexpected = set(own) - set(full), set(full) - set(own)
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    for name, p in params.items():
        part = local_part(full[name], p, tp)
        if part.shape != p.shape:
            raise RuntimeError(f"{name}: a full shape of {tuple(full[name].shape)} does not fit this model")
        p.copy_(part)
