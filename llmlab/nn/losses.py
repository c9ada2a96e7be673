"""Label-smoothed cross-entropy over tokens, ignoring padding (Szegedy et al. 2016, "Rethinking the Inception
Architecture", §7; used by the Transformer with ε = 0.1, Vaswani et al. 2017 §5.4).

Instead of the one-hot target, the model is trained towards q = (1 - ε)·onehot(y) + ε·u with u uniform over
the V classes. With log-probabilities log p = log_softmax(z):

    H(q, p) = -Σ_j q_j log p_j = (1 - ε)·(-log p_y) + ε·(1/V)·Σ_j (-log p_j)
            = (1 - ε)·NLL + ε·(mean over classes of -log p_j)

and its gradient with respect to the logits is p - q: the model is pulled towards q, never all the way to a
one-hot (which would need infinite logits), which hurts perplexity but improves BLEU (§6.1). Positions whose
target is `ignore_index` (padding) contribute nothing, and the mean is over the remaining tokens — so a
batch's loss does not depend on how much padding it carries. This is the convention of torch's
`F.cross_entropy(label_smoothing=ε, ignore_index=pad)` (tests/nn/test_losses.py proves them equal, forward
and gradients); fairseq spreads ε over the V - 1 wrong classes instead, a difference of ε/V on the true class.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["label_smoothed_nll"]


def label_smoothed_nll(
    logits: Tensor, target: Tensor, epsilon: float, ignore_index: int
) -> tuple[Tensor, Tensor, Tensor]:
    """logits [..., V], target [...] -> (smoothed loss summed over real tokens, NLL summed over real tokens,
    number of real tokens), all scalars. loss / count is the per-token mean that `F.cross_entropy` returns."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits  # fp32 softmax
    logp = torch.log_softmax(logits, dim=-1)  # [..., V]
    real = target.ne(ignore_index)  # [...]
    safe = target.masked_fill(~real, 0)  # any valid index where padding is; masked out below
    nll = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # [...] -log p_y
    smooth = -logp.mean(dim=-1)  # [...] (1/V) Σ_j -log p_j
    loss = (1.0 - epsilon) * nll + epsilon * smooth  # [...]
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    return (
        torch.where(real, loss, zero).sum(),
        torch.where(real, nll, zero).sum(),
        real.sum(),
    )
