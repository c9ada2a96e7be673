"""LSTM and GRU layers from scratch with plain tensor ops, drop-in twins of torch.nn.LSTM / torch.nn.GRU.

References:
- LSTM: Hochreiter & Schmidhuber 1997, "Long Short-Term Memory" (Neural Computation 9(8)), with the forget
  gate of Gers, Schmidhuber & Cummins 2000, "Learning to Forget" (Neural Computation 12(10)).
- GRU: Cho et al. 2014, "Learning Phrase Representations using RNN Encoder-Decoder for Statistical Machine
  Translation" (EMNLP), section 2.3 -- in PyTorch's variant, which applies the reset gate *after* the
  recurrent matrix product: n = tanh(W_in x + b_in + r * (W_hn h + b_hn)). (Cho et al. write
  tanh(W x + U (r * h)); the two are different functions, and we follow PyTorch so that weights are
  interchangeable.)
- Bidirectional RNNs: Schuster & Paliwal 1997, "Bidirectional Recurrent Neural Networks".
- Dropout between stacked recurrent layers (not on the recurrent connections): Zaremba, Sutskever & Vinyals
  2014, "Recurrent Neural Network Regularization".

The cells, per time step, for a batch (B = batch, H = hidden size, "*" is element-wise):

    LSTM (gate order i, f, g, o, as stacked in weight_ih / weight_hh):
        i = sigmoid(W_ii x + b_ii + W_hi h + b_hi)        input gate       [B, H]
        f = sigmoid(W_if x + b_if + W_hf h + b_hf)        forget gate      [B, H]
        g = tanh   (W_ig x + b_ig + W_hg h + b_hg)        candidate cell   [B, H]
        o = sigmoid(W_io x + b_io + W_ho h + b_ho)        output gate      [B, H]
        c' = f * c + i * g
        h' = o * tanh(c')

    GRU (gate order r, z, n):
        r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)        reset gate       [B, H]
        z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)        update gate      [B, H]
        n = tanh   (W_in x + b_in + r * (W_hn h + b_hn))  candidate state  [B, H]
        h' = (1 - z) * n + z * h

Everything that does not depend on h -- the input projections x W_ih^T + b_ih -- is computed for all time
steps in one matrix product before the loop; only the recurrence runs step by step in Python.

Variable lengths. A batch of sequences with lengths len_b is handled with a validity mask m[t, b] = t < len_b
instead of shrinking the batch as packed kernels do: at a padded step the state is carried over unchanged
(state = where(m, new_state, state)) and the output is zero. So the forward direction ends holding each
sequence's state at ITS OWN last valid step; the reverse direction starts at t = T-1 but keeps its initial
state until t = len_b - 1, i.e. it really starts from each sequence's own last valid step, and ends at t = 0.
torch.where routes no gradient to the branch it did not select, so padded positions influence neither the
outputs, the final states nor any gradient; padded inputs are also zeroed up front, so even NaN padding is
harmless.

Parameters have torch's names, shapes, registration order and initialisation, so `load_state_dict` works in
both directions and the same seed builds bit-identical weights. tests/nn/test_rnn.py proves outputs, final
states and all gradients equal to torch.nn.LSTM / torch.nn.GRU in float64, for padded, packed and
padded-plus-lengths inputs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

__all__ = ["LSTM", "GRU", "lstm_cell", "gru_cell"]

State = tuple[Tensor, ...]  # (h,) for a GRU, (h, c) for an LSTM; each [B, H]


# ----------------------------------------------------------------------------------------------------------
# Cells: one time step. `gx` is the input projection x W_ih^T + b_ih, precomputed for every step.
# ----------------------------------------------------------------------------------------------------------
def lstm_cell(gx: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, b_hh: Tensor | None) -> tuple[Tensor, Tensor]:
    """One LSTM step. gx: [B, 4H], h, c: [B, H], w_hh: [4H, H], b_hh: [4H] or None -> (h', c') [B, H]."""
    gates = gx + h @ w_hh.t()  # [B, 4H]: all four pre-activations with one matrix product
    if b_hh is not None:
        gates = gates + b_hh  # [B, 4H]
    a_i, a_f, a_g, a_o = gates.chunk(4, dim=1)  # each [B, H], torch's order i, f, g, o
    i = torch.sigmoid(a_i)  # [B, H] how much of the candidate to write
    f = torch.sigmoid(a_f)  # [B, H] how much of the old cell to keep
    g = torch.tanh(a_g)  # [B, H] candidate values in (-1, 1)
    o = torch.sigmoid(a_o)  # [B, H] how much of the cell to expose
    c_new = f * c + i * g  # [B, H] additive update: the path along which gradients survive long spans
    h_new = o * torch.tanh(c_new)  # [B, H]
    return h_new, c_new


def gru_cell(gx: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor | None) -> Tensor:
    """One GRU step (PyTorch's form). gx: [B, 3H], h: [B, H], w_hh: [3H, H], b_hh: [3H] or None -> [B, H]."""
    gh = h @ w_hh.t()  # [B, 3H]
    if b_hh is not None:
        gh = gh + b_hh  # [B, 3H]; b_hn must stay inside r * (...), so it cannot be merged into b_in
    x_r, x_z, x_n = gx.chunk(3, dim=1)  # each [B, H]
    h_r, h_z, h_n = gh.chunk(3, dim=1)  # each [B, H]
    r = torch.sigmoid(x_r + h_r)  # [B, H] reset gate
    z = torch.sigmoid(x_z + h_z)  # [B, H] update gate
    n = torch.tanh(x_n + r * h_n)  # [B, H] candidate; r gates the recurrent term only
    return (1 - z) * n + z * h  # [B, H] interpolation between the candidate and the old state


def _run_direction(
    step: Callable[[Tensor, State], State], gx: Tensor, state: State, valid: Tensor | None, reverse: bool
) -> tuple[Tensor, State]:
    """Run one direction of one layer over time.

    gx: [T, B, G*H] input projections; state: tuple of [B, H]; valid: [T, B, 1] bool or None (all valid).
    Returns (outputs [T, B, H] -- zeros where invalid -- and the final state).
    """
    steps = range(gx.shape[0] - 1, -1, -1) if reverse else range(gx.shape[0])
    # unbind, not gx[t]: autograd's backward of each gx[t] would build a full [T, B, G*H] zero tensor,
    # i.e. O(T^2) work over the sequence; unbind's backward stacks the T step gradients once.
    gx_steps = gx.unbind(0)  # T tensors [B, G*H]
    outputs: list[Tensor] = list(gx_steps)  # placeholders, every slot is overwritten below
    for t in steps:
        new = step(gx_steps[t], state)  # tuple of [B, H]
        if valid is None:
            state = new
            outputs[t] = new[0]  # [B, H]
        else:
            m = valid[t]  # [B, 1]
            # padded step: keep the old state (gradient flows straight through it) and output zero
            state = tuple(torch.where(m, n, s) for n, s in zip(new, state, strict=True))
            outputs[t] = torch.where(m, new[0], 0.0)  # [B, H]
    return torch.stack(outputs), state  # [T, B, H]


# ----------------------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------------------
class _RNNBase(nn.Module):
    """Shared parameters and loop for LSTM (gates=4, states h and c) and GRU (gates=3, state h)."""

    _gates: int  # G: 4 for LSTM, 3 for GRU
    _num_states: int  # 2 for LSTM (h, c), 1 for GRU (h)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("input_size", input_size),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                f"dropout={dropout} has no effect with num_layers=1: dropout is applied between stacked "
                "layers only, never to the last layer's output",
                stacklevel=2,
            )
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.num_directions = 2 if bidirectional else 1

        # Registration order = torch's: layer by layer, forward direction before reverse, and within one
        # direction weight_ih, weight_hh, bias_ih, bias_hh. Order matters twice: it is the order of
        # state_dict()/parameters(), and reset_parameters() draws the random numbers in that order.
        gate_size = self._gates * hidden_size
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else hidden_size * self.num_directions
            for direction in range(self.num_directions):
                sfx = self._suffix(layer, direction)
                shapes = [("weight_ih", (gate_size, layer_in)), ("weight_hh", (gate_size, hidden_size))]
                if bias:
                    shapes += [("bias_ih", (gate_size,)), ("bias_hh", (gate_size,))]
                for name, shape in shapes:
                    # empty() draws nothing from the RNG, so only reset_parameters() consumes random numbers
                    self.register_parameter(
                        name + sfx, nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
                    )
        self.reset_parameters()

    @staticmethod
    def _suffix(layer: int, direction: int) -> str:
        return f"_l{layer}" + ("_reverse" if direction == 1 else "")

    def reset_parameters(self) -> None:
        """Every weight and bias ~ U(-1/sqrt(H), 1/sqrt(H)), drawn in registration order (torch's default).

        The bound is written 1/sqrt(H) rather than sqrt(1/H): the two can differ in the last bit, and the
        claim here is bit-identical parameters for the same seed (tested).
        """
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def _layer_params(
        self, layer: int, direction: int
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        sfx = self._suffix(layer, direction)
        w_ih = getattr(self, "weight_ih" + sfx)  # [G*H, in]
        w_hh = getattr(self, "weight_hh" + sfx)  # [G*H, H]
        b_ih = getattr(self, "bias_ih" + sfx) if self.bias else None  # [G*H]
        b_hh = getattr(self, "bias_hh" + sfx) if self.bias else None  # [G*H]
        return w_ih, w_hh, b_ih, b_hh

    def _step_fn(self, w_hh: Tensor, b_hh: Tensor | None) -> Callable[[Tensor, State], State]:
        raise NotImplementedError

    def _check_state(self, s: Tensor, batch: int, what: str) -> None:
        expected = (self.num_layers * self.num_directions, batch, self.hidden_size)
        if tuple(s.shape) != expected:
            raise ValueError(f"expected {what} of shape {list(expected)}, got {list(s.shape)}")

    def _forward(
        self, input: Tensor | PackedSequence, hx: State | None, lengths: Tensor | Sequence[int] | None
    ) -> tuple[Tensor | PackedSequence, State]:
        """Normalise the input to time-first padded [T, B, in] + validity mask, run, restore the layout."""
        packed = isinstance(input, PackedSequence)
        unbatched = False
        if packed:
            if lengths is not None:
                raise ValueError("pass either a PackedSequence or a padded tensor with `lengths`, not both")
            data, batch_sizes = input.data, input.batch_sizes  # [sum(len), in], [T] (on CPU)
            steps, batch = len(batch_sizes), int(batch_sizes[0])
            # Packed data lists, step by step, the first batch_sizes[t] sequences of the batch sorted by
            # decreasing length; so sequence b is valid at step t exactly when b < batch_sizes[t].
            sizes = batch_sizes.to(data.device).unsqueeze(1)  # [T, 1]
            valid = torch.arange(batch, device=data.device) < sizes  # [T, B]
            x = data.new_zeros(steps, batch, data.shape[1])  # [T, B, in]
            x[valid] = data  # boolean indexing walks [T, B] in row-major order: exactly the packed order
        else:
            if input.dim() == 2:  # one unbatched sequence [T, in]
                if lengths is not None:
                    raise ValueError("`lengths` needs a batched input")
                unbatched = True
                x = input.unsqueeze(1)  # [T, 1, in]
                if hx is not None:
                    hx = tuple(s.unsqueeze(1) for s in hx)  # [L*D, H] -> [L*D, 1, H]
            elif input.dim() == 3:
                x = input.transpose(0, 1) if self.batch_first else input  # [T, B, in]
            else:
                raise ValueError(f"expected a 2-D or 3-D input, got shape {list(input.shape)}")
            steps, batch = x.shape[0], x.shape[1]
            valid = None
            if lengths is not None:
                lengths = torch.as_tensor(lengths, device=x.device)
                if lengths.shape != (batch,):
                    raise ValueError(f"lengths must have shape [{batch}], got {list(lengths.shape)}")
                if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > steps):
                    raise ValueError(f"lengths must lie in [0, {steps}] (the padded length)")
                valid = torch.arange(steps, device=x.device).unsqueeze(1) < lengths  # [T, B]
        if x.shape[-1] != self.input_size:
            raise ValueError(f"expected input_size={self.input_size} features, got {x.shape[-1]}")

        if valid is not None:
            valid = valid.unsqueeze(-1)  # [T, B, 1], broadcasts over features
            x = torch.where(valid, x, 0.0)  # whatever the padding holds (even NaN) cannot leak into gradients

        num_states = self.num_layers * self.num_directions
        if hx is None:
            zeros = x.new_zeros(num_states, batch, self.hidden_size)  # [L*D, B, H]
            hx = (zeros,) * self._num_states
        else:
            for s, what in zip(hx, ("h0", "c0"), strict=False):
                self._check_state(s, batch, what)
            if packed and input.sorted_indices is not None:
                # states come in the caller's batch order; the packed data is in sorted order
                hx = tuple(s.index_select(1, input.sorted_indices) for s in hx)

        layer_input = x  # [T, B, in]
        finals: list[State] = []  # one per (layer, direction), in torch's [L*D] order
        for layer in range(self.num_layers):
            outs = []
            for direction in range(self.num_directions):
                k = layer * self.num_directions + direction  # index into the [L*D, B, H] state layout
                w_ih, w_hh, b_ih, b_hh = self._layer_params(layer, direction)
                gx = layer_input @ w_ih.t()  # [T, B, G*H]: all input projections at once
                if b_ih is not None:
                    gx = gx + b_ih  # [T, B, G*H]
                state = tuple(s[k] for s in hx)  # each [B, H]
                out, state = _run_direction(
                    self._step_fn(w_hh, b_hh), gx, state, valid, reverse=direction == 1
                )
                outs.append(out)  # [T, B, H]
                finals.append(state)
            layer_output = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]  # [T, B, D*H]
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                # between layers only: the last layer's output is returned undropped (the caller adds its own)
                layer_output = F.dropout(layer_output, self.dropout, training=True)  # [T, B, D*H]
            layer_input = layer_output

        h_n = tuple(torch.stack([f[i] for f in finals]) for i in range(self._num_states))  # each [L*D, B, H]
        if packed:
            out_data = layer_input[valid.squeeze(-1)]  # [sum(len), D*H], back in packed order
            if input.unsorted_indices is not None:
                h_n = tuple(s.index_select(1, input.unsorted_indices) for s in h_n)  # caller's batch order
            output: Tensor | PackedSequence = PackedSequence(
                out_data, input.batch_sizes, input.sorted_indices, input.unsorted_indices
            )
        elif unbatched:
            output = layer_input.squeeze(1)  # [T, D*H]
            h_n = tuple(s.squeeze(1) for s in h_n)  # each [L*D, H]
        else:
            # [B, T, D*H] if batch_first else [T, B, D*H]
            output = layer_input.transpose(0, 1) if self.batch_first else layer_input
        return output, h_n

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        return s


class LSTM(_RNNBase):
    """Multi-layer (bidirectional) LSTM with torch.nn.LSTM's constructor, parameters and call convention.

    forward(input, hx=None, *, lengths=None) -> (output, (h_n, c_n))
      input: [T, B, in] ([B, T, in] if batch_first), [T, in] (unbatched), or a PackedSequence.
      hx:    optional (h0, c0), each [num_layers * num_directions, B, H] (always batch in dim 1, as torch).
      lengths: optional [B] valid lengths (CPU or device) for a padded input; output then has zeros at
             padded positions, and keeps the input's padded length T.
      output: [T, B, D*H] ([B, T, D*H] if batch_first), or a PackedSequence for a PackedSequence input;
             the two directions are concatenated forward-first, as in torch.
      h_n, c_n: [num_layers * num_directions, B, H]; index layer * num_directions + direction.
    """

    _gates = 4
    _num_states = 2

    def _step_fn(self, w_hh: Tensor, b_hh: Tensor | None) -> Callable[[Tensor, State], State]:
        return lambda gx, state: lstm_cell(gx, state[0], state[1], w_hh, b_hh)

    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: tuple[Tensor, Tensor] | None = None,
        *,
        lengths: Tensor | Sequence[int] | None = None,
    ) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
        output, (h_n, c_n) = self._forward(input, hx, lengths)
        return output, (h_n, c_n)


class GRU(_RNNBase):
    """Multi-layer (bidirectional) GRU with torch.nn.GRU's constructor, parameters and call convention.

    forward(input, hx=None, *, lengths=None) -> (output, h_n); shapes as for `LSTM`, with hx = h0 a single
    tensor [num_layers * num_directions, B, H] and no cell state.
    """

    _gates = 3
    _num_states = 1

    def _step_fn(self, w_hh: Tensor, b_hh: Tensor | None) -> Callable[[Tensor, State], State]:
        return lambda gx, state: (gru_cell(gx, state[0], w_hh, b_hh),)

    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: Tensor | None = None,
        *,
        lengths: Tensor | Sequence[int] | None = None,
    ) -> tuple[Tensor | PackedSequence, Tensor]:
        output, (h_n,) = self._forward(input, None if hx is None else (hx,), lengths)
        return output, h_n
