r"""An LSTM layer with backpropagation through time derived by hand (no autograd).

References: LSTM of Hochreiter & Schmidhuber 1997 with the forget gate of Gers, Schmidhuber & Cummins 2000;
backpropagation through time as in Werbos 1990, "Backpropagation Through Time: What It Does and How to Do It"
(Proc. IEEE 78(10)). Layout and gate order are torch.nn.LSTM's layer 0 (gates i, f, g, o stacked in
weight_ih [4H, I] and weight_hh [4H, H]), so weights copy across from nn.LSTM / llmlab.nn.LSTM unchanged.

Single layer, unidirectional, BATCH-FIRST: x is [B, T, I], the output [B, T, H]; states h0, c0, h_n, c_n are
[B, H] (no leading layer dimension). B = batch, T = time steps, I = input size, H = hidden size; "*" is the
element-wise product, "@" the matrix product, and L the scalar loss whose gradients we want.

Forward, for t = 0, 1, ..., T-1, starting from h_{-1} = h0, c_{-1} = c0 (zeros when not given):

    a_t   = x_t @ W_ih^T + b_ih + h_{t-1} @ W_hh^T + b_hh        [B, 4H]   pre-activations
    [a^i, a^f, a^g, a^o] = a_t split into four [B, H] blocks
    i_t = sigmoid(a^i),  f_t = sigmoid(a^f),  g_t = tanh(a^g),  o_t = sigmoid(a^o)      each [B, H]
    c~_t  = f_t * c_{t-1} + i_t * g_t                              [B, H]   candidate new cell
    h~_t  = o_t * tanh(c~_t)                                       [B, H]   candidate new hidden state

Variable lengths: m_t[b] = 1 if t < len_b else 0 (a [B, 1] column). A padded step keeps the old state and
emits zero:

    c_t = m_t c~_t + (1 - m_t) c_{t-1}          h_t = m_t h~_t + (1 - m_t) h_{t-1}          y_t = m_t h~_t

Outputs: y = [y_0 .. y_{T-1}] as [B, T, H]; h_n = h_{T-1}, c_n = c_{T-1} (each sequence's state at its
own last valid step). Without lengths every m_t = 1 and these reduce to c_t = c~_t, h_t = y_t = h~_t.

Backward. Write dZ for dL/dZ. Given dy_t (from d_output), dh_{T-1} = d_h_n and dc_{T-1} = d_c_n, the only
paths from step t to the loss are y_t, h_t and c_t (h_t and c_t feed step t+1, whose gradient has already
been folded into dh_t and dc_t when we walk t from T-1 down to 0). For each t:

 1. Through the mask:   dh~_t = m_t (dy_t + dh_t)                                             [B, H]
    (h~_t reaches L through y_t and through h_t, each with factor m_t.)
 2. Into the cell:      dc~_t = m_t dc_t + dh~_t * o_t * (1 - tanh(c~_t)^2)                   [B, H]
    (c~_t reaches L through c_t directly and through h~_t = o tanh(c~); tanh'(u) = 1 - tanh(u)^2.)
 3. The gates, from c~ = f c + i g and h~ = o tanh(c~):
        do_t = dh~_t * tanh(c~_t),   di_t = dc~_t * g_t,   dg_t = dc~_t * i_t,   df_t = dc~_t * c_{t-1}
 4. Through the nonlinearities (sigmoid'(u) = s (1 - s) with s = sigmoid(u); tanh'(u) = 1 - tanh(u)^2),
    written with the activations saved by the forward, so no exp is recomputed:
        da^i = di_t * i_t (1 - i_t)      da^f = df_t * f_t (1 - f_t)
        da^g = dg_t * (1 - g_t^2)        da^o = do_t * o_t (1 - o_t)
        da_t = [da^i, da^f, da^g, da^o]                                                       [B, 4H]
 5. Back to the previous step: h_{t-1} enters a_t (through W_hh) and, on padded steps, h_t directly;
    c_{t-1} enters c~_t (with factor f_t) and, on padded steps, c_t directly:
        dh_{t-1} = da_t @ W_hh + (1 - m_t) dh_t                                               [B, H]
        dc_{t-1} = dc~_t * f_t + (1 - m_t) dc_t                                               [B, H]
    On a padded step (m_t = 0) steps 1-4 give da_t = 0, so both gradients pass through unchanged and the
    step contributes nothing below. Finally dh0 = dh_{-1}, dc0 = dc_{-1}.
 6. Input and parameters. a_t is linear in x_t and in the parameters, and the SAME parameters are used at
    every step, so their gradients are sums over time (and over the batch):
        dx_t   = da_t @ W_ih                                                                  [B, I]
        dW_ih  = sum_t da_t^T @ x_t                                                           [4H, I]
        dW_hh  = sum_t da_t^T @ h_{t-1}                                                       [4H, H]
        db_ih  = db_hh = sum_t sum_b da_t[b]                                                  [4H]
    (b_ih and b_hh enter a_t identically, hence equal gradients.) Only steps 1-5 are sequential; step 6
    is done after the loop as single matrix products over all (b, t) pairs -- the same sums, one call each.

tests/nn/test_lstm_bptt.py proves every gradient equal to autograd through torch.nn.LSTM (float64, 1e-10),
with and without variable lengths, and to central finite differences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LSTMCache", "lstm_bptt_forward", "lstm_bptt_backward", "HandLSTM"]


@dataclass
class LSTMCache:
    """What the backward needs from the forward (B, T, I, H as in the module docstring)."""

    x: Tensor  # [B, T, I] the input, zeros at padded positions
    weight_ih: Tensor  # [4H, I]
    weight_hh: Tensor  # [4H, H]
    has_bias: bool
    valid: Tensor | None  # [B, T, 1] bool, m_t; None when every step is valid
    h_prev: Tensor  # [B, T, H] h_{t-1} at each step (the state entering it)
    c_prev: Tensor  # [B, T, H] c_{t-1}
    gates: Tensor  # [B, T, 4H] activated gates i, f, g, o
    tanh_c: Tensor  # [B, T, H] tanh(c~_t)


def _valid_mask(lengths: Tensor | Sequence[int] | None, batch: int, steps: int, device: Any) -> Tensor | None:
    """lengths [B] -> m as a [B, T, 1] bool mask (None when lengths is None)."""
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape [{batch}], got {list(lengths.shape)}")
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > steps):
        raise ValueError(f"lengths must lie in [0, {steps}] (the padded length)")
    return (torch.arange(steps, device=device) < lengths.unsqueeze(1)).unsqueeze(-1)  # [B, T, 1]


@torch.no_grad()
def lstm_bptt_forward(
    x: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None = None,
    bias_hh: Tensor | None = None,
    h0: Tensor | None = None,
    c0: Tensor | None = None,
    lengths: Tensor | Sequence[int] | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor], LSTMCache]:
    """The forward equations of the module docstring. x: [B, T, I], h0/c0: [B, H], lengths: [B].

    Returns (output [B, T, H] with zeros at padded steps, (h_n [B, H], c_n [B, H]), cache).
    """
    if (bias_ih is None) != (bias_hh is None):
        raise ValueError("pass both bias_ih and bias_hh, or neither")
    batch, steps, _ = x.shape
    hidden = weight_hh.shape[1]
    valid = _valid_mask(lengths, batch, steps, x.device)  # [B, T, 1] or None
    if valid is not None:
        x = torch.where(valid, x, 0.0)  # padding may hold anything (even NaN); it must not reach dW_ih
    h = x.new_zeros(batch, hidden) if h0 is None else h0  # [B, H]
    c = x.new_zeros(batch, hidden) if c0 is None else c0  # [B, H]

    gx = x @ weight_ih.t()  # [B, T, 4H]: the input half of every a_t at once
    if bias_ih is not None:
        gx = gx + bias_ih + bias_hh  # [B, T, 4H]; both biases are constant over time, so add them once
    h_prev = x.new_empty(batch, steps, hidden)  # [B, T, H]
    c_prev = x.new_empty(batch, steps, hidden)  # [B, T, H]
    gates = x.new_empty(batch, steps, 4 * hidden)  # [B, T, 4H]
    tanh_c = x.new_empty(batch, steps, hidden)  # [B, T, H]
    output = x.new_empty(batch, steps, hidden)  # [B, T, H]
    for t in range(steps):
        h_prev[:, t], c_prev[:, t] = h, c
        a = gx[:, t] + h @ weight_hh.t()  # [B, 4H]
        a_i, a_f, a_g, a_o = a.chunk(4, dim=1)  # each [B, H]
        i, f, g, o = torch.sigmoid(a_i), torch.sigmoid(a_f), torch.tanh(a_g), torch.sigmoid(a_o)
        c_new = f * c + i * g  # [B, H]  c~_t
        tc = torch.tanh(c_new)  # [B, H]
        h_new = o * tc  # [B, H]  h~_t
        gates[:, t] = torch.cat([i, f, g, o], dim=1)  # [B, 4H], kept for (3) and (4) of the backward
        tanh_c[:, t] = tc
        if valid is None:
            h, c = h_new, c_new
            output[:, t] = h_new
        else:
            m = valid[:, t]  # [B, 1]
            h, c = torch.where(m, h_new, h), torch.where(m, c_new, c)  # padded: keep the old state
            output[:, t] = torch.where(m, h_new, 0.0)
    cache = LSTMCache(x, weight_ih, weight_hh, bias_ih is not None, valid, h_prev, c_prev, gates, tanh_c)
    return output, (h, c), cache


@torch.no_grad()
def lstm_bptt_backward(
    d_output: Tensor | None, d_h_n: Tensor | None, d_c_n: Tensor | None, cache: LSTMCache
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """The backward equations (steps 1-6) of the module docstring.

    d_output: [B, T, H], d_h_n, d_c_n: [B, H]; any may be None (meaning L does not depend on it).
    Returns (dx [B, T, I], dh0 [B, H], dc0 [B, H], grads) with grads keyed like nn.LSTM's layer 0:
    weight_ih_l0 [4H, I], weight_hh_l0 [4H, H] and, when the forward had biases, bias_ih_l0, bias_hh_l0 [4H].
    """
    x, w_ih, w_hh, valid = cache.x, cache.weight_ih, cache.weight_hh, cache.valid
    batch, steps, _ = x.shape
    hidden = w_hh.shape[1]
    dh = x.new_zeros(batch, hidden) if d_h_n is None else d_h_n.clone()  # [B, H]  dh_{T-1}
    dc = x.new_zeros(batch, hidden) if d_c_n is None else d_c_n.clone()  # [B, H]  dc_{T-1}
    da_all = x.new_empty(batch, steps, 4 * hidden)  # [B, T, 4H] da_t for every step, used in step 6
    for t in reversed(range(steps)):
        i, f, g, o = cache.gates[:, t].chunk(4, dim=1)  # each [B, H]
        tc = cache.tanh_c[:, t]  # [B, H]
        dh_tilde = dh if d_output is None else dh + d_output[:, t]  # [B, H]  (1) before the mask
        dc_in = dc  # [B, H]  the m_t dc_t term of (2), before the mask
        if valid is not None:
            m = valid[:, t]  # [B, 1]
            dh_tilde = torch.where(m, dh_tilde, 0.0)  # (1)
            dc_in = torch.where(m, dc, 0.0)
        dc_tilde = dc_in + dh_tilde * o * (1 - tc * tc)  # [B, H]  (2)
        do = dh_tilde * tc  # (3), each [B, H]
        di = dc_tilde * g
        dg = dc_tilde * i
        df = dc_tilde * cache.c_prev[:, t]
        da = torch.cat(
            [di * i * (1 - i), df * f * (1 - f), dg * (1 - g * g), do * o * (1 - o)], dim=1
        )  # [B, 4H]  (4)
        da_all[:, t] = da
        dh_prev = da @ w_hh  # [B, 4H] @ [4H, H] -> [B, H]  (5)
        dc_prev = dc_tilde * f  # [B, H]  (5)
        if valid is None:
            dh, dc = dh_prev, dc_prev
        else:
            # m_t = 1: only the paths through step t; m_t = 0: da_t = 0 and the (1 - m_t) terms pass through
            dh, dc = torch.where(m, dh_prev, dh), torch.where(m, dc_prev, dc)

    # (6) sums over time and batch as one product each: flatten (b, t) pairs into rows
    da_rows = da_all.reshape(batch * steps, 4 * hidden)  # [B*T, 4H]
    dx = da_all @ w_ih  # [B, T, 4H] @ [4H, I] -> [B, T, I]
    grads = {
        "weight_ih_l0": da_rows.t() @ x.reshape(batch * steps, -1),  # [4H, B*T] @ [B*T, I] -> [4H, I]
        "weight_hh_l0": da_rows.t() @ cache.h_prev.reshape(batch * steps, hidden),  # -> [4H, H]
    }
    if cache.has_bias:
        db = da_rows.sum(dim=0)  # [4H]
        grads["bias_ih_l0"] = db
        grads["bias_hh_l0"] = db.clone()
    return dx, dh, dc, grads


class HandLSTM(nn.Module):
    """Parameters of nn.LSTM(input_size, hidden_size, batch_first=True)'s layer 0, with the hand-derived BPTT.

    Same names, shapes and initialisation as nn.LSTM (U(-1/sqrt(H), 1/sqrt(H)), in registration order), so
    state_dicts load both ways and the same seed gives the same weights. Usage:

        output, (h_n, c_n), cache = lstm(x, lengths=lengths)      # no graph is built
        ... compute dL/doutput (and optionally dL/dh_n, dL/dc_n) ...
        dx, dh0, dc0, grads = lstm.backward(d_output, d_h_n, d_c_n, cache)   # also adds grads into .grad

    Note the states are [B, H] here, not nn.LSTM's [1, B, H].
    """

    def __init__(
        self, input_size: int, hidden_size: int, bias: bool = True, device: Any = None, dtype: Any = None
    ):
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        kw = dict(device=device, dtype=dtype)
        self.weight_ih_l0 = nn.Parameter(torch.empty(4 * hidden_size, input_size, **kw))
        self.weight_hh_l0 = nn.Parameter(torch.empty(4 * hidden_size, hidden_size, **kw))
        if bias:
            self.bias_ih_l0 = nn.Parameter(torch.empty(4 * hidden_size, **kw))
            self.bias_hh_l0 = nn.Parameter(torch.empty(4 * hidden_size, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)  # same expression as llmlab.nn.LSTM: bit-identical draws
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(
        self,
        x: Tensor,
        h0: Tensor | None = None,
        c0: Tensor | None = None,
        lengths: Tensor | Sequence[int] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor], LSTMCache]:
        """x: [B, T, I] -> (output [B, T, H], (h_n, c_n) each [B, H], cache)."""
        b_ih = self.bias_ih_l0 if self.bias else None
        b_hh = self.bias_hh_l0 if self.bias else None
        return lstm_bptt_forward(x, self.weight_ih_l0, self.weight_hh_l0, b_ih, b_hh, h0, c0, lengths)

    @torch.no_grad()
    def backward(
        self,
        d_output: Tensor | None,
        d_h_n: Tensor | None,
        d_c_n: Tensor | None,
        cache: LSTMCache,
        accumulate: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """lstm_bptt_backward, then (if `accumulate`) param.grad += grad, creating .grad as zeros when None,
        so successive calls accumulate like successive loss.backward() calls."""
        dx, dh0, dc0, grads = lstm_bptt_backward(d_output, d_h_n, d_c_n, cache)
        if accumulate:
            for name, grad in grads.items():
                p = getattr(self, name)
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(grad)
        return dx, dh0, dc0, grads

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}" + ("" if self.bias else ", bias=False")
