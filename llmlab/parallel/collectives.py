"""The collectives of Megatron-style tensor parallelism as autograd Functions (Shoeybi et al. 2019,
"Megatron-LM: Training Multi-Billion Parameter Language Models Using Model Parallelism", §3).

A layer split over p ranks needs its input and output moved between two layouts: *replicated* (every rank
holds the whole tensor) and *parallel* (rank r holds slice r of the last dimension, or a partial sum). Each
move is a pair — what forward does, and what backward must do to the gradient so that every rank ends with
the gradient of its own view. The four pairs, named forward → backward:

    IdentityToAllReduce   Megatron's f   replicated in, replicated out; every rank then computes a part of
                                         dL/dx (from its slice of the next layer): backward sums the parts
    AllReduceToIdentity   Megatron's g   partial sums in, their sum out (the same on every rank);
                                         each rank's partial sum got the whole gradient: backward passes it
    SplitToGather         scatter        replicated in, rank r's slice of the last dim out; backward gathers
                                         the slices' gradients into the whole
    GatherToSplit         gather         slices in, the whole out; backward keeps the slice of the gradient
                                         that belongs to this rank

f and g are conjugate: f's backward is g's forward. A column-parallel layer followed by a row-parallel one
(attention's QKV then its output projection; the MLP's two matrices) needs one f before and one g after —
one all-reduce in forward and one in backward per block, whatever p is (paper, Figure 3).

The process group is always passed explicitly as a `TPGroup` (the group, this rank's index in it, its size,
and an optional `CommMeter` that counts bytes and time of each collective); with size 1 every collective is
the identity and no process group is needed at all. Reference: megatron/core/tensor_parallel/mappings.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "CommMeter",
    "TPGroup",
    "all_reduce_",
    "copy_to_tp_region",
    "gather_from_tp_region",
    "reduce_from_tp_region",
    "scatter_to_tp_region",
]


@dataclass
class CommMeter:
    """Bytes moved and wall time spent in collectives, by kind ("tp_all_reduce", "tp_all_gather",
    "dp_all_reduce", ...). `synchronize`: on CUDA, wait for the device before and after each collective, so
    the time is the collective's own (and not the kernels queued before it); on CPU gloo is synchronous."""

    synchronize: bool = True
    paused: bool = False  # e.g. during evaluation, which is not part of a training step
    bytes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: int, seconds: float) -> None:
        if self.paused:
            return
        self.bytes[kind] = self.bytes.get(kind, 0) + nbytes
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds
        self.calls[kind] = self.calls.get(kind, 0) + 1

    def take(self) -> tuple[dict[str, int], dict[str, float], dict[str, int]]:
        """The totals since the last take, and a fresh start."""
        out = (self.bytes, self.seconds, self.calls)
        self.bytes, self.seconds, self.calls = {}, {}, {}
        return out


@dataclass
class TPGroup:
    """One tensor-parallel group as its layers see it: `group` (None only when size is 1), this process's
    `rank` within it, its `size`, and the meter its collectives report to."""

    group: Any = None
    rank: int = 0
    size: int = 1
    meter: CommMeter | None = None

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"TPGroup: rank {self.rank} of size {self.size}")
        if self.size > 1 and self.group is None:
            raise ValueError("a TPGroup of more than one rank needs its process group")


def _timed(tp: TPGroup, kind: str, t: Tensor, run: Any) -> Any:
    """Run the collective `run()` on tensor `t`, reporting its payload bytes and time to the meter."""
    meter = tp.meter
    if meter is None or meter.paused:
        return run()
    cuda = t.is_cuda and meter.synchronize
    if cuda:
        torch.cuda.synchronize(t.device)
    start = time.perf_counter()
    out = run()
    if cuda:
        torch.cuda.synchronize(t.device)
    meter.add(kind, t.numel() * t.element_size(), time.perf_counter() - start)
    return out


def all_reduce_(t: Tensor, tp: TPGroup, op: Any = dist.ReduceOp.SUM, kind: str = "tp_all_reduce") -> Tensor:
    """In place over the group (no autograd); a group of one leaves `t` as it is."""
    if tp.size > 1:
        _timed(tp, kind, t, lambda: dist.all_reduce(t, op=op, group=tp.group))
    return t


def _all_reduce(x: Tensor, tp: TPGroup) -> Tensor:
    """The sum over the group, in a new tensor (autograd may still need `x`)."""
    if tp.size == 1:
        return x
    return all_reduce_(x.contiguous().clone(), tp)


def _split_last(x: Tensor, tp: TPGroup) -> Tensor:
    """This rank's slice of the last dimension: [..., n] -> [..., n/p]."""
    if tp.size == 1:
        return x
    n = x.shape[-1]
    if n % tp.size:
        raise ValueError(f"last dimension {n} does not split into {tp.size} equal slices")
    return x.narrow(-1, tp.rank * (n // tp.size), n // tp.size).contiguous()


def _gather_last(x: Tensor, tp: TPGroup) -> Tensor:
    """The slices of all ranks, concatenated along the last dimension: [..., n/p] -> [..., n]."""
    if tp.size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    _timed(tp, "tp_all_gather", x, lambda: dist.all_gather(parts, x, group=tp.group))
    return torch.cat(parts, dim=-1)


class IdentityToAllReduce(torch.autograd.Function):
    """f: forward the identity, backward the all-reduce (sum) of the gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, tp: TPGroup) -> Tensor:
        ctx.tp = tp
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _all_reduce(grad, ctx.tp), None


class AllReduceToIdentity(torch.autograd.Function):
    """g: forward the all-reduce (sum) of the partial results, backward the identity."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, tp: TPGroup) -> Tensor:
        return _all_reduce(x, tp)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class SplitToGather(torch.autograd.Function):
    """Forward keeps this rank's slice of the last dimension; backward all-gathers the slices' gradients."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, tp: TPGroup) -> Tensor:
        ctx.tp = tp
        return _split_last(x, tp)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _gather_last(grad, ctx.tp), None


class GatherToSplit(torch.autograd.Function):
    """Forward all-gathers the slices along the last dimension; backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, tp: TPGroup) -> Tensor:
        ctx.tp = tp
        return _gather_last(x, tp)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _split_last(grad, ctx.tp), None


def copy_to_tp_region(x: Tensor, tp: TPGroup) -> Tensor:
    """f (identity → all-reduce): before a column-parallel layer whose input is replicated."""
    return x if tp.size == 1 else IdentityToAllReduce.apply(x, tp)


def reduce_from_tp_region(x: Tensor, tp: TPGroup) -> Tensor:
    """g (all-reduce → identity): after a row-parallel layer, summing the ranks' partial products."""
    return x if tp.size == 1 else AllReduceToIdentity.apply(x, tp)


def scatter_to_tp_region(x: Tensor, tp: TPGroup) -> Tensor:
    """split → gather: a replicated tensor's slice of the last dimension for this rank."""
    return x if tp.size == 1 else SplitToGather.apply(x, tp)


def gather_from_tp_region(x: Tensor, tp: TPGroup) -> Tensor:
    """gather → split: the whole last dimension from the ranks' slices."""
    return x if tp.size == 1 else GatherToSplit.apply(x, tp)
