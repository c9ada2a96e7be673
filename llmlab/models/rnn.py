"""A recurrent text classifier: embedding → (bi)LSTM or GRU → pooling over time → linear classifier.

Variable lengths without packing. Each direction of each layer is a unidirectional RNN run over the padded
batch; for the reverse direction every sequence is first reversed *within its own length* (padding stays at
the end) and reversed back afterwards. Since an RNN's output at step t depends only on steps ≤ t, padding
placed after the valid steps never reaches a valid output: the result equals a bidirectional RNN on packed
sequences (tests/models/test_rnn_classifier.py checks it against torch.nn.LSTM/GRU with PackedSequence).
Why not pack: on CPU, the backward of torch's LSTM over a PackedSequence of unequal lengths is several times
slower than over the same padded batch (8.9× for 64 × 220 tokens, hidden 128, one thread); with
length-bucketed batches the padding costs only ~2% extra compute (1.9% vs 47.7% unbucketed). Both figures:
`python benchmarks/stage3_packing.py` (docs/stage3-rnn.md).

Each direction is `torch.nn.LSTM`/`GRU` (`impl="fused"`, the fast default) or llmlab's own from-scratch
`llmlab.nn.rnn.LSTM`/`GRU` (`impl="scratch"`): same parameter names, so weights move between the two.
`convert_torch_rnn_state_dict` maps a (multi-layer, bidirectional) torch.nn.LSTM/GRU's weights onto this
layout. Max-pooling over time follows Collobert et al. (2011) and Conneau et al. (2017, InferSent); "last"
concatenates the final states of both directions (the forward one at each sequence's last valid step);
"max+mean" concatenates the max- and mean-pooled outputs (the "concat pooling" of Howard & Ruder 2018,
ULMFiT, without its last state), so the classifier sees 2·D·H features.

Word-type dropout (`embed_dropout`; Gal & Ghahramani 2016, §4, "embedding dropout" in Merity et al. 2018's
AWD-LSTM): in training, each vocabulary word is dropped with probability p for the whole batch (its embedding
is zero at every position where it occurs) and the kept words' embeddings are scaled by 1/(1 − p), so the
expected input is unchanged; evaluation uses every word unscaled. Unlike element-wise dropout on the embedded
sequence, a dropped word cannot be recovered from its other occurrences: the model must learn from the rest of
the review.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from llmlab.nn.rnn import GRU as ScratchGRU
from llmlab.nn.rnn import LSTM as ScratchLSTM

_CELLS = {
    ("lstm", "fused"): nn.LSTM,
    ("gru", "fused"): nn.GRU,
    ("lstm", "scratch"): ScratchLSTM,
    ("gru", "scratch"): ScratchGRU,
}


@dataclass
class RNNClassifierConfig:
    cell: Literal["lstm", "gru"] = "lstm"
    impl: Literal["fused", "scratch"] = "fused"  # torch.nn.LSTM/GRU, or llmlab.nn.rnn's (same weights)
    vocab_size: int = 30_000  # embedding rows = the largest vocabulary (the recipe caps its vocab at this)
    embed_dim: int = 128
    hidden: int = 128
    layers: int = 1
    bidirectional: bool = True
    dropout: float = 0.3  # on the embeddings, between recurrent layers, and before the classifier
    embed_dropout: float = 0.0  # word-type dropout: each vocabulary word dropped for a whole training batch
    pooling: Literal["max", "mean", "max+mean", "last"] = "max"
    num_classes: int = 2
    # LSTM only: start the forget gate's total bias at this value (Jozefowicz et al. 2015 recommend 1.0, so
    # the cell remembers by default early in training); None keeps torch's uniform initialisation.
    lstm_forget_bias: float | None = 1.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "embed_dim", "hidden", "layers", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")
        if not 0 <= self.embed_dropout < 1:
            raise ValueError("embed_dropout must be in [0, 1)")


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse the first lengths[b] steps of each row of x [B, T, ...]; padding stays where it is."""
    t = torch.arange(x.shape[1], device=x.device)[None, :]  # [1, T]
    last = lengths.to(x.device)[:, None] - 1  # [B, 1]
    idx = torch.where(t <= last, last - t, t)  # [B, T]: its own inverse
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.ndim - 2))).expand_as(x))


class RecurrentLayer(nn.Module):
    """One layer: a forward RNN and (optionally) a backward one, each unidirectional, over padded input."""

    def __init__(self, cell: type[nn.Module], in_size: int, hidden: int, bidirectional: bool) -> None:
        super().__init__()
        self.fwd = cell(in_size, hidden, batch_first=True)
        self.bwd = cell(in_size, hidden, batch_first=True) if bidirectional else None

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, in] → (outputs [B, T, D*H] with zeros at padding, final states [B, D*H])."""
        out = self.fwd(x)[0]  # [B, T, H]; exact at valid steps, whatever the padding after them
        b = torch.arange(x.shape[0], device=x.device)
        final = [out[b, lengths - 1]]  # [B, H]: forward state at each sequence's last valid step
        if self.bwd is not None:
            back = reverse_padded(self.bwd(reverse_padded(x, lengths))[0], lengths)  # [B, T, H]
            final.append(back[:, 0])  # the reverse direction ends at step 0
            out = torch.cat([out, back], dim=-1)  # [B, T, 2H]
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]  # [B, T]
        return out * valid[..., None], torch.cat(final, dim=-1)


class RNNClassifier(nn.Module):
    def __init__(self, cfg: RNNClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        cell = _CELLS[(cfg.cell, cfg.impl)]
        directions = 2 if cfg.bidirectional else 1
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=0)
        self.rnn = nn.ModuleList(
            RecurrentLayer(
                cell, cfg.embed_dim if k == 0 else directions * cfg.hidden, cfg.hidden, cfg.bidirectional
            )
            for k in range(cfg.layers)
        )
        self.dropout = nn.Dropout(cfg.dropout)
        pooled = directions * cfg.hidden * (2 if cfg.pooling == "max+mean" else 1)
        self.classifier = nn.Linear(pooled, cfg.num_classes)
        if cfg.cell == "lstm" and cfg.lstm_forget_bias is not None:
            with torch.no_grad():
                for name, p in self.rnn.named_parameters():
                    if "bias" in name:  # gates (i, f, g, o): f is the second quarter; b_ih + b_hh = value
                        h = cfg.hidden
                        p[h : 2 * h] = cfg.lstm_forget_bias if "bias_ih" in name else 0.0

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] → embeddings [B, T, E], with word-type dropout in training (module docstring)."""
        x = self.embedding(tokens)  # [B, T, E]
        p = self.cfg.embed_dropout
        if self.training and p > 0:
            w = self.embedding.weight  # [V, E]
            keep = torch.empty(w.shape[0], device=w.device, dtype=w.dtype).bernoulli_(1 - p)  # [V]: 1 = kept
            x = x * (keep[tokens] / (1 - p))[..., None]  # [B, T, E]: every occurrence of a word alike
        return x

    def encode(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] (0 = padding), lengths [B] (≥ 1) → (outputs [B, T, D*H], final states [B, D*H])."""
        lengths = lengths.to(tokens.device)
        x = self.dropout(self.embed(tokens))  # [B, T, E]
        for k, layer in enumerate(self.rnn):
            if k > 0:
                x = self.dropout(x)  # between layers, as torch.nn.LSTM(dropout=...)
            x, final = layer(x, lengths)
        return x, final

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens [B, T], lengths [B] → logits [B, num_classes]."""
        out, final = self.encode(tokens, lengths)
        pooling = self.cfg.pooling
        if pooling == "last":
            return self.classifier(self.dropout(final))  # final [B, D*H] → [B, K]
        parts = []
        if pooling in ("max", "max+mean"):
            valid = (
                torch.arange(tokens.shape[1], device=tokens.device)[None, :]
                < lengths.to(tokens.device)[:, None]
            )  # [B, T]
            parts.append(out.masked_fill(~valid[..., None], float("-inf")).amax(dim=1))  # [B, D*H]
        if pooling in ("mean", "max+mean"):
            parts.append(out.sum(dim=1) / lengths.to(out)[:, None])  # [B, D*H]: padding is zero
        pooled = torch.cat(parts, dim=-1)  # [B, D*H] or, max+mean, [B, 2*D*H]
        return self.classifier(self.dropout(pooled))  # [B, K]


def convert_torch_rnn_state_dict(
    state_dict: dict[str, torch.Tensor], layers: int, bidirectional: bool
) -> dict[str, torch.Tensor]:
    """torch.nn.LSTM/GRU(num_layers=layers, bidirectional=...) weights → this model's `rnn.*` parameters:
    `weight_ih_l{k}` → `rnn.{k}.fwd.weight_ih_l0`, `weight_ih_l{k}_reverse` → `rnn.{k}.bwd.weight_ih_l0`, and
    the same for weight_hh, bias_ih, bias_hh. Unknown or missing keys are an error."""
    out, expected = {}, set()
    for k in range(layers):
        for direction, suffix in (("fwd", ""), ("bwd", "_reverse"))[: 2 if bidirectional else 1]:
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                src = f"{name}_l{k}{suffix}"
                expected.add(src)
                if src in state_dict:
                    out[f"rnn.{k}.{direction}.{name}_l0"] = state_dict[src]
    unknown = set(state_dict) - expected
    missing = {k for k in expected if "weight" in k} - set(state_dict)
    if unknown or missing:
        raise ValueError(
            f"not a torch RNN state dict of {layers} layer(s), bidirectional={bidirectional}: "
            f"unknown {sorted(unknown)}, missing {sorted(missing)}"
        )
    return out


def build_rnn_classifier(cfg: RNNClassifierConfig) -> RNNClassifier:
    return RNNClassifier(cfg)
