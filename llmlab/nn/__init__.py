"""From-scratch building blocks with torch.nn-like signatures, each proven equal to its torch twin."""

from llmlab.nn.lstm_bptt import HandLSTM, LSTMCache, lstm_bptt_backward, lstm_bptt_forward
from llmlab.nn.manual import (
    ManualLinear,
    ManualSGD,
    dropout_backward,
    dropout_forward,
    linear_backward,
    linear_forward,
    relu_backward,
    relu_forward,
    softmax_cross_entropy_backward,
    softmax_cross_entropy_forward,
)
from llmlab.nn.rnn import GRU, LSTM, gru_cell, lstm_cell

__all__ = [
    "ManualLinear",
    "ManualSGD",
    "dropout_backward",
    "dropout_forward",
    "linear_backward",
    "linear_forward",
    "relu_backward",
    "relu_forward",
    "softmax_cross_entropy_backward",
    "softmax_cross_entropy_forward",
    "LSTM",
    "GRU",
    "lstm_cell",
    "gru_cell",
    "HandLSTM",
    "LSTMCache",
    "lstm_bptt_forward",
    "lstm_bptt_backward",
]
