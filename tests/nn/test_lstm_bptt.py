"""Tests for llmlab.nn.lstm_bptt: hand-derived BPTT against autograd (torch.nn.LSTM and llmlab.nn.LSTM with
copied weights) and against central finite differences.

Tolerances: float64. The hand-derived backward and autograd evaluate the same products in a different
order, so they differ by rounding only (a few ulps of O(1) numbers, ~1e-16, accumulated over <= 7 steps);
GRAD_TOL = 1e-10 (max abs) leaves five orders of margin, while a wrong derivative (say sigmoid' written
s instead of s(1-s)) changes gradients by ~1e-2. Finite differences via torch.autograd.gradcheck (central,
eps=1e-6): truncation O(eps^2) ~ 1e-12 and rounding ~1e-16/eps ~ 1e-10, so atol=1e-7.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from llmlab.nn import LSTM, HandLSTM, lstm_bptt_backward, lstm_bptt_forward

DT = torch.float64
GRAD_TOL = 1e-10  # see module docstring
OUT_TOL = 1e-12  # forward values: rounding only, no backward pass involved
FD_ATOL = 1e-7  # see module docstring

IN, H, B, T = 5, 4, 4, 7
LENGTHS = [7, 2, 5, 1]  # unsorted, includes a length-1 sequence


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _data(seed: int = 1):
    """x [B, T, I], h0, c0 [B, H] (leaves requiring grad); upstream gradients dy [B, T, H], dh, dc [B, H]."""
    g = _gen(seed)
    x = torch.randn(B, T, IN, dtype=DT, generator=g).requires_grad_(True)
    h0 = torch.randn(B, H, dtype=DT, generator=g).requires_grad_(True)
    c0 = torch.randn(B, H, dtype=DT, generator=g).requires_grad_(True)
    dy = torch.randn(B, T, H, dtype=DT, generator=g)
    dh = torch.randn(B, H, dtype=DT, generator=g)
    dc = torch.randn(B, H, dtype=DT, generator=g)
    return x, h0, c0, dy, dh, dc


def _twins(bias: bool = True, seed: int = 0) -> tuple[HandLSTM, nn.LSTM]:
    torch.manual_seed(seed)
    ref = nn.LSTM(IN, H, bias=bias, batch_first=True).to(DT)
    hand = HandLSTM(IN, H, bias=bias).to(DT)
    with torch.no_grad():  # scramble, so that load_state_dict is what makes them equal
        for p in hand.parameters():
            p.normal_()
    hand.load_state_dict(ref.state_dict())
    return hand, ref


def _torch_reference(ref: nn.LSTM, x, h0, c0, dy, dh, dc, lengths):
    """Forward values and autograd's gradients of L = <y, dy> + <h_n, dh> + <c_n, dc> through nn.LSTM.

    With lengths, nn.LSTM runs on the packed sequence (its own variable-length path) and its output is padded
    back to T with zeros, so dy at padded positions cannot influence anything.
    """
    hx = None if h0 is None else (h0.unsqueeze(0), c0.unsqueeze(0))  # nn.LSTM wants [1, B, H]
    if lengths is None:
        y, (h_n, c_n) = ref(x, hx)
    else:
        packed = pack_padded_sequence(x, torch.tensor(lengths), batch_first=True, enforce_sorted=False)
        y_packed, (h_n, c_n) = ref(packed, hx)
        y, _ = pad_packed_sequence(y_packed, batch_first=True, total_length=T)
    h_n, c_n = h_n.squeeze(0), c_n.squeeze(0)
    loss = (y * dy).sum() + (h_n * dh).sum() + (c_n * dc).sum()
    leaves = [x] + ([] if h0 is None else [h0, c0]) + list(ref.parameters())
    grads = torch.autograd.grad(loss, leaves)
    return y.detach(), h_n.detach(), c_n.detach(), grads


# ----------------------------------------------------------------------------------------------------------
# Hand-derived BPTT == autograd
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "zero-state"])
@pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["full", "lengths"])
def test_bptt_matches_autograd_through_torch_lstm(lengths, with_h0, bias):
    hand, ref = _twins(bias)
    x, h0, c0, dy, dh, dc = _data()
    if not with_h0:
        h0 = c0 = None
    y_ref, h_n_ref, c_n_ref, grads_ref = _torch_reference(ref, x, h0, c0, dy, dh, dc, lengths)

    y, (h_n, c_n), cache = hand(x, h0, c0, lengths)
    assert not y.requires_grad  # no graph: the gradients below are all ours
    assert _max_abs(y, y_ref) <= OUT_TOL
    assert _max_abs(h_n, h_n_ref) <= OUT_TOL
    assert _max_abs(c_n, c_n_ref) <= OUT_TOL
    dx, dh0, dc0, grads = hand.backward(dy, dh, dc, cache)

    ours = [dx] + ([dh0, dc0] if with_h0 else []) + [grads[n] for n, _ in ref.named_parameters()]
    names = ["x"] + (["h0", "c0"] if with_h0 else []) + [n for n, _ in ref.named_parameters()]
    assert list(grads) == [n for n, _ in ref.named_parameters()]  # exactly nn.LSTM's parameter names
    for name, g, g_ref in zip(names, ours, grads_ref, strict=True):
        assert _max_abs(g, g_ref) <= GRAD_TOL, name
    if lengths is not None:
        pad = torch.arange(T) >= torch.tensor(lengths).unsqueeze(1)  # [B, T]
        assert torch.equal(y[pad], torch.zeros_like(y[pad]))
        assert torch.equal(dx[pad], torch.zeros_like(dx[pad]))  # padded steps receive no gradient


def test_bptt_matches_our_autograd_lstm_with_lengths():
    # the other twin: llmlab.nn.LSTM on the padded tensor + lengths (no packing involved)
    hand, ref = _twins()
    auto = LSTM(IN, H, batch_first=True).to(DT)
    auto.load_state_dict(ref.state_dict())
    x, h0, c0, dy, dh, dc = _data(seed=3)
    y_a, (h_a, c_a) = auto(x, (h0.unsqueeze(0), c0.unsqueeze(0)), lengths=LENGTHS)
    loss = (y_a * dy).sum() + (h_a[0] * dh).sum() + (c_a[0] * dc).sum()
    grads_ref = torch.autograd.grad(loss, [x, h0, c0] + list(auto.parameters()))

    _, _, cache = hand(x, h0, c0, LENGTHS)
    dx, dh0, dc0, grads = hand.backward(dy, dh, dc, cache)
    for name, g, g_ref in zip(
        ["x", "h0", "c0", *grads], [dx, dh0, dc0, *grads.values()], grads_ref, strict=True
    ):
        assert _max_abs(g, g_ref) <= GRAD_TOL, name


def test_padding_contents_do_not_matter():
    hand, _ = _twins()
    x, h0, c0, dy, dh, dc = _data(seed=4)
    pad = torch.arange(T) >= torch.tensor(LENGTHS).unsqueeze(1)  # [B, T]
    results = []
    for fill in (0.0, 1e3, float("nan")):
        xf = x.detach().clone()
        xf[pad] = fill
        dyf = dy.clone()
        dyf[pad] = fill  # an upstream gradient at padded positions is ignored too
        y, (h_n, c_n), cache = hand(xf, h0.detach(), c0.detach(), LENGTHS)
        dx, dh0, dc0, grads = hand.backward(dyf, dh, dc, cache, accumulate=False)
        results.append([y, h_n, c_n, dx, dh0, dc0, *grads.values()])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)  # bit-identical: padded values are selected away, never multiplied by 0


def test_none_upstream_gradients_mean_zero():
    hand, _ = _twins()
    x, h0, c0, dy, dh, dc = _data(seed=5)
    _, _, cache = hand(x, h0, c0)
    zeros_state = torch.zeros(B, H, dtype=DT)
    for args, explicit in (
        ((dy, None, None), (dy, zeros_state, zeros_state)),
        ((None, dh, None), (torch.zeros(B, T, H, dtype=DT), dh, zeros_state)),
    ):
        got = lstm_bptt_backward(*args, cache)
        want = lstm_bptt_backward(*explicit, cache)
        for a, b in zip(got[:3], want[:3], strict=True):
            assert torch.equal(a, b)
        for name in got[3]:
            assert torch.equal(got[3][name], want[3][name])


def test_handlstm_accumulates_grad_and_matches_torch_init():
    torch.manual_seed(9)
    ref = nn.LSTM(IN, H, batch_first=True)
    torch.manual_seed(9)
    hand = HandLSTM(IN, H)
    assert list(hand.state_dict()) == list(ref.state_dict())
    for (n, p), p_ref in zip(hand.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, p_ref), n  # same seed -> bit-identical weights

    hand = hand.to(DT)
    x, h0, c0, dy, dh, dc = _data(seed=6)
    _, _, cache = hand(x, h0, c0)
    _, _, _, grads = hand.backward(dy, dh, dc, cache)
    first = {n: p.grad.clone() for n, p in hand.named_parameters()}
    hand.backward(dy, dh, dc, cache)  # a second call adds, like a second loss.backward()
    for n, p in hand.named_parameters():
        assert torch.equal(first[n], grads[n])
        assert _max_abs(p.grad, 2 * grads[n]) <= 1e-15 * max(1.0, grads[n].abs().max().item())


def test_bias_arguments_must_come_together():
    x = torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match="bias"):
        lstm_bptt_forward(x, torch.randn(8, 3), torch.randn(8, 2), torch.randn(8), None)
    with pytest.raises(ValueError, match="lengths"):
        lstm_bptt_forward(x, torch.randn(8, 3), torch.randn(8, 2), lengths=[3])


# ----------------------------------------------------------------------------------------------------------
# Finite differences on a tiny instance
# ----------------------------------------------------------------------------------------------------------
class _HandLSTMFn(torch.autograd.Function):
    """Routes autograd through our forward/backward, so gradcheck compares them with finite differences."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths):
        y, (h_n, c_n), cache = lstm_bptt_forward(x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths)
        ctx.cache = cache
        return y, h_n, c_n

    @staticmethod
    def backward(ctx, dy, dh, dc):
        dx, dh0, dc0, g = lstm_bptt_backward(dy, dh, dc, ctx.cache)
        return dx, dh0, dc0, g["weight_ih_l0"], g["weight_hh_l0"], g["bias_ih_l0"], g["bias_hh_l0"], None


@pytest.mark.parametrize("lengths", [None, [3, 1]], ids=["full", "lengths"])
def test_bptt_finite_differences(lengths):
    g = _gen(10)
    b, t, i, h = 2, 3, 2, 2
    inputs = (
        torch.randn(b, t, i, dtype=DT, generator=g),
        torch.randn(b, h, dtype=DT, generator=g),
        torch.randn(b, h, dtype=DT, generator=g),
        torch.randn(4 * h, i, dtype=DT, generator=g),
        torch.randn(4 * h, h, dtype=DT, generator=g),
        torch.randn(4 * h, dtype=DT, generator=g),
        torch.randn(4 * h, dtype=DT, generator=g),
    )
    inputs = tuple(v.requires_grad_(True) for v in inputs)
    assert torch.autograd.gradcheck(
        lambda *args: _HandLSTMFn.apply(*args, lengths), inputs, eps=1e-6, atol=FD_ATOL, rtol=1e-6
    )
