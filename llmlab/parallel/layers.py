"""Tensor-parallel layers (Shoeybi et al. 2019, "Megatron-LM", §3): a linear layer split by columns or by
rows of its weight, and an embedding split by vocabulary rows.

With torch's layout y = x Wᵀ + b, W [out, in] (Megatron writes Y = X A with A = Wᵀ):

    ColumnParallelLinear   A = [A_1 … A_p] by columns (W by rows): rank r holds W_r [out/p, in] and b_r,
                           computes Y_r = X A_r — its own slice of the output, no communication. Backward:
                           dL/dX = Σ_r dL/dY_r A_rᵀ is a sum over ranks: the f in front all-reduces it.
    RowParallelLinear      A = [A_1; …; A_p] by rows (W by columns): rank r holds W_r [out, in/p] and reads
                           its slice X_r of the input; Y = Σ_r X_r A_r: the g behind all-reduces the partial
                           products, then adds the (replicated) bias once.
    VocabParallelEmbedding rank r holds rows [r·V/p, (r+1)·V/p) of the table; a token outside them gives
                           zeros, so the all-reduce of the lookups is every token's row.

Column then row (the MLP: X → GeLU(X A) B; attention: QKV then the output projection) keeps the
intermediate [.., 4h/p] or [.., h/p] local: a nonlinearity applies elementwise to each slice, which is why
the first matrix is split by columns (GeLU(X A_1 + X A_2) ≠ GeLU(X A_1) + GeLU(X A_2)).

Every sharded parameter carries `partition_dim` (the dimension its full tensor was cut along) so a state dict
can be gathered and re-sharded generically (llmlab/parallel/tp_gpt.py). Initialisation slices one full
weight drawn identically on every rank (Megatron's `use_cpu_initialization`), so a TP model starts from the
same numbers as the single-device one. Reference: megatron/core/tensor_parallel/layers.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.parallel.collectives import (
    TPGroup,
    copy_to_tp_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    scatter_to_tp_region,
)

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "shard"]


def shard(full: Tensor, dim: int, tp: TPGroup) -> Tensor:
    """Rank `tp.rank`'s equal slice of `full` along `dim` (a copy)."""
    n = full.shape[dim]
    if n % tp.size:
        raise ValueError(f"dimension {dim} of size {n} does not split into {tp.size} equal parts")
    return full.narrow(dim, tp.rank * (n // tp.size), n // tp.size).clone()


def _linear_init(out_features: int, in_features: int, bias: bool) -> tuple[Tensor, Tensor | None]:
    """nn.Linear's default initialisation of the full weight [out, in] and bias [out]."""
    full = nn.Linear(in_features, out_features, bias=bias)
    return full.weight.detach(), (full.bias.detach() if bias else None)


def _parameter(t: Tensor, partition_dim: int | None) -> nn.Parameter:
    p = nn.Parameter(t)
    if partition_dim is not None:
        p.partition_dim = partition_dim  # read by the state-dict gather/shard of llmlab/parallel/tp_gpt.py
    return p


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ + b with W split by output rows: x [.., in] (replicated) -> y [.., out/p] (this rank's slice;
    the whole [.., out] with `gather_output`). `copy_input=False` when the caller already applied f to x
    (several column-parallel layers reading one input share one all-reduce in backward). `init=False` leaves
    the weights uninitialised, for `from_full` / `load_full`."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, bias: bool = True,
                 gather_output: bool = False, copy_input: bool = True,
                 init: bool = True) -> None:  # fmt: skip
        super().__init__()
        if out_features % tp.size:
            raise ValueError(f"out_features={out_features} is not divisible by the TP size {tp.size}")
        self.in_features, self.out_features, self.tp = in_features, out_features, tp
        self.gather_output, self.copy_input = gather_output, copy_input
        n = out_features // tp.size
        self.weight = _parameter(torch.empty(n, in_features), 0)  # [out/p, in]
        self.bias = _parameter(torch.empty(n), 0) if bias else None  # [out/p]
        if init:
            self.load_full(*_linear_init(out_features, in_features, bias))

    @classmethod
    def from_full(cls, weight: Tensor, bias: Tensor | None, tp: TPGroup, **kw) -> ColumnParallelLinear:
        """This rank's shard of a full layer (weight [out, in], bias [out])."""
        layer = cls(weight.shape[1], weight.shape[0], tp, bias=bias is not None, init=False, **kw)
        layer.load_full(weight, bias)
        return layer

    @torch.no_grad()
    def load_full(self, weight: Tensor, bias: Tensor | None) -> None:
        """This rank's part of the full weight and bias (their dtype and device)."""
        self.weight.data = shard(weight.detach(), 0, self.tp)  # [out/p, in]
        if self.bias is not None:
            self.bias.data = shard(bias.detach(), 0, self.tp)  # [out/p]

    def forward(self, x: Tensor) -> Tensor:
        if self.copy_input:
            x = copy_to_tp_region(x, self.tp)  # [.., in]: identity; backward sums dL/dx over ranks
        y = F.linear(x, self.weight, self.bias)  # [.., out/p]
        return gather_from_tp_region(y, self.tp) if self.gather_output else y  # [.., out] or [.., out/p]

    def extra_repr(self) -> str:
        p = self.tp.size
        return f"in={self.in_features}, out={self.out_features} (/{p}), gather={self.gather_output}"


class RowParallelLinear(nn.Module):
    """y = x Wᵀ + b with W split by input columns: x [.., in/p] (this rank's slice; the whole [.., in] when
    not `input_is_parallel`) -> y [.., out] (replicated after the all-reduce)."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, bias: bool = True,
                 input_is_parallel: bool = True, init: bool = True) -> None:  # fmt: skip
        super().__init__()
        if in_features % tp.size:
            raise ValueError(f"in_features={in_features} is not divisible by the TP size {tp.size}")
        self.in_features, self.out_features, self.tp = in_features, out_features, tp
        self.input_is_parallel = input_is_parallel
        self.weight = _parameter(torch.empty(out_features, in_features // tp.size), 1)  # [out, in/p]
        self.bias = _parameter(torch.empty(out_features), None) if bias else None  # [out], replicated
        if init:
            self.load_full(*_linear_init(out_features, in_features, bias))

    @classmethod
    def from_full(cls, weight: Tensor, bias: Tensor | None, tp: TPGroup, **kw) -> RowParallelLinear:
        layer = cls(weight.shape[1], weight.shape[0], tp, bias=bias is not None, init=False, **kw)
        layer.load_full(weight, bias)
        return layer

    @torch.no_grad()
    def load_full(self, weight: Tensor, bias: Tensor | None) -> None:
        """This rank's part of the full weight and bias (their dtype and device)."""
        self.weight.data = shard(weight.detach(), 1, self.tp)  # [out, in/p]
        if self.bias is not None:
            self.bias.data = bias.detach().clone()  # [out]

    def forward(self, x: Tensor) -> Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.tp)  # [.., in] -> [.., in/p]
        partial = F.linear(x, self.weight)  # [.., out]: this rank's term of the sum over input slices
        y = reduce_from_tp_region(partial, self.tp)  # [.., out], the same on every rank
        return y + self.bias if self.bias is not None else y  # the bias once, after the sum

    def extra_repr(self) -> str:
        return f"in={self.in_features} (/{self.tp.size}), out={self.out_features}"


class VocabParallelEmbedding(nn.Module):
    """A [V, d] table split by rows: ids [..] (replicated) -> vectors [.., d] (replicated)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TPGroup) -> None:
        super().__init__()
        if num_embeddings % tp.size:
            raise ValueError(f"num_embeddings={num_embeddings} is not divisible by the TP size {tp.size}")
        self.num_embeddings, self.embedding_dim, self.tp = num_embeddings, embedding_dim, tp
        self.per_rank = num_embeddings // tp.size
        self.start = tp.rank * self.per_rank  # rows [start, start + per_rank) live here
        full = torch.empty(num_embeddings, embedding_dim)
        nn.init.normal_(full)  # nn.Embedding's default
        self.weight = _parameter(shard(full, 0, tp), 0)  # [V/p, d]

    @torch.no_grad()
    def load_full(self, weight: Tensor) -> None:
        self.weight.data = shard(weight.detach(), 0, self.tp)  # [V/p, d]

    def forward(self, ids: Tensor) -> Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)  # [.., d]
        local = ids - self.start  # [..]
        outside = (local < 0) | (local >= self.per_rank)  # [..] ids another rank holds
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)  # [.., d]
        rows = rows.masked_fill(outside.unsqueeze(-1), 0.0)  # [.., d] zeros for the other ranks' ids
        return reduce_from_tp_region(rows, self.tp)  # [.., d]: exactly one rank contributed each row

    def extra_repr(self) -> str:
        return f"{self.num_embeddings} (/{self.tp.size}), {self.embedding_dim}"
