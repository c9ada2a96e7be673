"""Cross-entropy over a vocabulary split across ranks, never materialising the full logits on one rank
(Shoeybi et al. 2019, "Megatron-LM", §3: "fuse the output of the parallel GEMM with the cross entropy loss").

Rank r holds the logits z[:, V_r] of its slice V_r of the vocabulary ([N, V/p]). The loss of row n with
target t is

    ℓ_n = log Σ_v exp(z_nv) − z_nt = log Σ_v exp(z_nv − m_n) − (z_nt − m_n),   m_n = max_v z_nv

and each piece is a reduction over the vocabulary, so it is a local reduction followed by an all-reduce of
N numbers (not N·V): the max (all-reduce MAX), the sum of exponentials (SUM), and the target's logit (SUM:
only the rank holding t contributes, the others add 0). Backward needs no communication at all:

    ∂ℓ_n/∂z_nv = softmax(z_n)_v − [v = t],

computed for the local slice from the saved local exponentials and the global sum. Columns a model pads the
vocabulary with are masked to −inf before (llmlab/parallel/tp_gpt.py): exp(−inf) = 0, gradient 0.

`vocab_parallel_argmax` is the matching prediction: the local best, then MAX over ranks, ties to the lowest
index (as torch.argmax). Reference: megatron/core/tensor_parallel/cross_entropy.py.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from llmlab.parallel.collectives import TPGroup, all_reduce_

__all__ = ["vocab_parallel_argmax", "vocab_parallel_cross_entropy"]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor, tp: TPGroup) -> Tensor:
        n, v_local = logits.shape  # [N, V/p]
        start = tp.rank * v_local
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # the softmax in fp32 under autocast (fp32 and fp64 stay as they are)
        m = all_reduce_(logits.max(dim=-1).values.clone(), tp, dist.ReduceOp.MAX)  # [N] global max
        shifted = logits - m.unsqueeze(-1)  # [N, V/p], <= 0
        local_t = target - start  # [N]
        here = (local_t >= 0) & (local_t < v_local)  # [N] rows whose target this rank holds
        rows = torch.arange(n, device=logits.device)  # [N]
        picked = shifted[rows, local_t.clamp(0, v_local - 1)]  # [N] z_t - m where `here`
        picked = torch.where(here, picked, torch.zeros_like(picked))  # 0 elsewhere (never -inf · 0 = NaN)
        picked = all_reduce_(picked, tp)  # [N]
        exp = shifted.exp()  # [N, V/p]
        sum_exp = all_reduce_(exp.sum(dim=-1), tp)  # [N]
        loss = sum_exp.log() - picked  # [N]
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_t, here)  # softmax [N, V/p]
        return loss

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        softmax, local_t, here = ctx.saved_tensors
        rows = torch.arange(softmax.shape[0], device=softmax.device)  # [N]
        g = softmax.clone()  # [N, V/p]
        g[rows[here], local_t[here]] -= 1.0  # softmax - one_hot(t) on the rank holding t
        return g * grad.unsqueeze(-1), None, None  # [N, V/p]


def vocab_parallel_cross_entropy(logits: Tensor, target: Tensor, tp: TPGroup) -> Tensor:
    """logits [N, V/p] (this rank's vocabulary slice), target [N] global ids -> loss [N] per row, the same on
    every rank; its gradient flows into each rank's slice."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        shapes = f"{tuple(logits.shape)}, {tuple(target.shape)}"
        raise ValueError(f"logits [N, V/p] and target [N] expected, got {shapes}")
    return _VocabParallelCrossEntropy.apply(logits, target, tp)


@torch.no_grad()
def vocab_parallel_argmax(logits: Tensor, tp: TPGroup) -> Tensor:
    """logits [.., V/p] -> the global argmax [..] over the whole vocabulary, the same on every rank."""
    best, idx = logits.max(dim=-1)  # [..] local best and its local index
    if tp.size == 1:
        return idx
    idx = idx + tp.rank * logits.shape[-1]  # [..] global ids
    top = all_reduce_(best.clone(), tp, dist.ReduceOp.MAX)  # [..]
    candidate = torch.where(best == top, idx, torch.full_like(idx, torch.iinfo(idx.dtype).max))  # [..]
    return all_reduce_(candidate, tp, dist.ReduceOp.MIN)  # [..] the lowest index among the tied
