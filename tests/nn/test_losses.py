"""llmlab.nn.losses.label_smoothed_nll equals torch's F.cross_entropy(label_smoothing, ignore_index), forward
and gradient, in float64: the same formula summed in another order, so differences are rounding (~1e-16 per
token on O(1) values); TOL = 1e-12 leaves margin, while smoothing over V - 1 classes instead of V (fairseq's
convention) or counting padding would move the loss by > 1e-3."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmlab.nn.losses import label_smoothed_nll

TOL = 1e-12
PAD = 0


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.3])
def test_equals_torch_cross_entropy_with_label_smoothing_and_padding(epsilon):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=torch.float64, generator=g).requires_grad_(True)
    target = torch.randint(1, 11, (3, 5), generator=g)
    target[0, 3:] = PAD
    target[2, 1:] = PAD
    loss_sum, nll_sum, n = label_smoothed_nll(logits, target, epsilon, PAD)
    assert int(n) == 15 - 2 - 4
    ref = F.cross_entropy(logits.view(-1, 11), target.view(-1), ignore_index=PAD, label_smoothing=epsilon)
    assert abs((loss_sum / n) - ref).item() <= TOL
    nll_ref = F.cross_entropy(logits.view(-1, 11), target.view(-1), ignore_index=PAD, reduction="sum")
    assert abs(nll_sum - nll_ref).item() <= TOL
    (g_ours,) = torch.autograd.grad(loss_sum / n, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert (g_ours - g_ref).abs().max().item() <= TOL
    assert g_ours[2, 1:].abs().max() == 0  # padding positions get no gradient


def test_all_padding_gives_zero_not_nan():
    logits = torch.randn(2, 3, 7)
    loss_sum, nll_sum, n = label_smoothed_nll(logits, torch.zeros(2, 3, dtype=torch.long), 0.1, PAD)
    assert loss_sum.item() == 0 and nll_sum.item() == 0 and n.item() == 0


def test_half_precision_logits_are_reduced_in_float32():
    logits = torch.randn(4, 9).to(torch.bfloat16)
    target = torch.tensor([1, 2, 3, 0])
    loss_sum, _, n = label_smoothed_nll(logits, target, 0.1, PAD)
    assert loss_sum.dtype == torch.float32
    ref = F.cross_entropy(logits.float(), target, ignore_index=PAD, label_smoothing=0.1)
    torch.testing.assert_close(loss_sum / n, ref)
